"""Turning a live ``torch.optim.AdamW``/``Adam`` into FOAM, and back out to a stock checkpoint.

:func:`convert` keeps the optimizer *object*: schedulers, trainers and ``isinstance`` checks hold
references to it. It swaps the object's class for a subclass that puts :class:`FOAM` in front of
the stock class (``FOAMAdamW(FOAM, AdamW)``), folds the moments it already has, and records each
parameter's level in its state. Nothing is freed behind the optimizer's back: the full-size
moments go away because the optimizer stops referencing them.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from . import backends, checkpoint
from .checkpoint import export_adamw_state_dict
from .discovery import parameter_names
from .distributed import local_numel
from .families import family_of, supported_names
from .hyper import GROUP_DEFAULTS, check_options
from .layout import LAYOUT_KEY, format_for, level_for
from .master_weights import RHO_KEY
from .optimizer import (
    FOAM,
    _check_autotune,
    check_autotune,
    check_autotune_options,
    check_levels,
    check_params,
    check_state_formats,
    decide_layouts,
)
from .policy import KEEP_UNFOLDED, overrides
from .reference import effective_level
from .state import DEFAULT_FORMAT, format_of, get_format
from .tensor_lr import make_lrs_tensors

__all__ = [
    "Explanation",
    "convert",
    "explain",
    "export_adamw_state_dict",
    "is_converted",
    "stock_name",
]

_FOAM_CLASSES: dict[type, type] = {}


def foam_class_for(cls: type) -> type:
    """``FOAM<cls>``: FOAM's step and checkpoint logic in front of ``cls`` (cached, picklable)."""
    if issubclass(cls, FOAM):
        return cls
    if cls not in _FOAM_CLASSES:
        name = f"FOAM{cls.__name__}"
        doc = f"A {cls.__name__} converted to FOAM by foam_compile.convert (folded moments)."
        new = type(name, (FOAM, cls), {"__module__": __name__, "__doc__": doc})
        globals()[name] = new
        _FOAM_CLASSES[cls] = new
    return _FOAM_CLASSES[cls]


def is_converted(opt: torch.optim.Optimizer) -> bool:
    return isinstance(opt, FOAM)


def stock_name(opt: torch.optim.Optimizer) -> str:
    """The class name users know an optimizer by: ``AdamW`` for a converted AdamW."""
    family = family_of(opt)
    if isinstance(opt, FOAM) and type(opt) is not FOAM and family is not None:
        return family.stock.__name__
    return type(opt).__name__


def convert(
    optimizer: torch.optim.Optimizer,
    *,
    level: int | str | None = None,
    scale: float | None = None,
    res_scale: float | None = None,
    levels: Mapping[str | Tensor, int] | None = None,
    model: nn.Module | None = None,
    keep_unfolded: Iterable[str] | None = KEEP_UNFOLDED,
    tensor_lr: bool = False,
    budget: float | None = None,
    max_error: float | None = None,
    calibration_steps: int = 8,
    state_format: str | None = None,
    state_formats: Mapping[str | Tensor, str] | None = None,
    master_weights: str | None = None,
    formats: Iterable[str] | None = None,
) -> torch.optim.Optimizer:
    """Convert a ``torch.optim.AdamW`` or ``Adam`` into FOAM in place, and return it.

    Parameters fold at ``level`` (default 2) except embeddings, the output head, norms (names
    matching ``keep_unfolded``) and 0-d/1-d parameters, which stay at level 0 (plain Adam);
    ``levels`` overrides per parameter name or tensor. Names come from ``model``, the group's
    ``param_names`` or the live module that owns each parameter (:mod:`foam_compile.policy`).
    ``scale`` (alpha) applies to folded parameters. Existing moments are folded (a checkpointed
    run continues); a parameter without state (frozen, or not stepped yet) gets its state, at
    the level chosen now, on its first gradient. ``fused=True`` and ``foreach`` optimizers
    convert too, since FOAM's own step replaces theirs.

    ``level="auto"`` calibrates on the next ``calibration_steps`` real steps (run as AdamW), then
    folds each parameter at the level the planner picks under ``budget`` and/or ``max_error``
    (see :class:`FOAM`; ``formats``, e.g. ``("fp32", "int8")``, lets it pick formats too).
    ``tensor_lr=True`` turns float learning rates into 0-d tensors, so that
    a scheduler does not recompile a compiled step (its schedulers keep reporting floats).

    ``state_format`` (default ``"fp32"``; ``"int8"``, ``"int4"``, ``"int8-sr"``, ``"int4-sr"``)
    stores the moments quantized, embeddings and the output head with stochastic rounding;
    ``state_formats`` pins formats per parameter name or tensor. ``master_weights`` (``"int8"``
    or ``"int16"``) gives bfloat16/float16 parameters correction bits from their next step
    (see :class:`FOAM` for all three).

    An optimizer that is already FOAM is returned as it is; options that would change it are
    refused (change a group's ``level``, or call ``set_levels``, instead).

    One line to resume a FOAM checkpoint into a script that builds a stock AdamW::

        opt = foam_compile.convert(torch.optim.AdamW(model.parameters(), lr=1e-3))
        opt.load_state_dict(torch.load("ckpt.pt"))
    """
    where = "foam_compile.convert"
    given = {
        "level": level,
        "scale": scale,
        "res_scale": res_scale,
        "master_weights": master_weights,
        "state_format": state_format,
    }
    check_options(where, **given)
    levels = check_levels(levels, where)
    state_formats = check_state_formats(state_formats, where)
    formats = check_autotune_options(
        where,
        budget=budget,
        max_error=max_error,
        calibration_steps=calibration_steps,
        formats=formats,
    )
    if isinstance(optimizer, FOAM):
        policy = dict(levels=levels, model=model, keep_unfolded=keep_unfolded)
        _refuse_changes(optimizer, where, given, policy, budget, max_error)
        _refuse_format_changes(optimizer, where, state_formats, model)
        if tensor_lr:
            make_lrs_tensors(optimizer)
        return optimizer
    family = family_of(optimizer)
    if family is None:
        raise TypeError(
            f"{where}: {type(optimizer).__name__} is not one of {supported_names()}; "
            "FOAM folds Adam's two moments. For new code use foam_compile.FOAM(params, ...)."
        )
    group_options = [
        {k: v if v is not None else g.get(k, GROUP_DEFAULTS[k]) for k, v in given.items()}
        for g in optimizer.param_groups
    ]
    hypers = [
        family.hyper({**group, **options}, where)
        for group, options in zip(optimizer.param_groups, group_options)
    ]
    check_params(optimizer.param_groups)
    check_autotune(
        where,
        auto=any(o["level"] == "auto" for o in group_options),
        budget=budget,
        max_error=max_error,
        calibration_steps=calibration_steps,
        formats=formats,
    )

    # Decide every parameter's layout on copies of the groups (the policy; a stock optimizer
    # that loaded a FOAM checkpoint brings its layouts), then fold the moments it already has.
    policy = dict(
        model=model, levels=levels, keep_unfolded=keep_unfolded, state_formats=state_formats
    )
    drafts = [
        {**group, **options, LAYOUT_KEY: dict(group.get(LAYOUT_KEY) or {})}
        for group, options in zip(optimizer.param_groups, group_options)
    ]
    decided = WeakIdKeyDictionary()
    decide_layouts(drafts, policy, decided, lookup=True)
    new_states = {}  # build every new state first: a bad moment raises before anything changes
    for gi, (draft, hp) in enumerate(zip(drafts, hypers)):
        for pi, p in enumerate(draft["params"]):
            if optimizer.state.get(p):
                new_states[p] = checkpoint.to_foam_state(
                    p,
                    optimizer.state[p],
                    level=level_for(draft, pi, p),
                    moments=family.moments(hp),
                    fmt=get_format(format_for(draft, pi, DEFAULT_FORMAT), where),
                    where=where,
                    what=checkpoint.describe(p, gi, pi),
                )

    optimizer.__class__ = foam_class_for(type(optimizer))
    optimizer.__dict__.pop("_foam_refused", None)  # the guard's mark (guard.mark_refused)
    defaults = {k: v if v is not None else GROUP_DEFAULTS[k] for k, v in given.items()}
    all_groups = [*optimizer.param_groups, optimizer.defaults]
    for group, options, hp in zip(all_groups, [*group_options, defaults], [*hypers, hypers[0]]):
        group.update(options)
        if state_format is None:  # not given: absent (fp32), as in FOAM(...)
            group.pop("state_format", None)
        group["decoupled_weight_decay"] = hp.decoupled_weight_decay
        group["fused"] = False  # FOAM's step replaces the fused kernel; keeps load casts right
    for group, draft in zip(optimizer.param_groups, drafts):
        group[LAYOUT_KEY] = draft[LAYOUT_KEY]
    for p, state in new_states.items():
        optimizer.state[p] = state
    optimizer.foam_policy = policy
    optimizer._foam_decided = decided
    optimizer.autotune = dict(
        budget=budget,
        max_error=max_error,
        formats=formats,
        steps=calibration_steps,
        model=model,
        keep_unfolded=keep_unfolded,
    )
    _check_autotune(optimizer, where, given=True)
    if tensor_lr:
        make_lrs_tensors(optimizer)
    _rebind_scheduler_wrapper(optimizer)
    optimizer._patch_step_function()  # step hooks run for the new class too
    backends.prepare([p for g in optimizer.param_groups for p in g["params"]])
    return optimizer


def _refuse_changes(opt, where, given, policy, budget, max_error) -> None:
    """``convert`` on an optimizer that is already FOAM changes nothing: say so if asked to."""
    levels, model, keep_unfolded = policy["levels"], policy["model"], policy["keep_unfolded"]
    how = (
        "To change a level, set param_group['level'] (its moments are re-folded at the next "
        "step) or call optimizer.set_levels({param: level})"
    )
    for gi, group in enumerate(opt.param_groups):
        for key, value in given.items():
            if value is not None and group.get(key, GROUP_DEFAULTS[key]) != value:
                raise ValueError(
                    f"{where}: this {stock_name(opt)} is already FOAM, with {key}="
                    f"{group.get(key)!r} in param group {gi}; convert does not change it "
                    f"({key}={value!r} given). {how}; for {key}, set param_group[{key!r}]."
                )
    if levels:
        items = [
            (gi, i, p) for gi, g in enumerate(opt.param_groups) for i, p in enumerate(g["params"])
        ]
        names = {
            id(p): opt.param_groups[gi]["param_names"][i]
            for gi, i, p in items
            if opt.param_groups[gi].get("param_names") is not None
        }
        pinned = overrides([p for *_, p in items], names=names, model=model, levels=levels)
        for gi, i, p in items:
            now = level_for(opt.param_groups[gi], i, p)
            if pinned[id(p)] is not None and effective_level(p.shape, pinned[id(p)]) != now:
                raise ValueError(
                    f"{where}: this {stock_name(opt)} is already FOAM and "
                    f"{checkpoint.describe(p, gi, i)} runs at level {now}; convert does not "
                    f"change it (levels= given). {how}."
                )
    if model is not None or keep_unfolded is not KEEP_UNFOLDED:
        raise ValueError(
            f"{where}: this {stock_name(opt)} is already FOAM and its parameters' levels are "
            f"chosen; convert does not re-run the policy (model=/keep_unfolded= given). {how}."
        )
    auto = getattr(opt, "autotune", {})
    for key, value in (("budget", budget), ("max_error", max_error)):
        if value is not None and auto.get(key) != value:
            raise ValueError(
                f"{where}: this {stock_name(opt)} is already FOAM; convert does not change its "
                f"{key} ({value!r} given). Build a new FOAM optimizer with level='auto' instead."
            )


def _refuse_format_changes(opt, where, state_formats, model) -> None:
    """``state_formats=`` on an optimizer that is already FOAM: refused unless it changes
    nothing (a group's ``state_format`` can be changed by hand: re-encoded at the next step)."""
    if not state_formats:
        return
    items = [(gi, i, p) for gi, g in enumerate(opt.param_groups) for i, p in enumerate(g["params"])]
    chosen: dict[int, str] = {}
    overrides([p for *_, p in items], model=model, formats=state_formats, chosen_formats=chosen)
    for gi, i, p in items:
        now = format_for(opt.param_groups[gi], i, DEFAULT_FORMAT)
        if id(p) in chosen and chosen[id(p)] != now:
            raise ValueError(
                f"{where}: this {stock_name(opt)} is already FOAM and "
                f"{checkpoint.describe(p, gi, i)} keeps its moments in {now!r}; convert does "
                f"not change it (state_formats= given). Set param_group['state_format'] "
                "(re-encoded at the next step), or build the optimizer with state_formats=."
            )


def _rebind_scheduler_wrapper(opt: torch.optim.Optimizer) -> None:
    """LR schedulers wrap ``opt.step`` with the *class's* function at their creation; point that
    wrapper at FOAM's step, or the old class's step would run on folded state."""
    wrapped = opt.__dict__.get("step")
    if wrapped is None or not getattr(wrapped, "_wrapped_by_lr_sched", False):
        return
    func = type(opt).step
    opt_ref = weakref.ref(opt)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        o = opt_ref()
        o._opt_called = True
        return func.__get__(o, o.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    opt.step = wrapper


@dataclass
class Explanation:
    """What FOAM does to each parameter; ``str()`` is a table.

    ``rows``: ``(name, shape, level, FOAM state bytes, AdamW state bytes, state format)``. A
    parameter without state yet (frozen, or no gradient so far) shows the level and format its
    state will get and 0 bytes on both sides: AdamW would hold none for it either.
    """

    rows: list[tuple[str, tuple[int, ...], int, int, int, str]]
    without_state: int = 0

    @property
    def state_bytes(self) -> int:
        return sum(r[3] for r in self.rows)

    @property
    def adamw_bytes(self) -> int:
        return sum(r[4] for r in self.rows)

    def __str__(self) -> str:
        lines = [
            f"{'parameter':<40} {'shape':<18} {'level':>5} {'format':<7} {'FOAM state':>12} "
            f"{'AdamW state':>12}"
        ]
        for name, shape, level, foam, adam, fmt in self.rows:
            lines.append(
                f"{name[:40]:<40} {str(list(shape)):<18} {level:>5} {fmt:<7} {foam:>12,} "
                f"{adam:>12,}"
            )
        ratio = self.state_bytes / max(self.adamw_bytes, 1)
        lines.append(
            f"{'total':<40} {'':<18} {'':>5} {'':<7} {self.state_bytes:>12,} "
            f"{self.adamw_bytes:>12,}  ({ratio:.1%} of AdamW)"
        )
        if self.without_state:
            lines.append(
                f"({self.without_state} parameter(s) have no state yet: frozen, or no gradient "
                "so far; they get it at the level shown on their first gradient)"
            )
        return "\n".join(lines)


def explain(optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> Explanation:
    """Which parameters are folded, at what level, in which state format, and their state bytes
    against AdamW's.

    Bytes are measured from the tensors in ``optimizer.state`` (moments with their format's
    side tensors, not the step or correction bits: :func:`foam_compile.memory_report` counts
    everything); AdamW's are two float32 moments per element (plus the max with amsgrad) of the
    same parameters, those that have state.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = parameter_names(params, model)
    if isinstance(optimizer, FOAM):
        optimizer._decide_all()  # the levels parameters without state will get
    rows, without = [], 0
    for gi, group in enumerate(optimizer.param_groups):
        n_moments = 3 if group.get("amsgrad") else 2
        for pi, p in enumerate(group["params"]):
            st = optimizer.state.get(p) or {}
            given = group.get("param_names")
            name = names.get(id(p)) or (given[pi] if given else f"group{gi}.param{pi}")
            if not st:
                without += 1
                is_foam = isinstance(optimizer, FOAM)
                level = level_for(group, pi, p) if is_foam else 0
                fmt = format_for(group, pi, DEFAULT_FORMAT) if is_foam else DEFAULT_FORMAT
                rows.append((name, tuple(p.shape), level, 0, 0, fmt))
                continue
            foam = sum(
                local_numel(t) * t.element_size()
                for k, t in st.items()
                if isinstance(t, Tensor) and k not in ("step", RHO_KEY)  # memory_report has those
            )
            adam = n_moments * 4 * local_numel(p)  # per rank for sharded parameters
            fmt = format_of(st).name
            rows.append((name, tuple(p.shape), st.get("foam_level", 0), foam, adam, fmt))
    return Explanation(rows, without)
