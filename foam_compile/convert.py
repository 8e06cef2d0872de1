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

from . import backends, checkpoint
from .checkpoint import export_adamw_state_dict
from .discovery import parameter_names
from .distributed import local_numel
from .families import Family, family_of, supported_names
from .hyper import GROUP_DEFAULTS, check_options
from .master_weights import RHO_KEY
from .optimizer import FOAM, _check_autotune, _int_level, check_autotune, check_params
from .policy import KEEP_UNFOLDED, choose_levels
from .state import DEFAULT_FORMAT, get_format

__all__ = ["convert", "is_converted", "export_adamw_state_dict", "explain", "Explanation"]

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


def convert(
    optimizer: torch.optim.Optimizer,
    *,
    level: int | None = None,
    scale: float | None = None,
    res_scale: float | None = None,
    levels: Mapping[str | Tensor, int] | None = None,
    model: nn.Module | None = None,
    keep_unfolded: Iterable[str] | None = KEEP_UNFOLDED,
    tensor_lr: bool = False,
    budget: float | None = None,
    max_error: float | None = None,
    calibration_steps: int = 8,
) -> torch.optim.Optimizer:
    """Convert a ``torch.optim.AdamW`` or ``Adam`` into FOAM in place, and return it.

    Parameters fold at ``level`` (default 2) except embeddings, the output head, norms (names
    matching ``keep_unfolded``) and 0-d/1-d parameters, which stay at level 0 (plain Adam);
    ``levels`` overrides per parameter name or tensor. ``scale`` (alpha) applies to folded
    parameters. Existing moments are folded (a checkpointed run continues); ``fused=True`` and
    ``foreach`` optimizers convert too, since FOAM's own step replaces theirs.

    ``level="auto"`` calibrates on the next ``calibration_steps`` real steps (run as AdamW), then
    folds each parameter at the level the planner picks under ``budget`` and/or ``max_error``
    (see :class:`FOAM`). ``tensor_lr=True`` turns float learning rates into 0-d tensors, so that
    a scheduler does not recompile a compiled step.

    One line to resume a FOAM checkpoint into a script that builds a stock AdamW::

        opt = foam_compile.convert(torch.optim.AdamW(model.parameters(), lr=1e-3))
        opt.load_state_dict(torch.load("ckpt.pt"))
    """
    if isinstance(optimizer, FOAM):
        return optimizer
    family = family_of(optimizer)
    if family is None:
        raise TypeError(
            f"foam_compile.convert: {type(optimizer).__name__} is not one of {supported_names()}; "
            "FOAM folds Adam's two moments. For new code use foam_compile.FOAM(params, ...)."
        )
    where = "foam_compile.convert"
    check_options(where, level=level, scale=scale, res_scale=res_scale)
    given = {"level": level, "scale": scale, "res_scale": res_scale}
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
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    chosen = choose_levels(
        params,
        lambda p: _int_level(group_options[group_of[id(p)]]["level"]),
        model=model,
        levels=levels,
        keep_unfolded=keep_unfolded,
    )

    # Build every new state first: a bad moment raises before the optimizer changes.
    new_states = {}
    for gi, (group, hp) in enumerate(zip(optimizer.param_groups, hypers)):
        for pi, p in enumerate(group["params"]):
            new_states[p] = _foam_state(optimizer, family, p, group, hp, chosen[id(p)], gi, pi)

    optimizer.__class__ = foam_class_for(type(optimizer))
    defaults = {k: v if v is not None else GROUP_DEFAULTS[k] for k, v in given.items()}
    all_groups = [*optimizer.param_groups, optimizer.defaults]
    for group, options, hp in zip(all_groups, [*group_options, defaults], [*hypers, hypers[0]]):
        group.update(options)
        group["decoupled_weight_decay"] = hp.decoupled_weight_decay
        group["fused"] = False  # FOAM's step replaces the fused kernel; keeps load casts right
        if tensor_lr and not isinstance(group.get("lr"), Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
    for p, state in new_states.items():
        optimizer.state[p] = state
    optimizer.autotune = dict(
        budget=budget,
        max_error=max_error,
        steps=calibration_steps,
        model=model,
        keep_unfolded=keep_unfolded,
    )
    _check_autotune(optimizer, where)
    _rebind_scheduler_wrapper(optimizer)
    optimizer._patch_step_function()  # step hooks run for the new class too
    backends.prepare(params)
    return optimizer


def _foam_state(opt, family: Family, p: Tensor, group, hp, level, gi: int, pi: int) -> dict:
    """``p``'s state as FOAM's: fresh, or the stock/FOAM state it has, folded and checked."""
    old = opt.state.get(p)
    moments = family.moments(hp)
    if not old:
        fmt = get_format(DEFAULT_FORMAT)
        return checkpoint.new_state(p, level, moments, fmt, checkpoint.step_device(p, group))
    return checkpoint.to_foam_state(
        p,
        old,
        level=level,
        moments=moments,
        where="foam_compile.convert",
        what=checkpoint.describe(p, gi, pi),
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
    """What FOAM does to each parameter; ``str()`` is a table."""

    rows: list[tuple[str, tuple[int, ...], int, int, int]]

    @property
    def state_bytes(self) -> int:
        return sum(r[3] for r in self.rows)

    @property
    def adamw_bytes(self) -> int:
        return sum(r[4] for r in self.rows)

    def __str__(self) -> str:
        lines = [
            f"{'parameter':<40} {'shape':<18} {'level':>5} {'FOAM state':>12} {'AdamW state':>12}"
        ]
        for name, shape, level, foam, adam in self.rows:
            lines.append(
                f"{name[:40]:<40} {str(list(shape)):<18} {level:>5} {foam:>12,} {adam:>12,}"
            )
        ratio = self.state_bytes / max(self.adamw_bytes, 1)
        lines.append(
            f"{'total':<40} {'':<18} {'':>5} {self.state_bytes:>12,} {self.adamw_bytes:>12,}"
            f"  ({ratio:.1%} of AdamW)"
        )
        return "\n".join(lines)


def explain(optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> Explanation:
    """Which parameters are folded, at what level, and their state bytes against AdamW's.

    Bytes are measured from the tensors in ``optimizer.state`` (moments only, not the step or
    correction bits: :func:`foam_compile.memory_report` counts everything);
    AdamW's are two float32 moments per element (plus the max with amsgrad).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = parameter_names(params, model)
    rows = []
    for gi, group in enumerate(optimizer.param_groups):
        n_moments = 3 if group.get("amsgrad") else 2
        for pi, p in enumerate(group["params"]):
            st = optimizer.state.get(p, {})
            level = st.get("foam_level", 0)
            foam = sum(
                local_numel(t) * t.element_size()
                for k, t in st.items()
                if isinstance(t, Tensor) and k not in ("step", RHO_KEY)  # memory_report has those
            )
            adam = n_moments * 4 * local_numel(p)  # per rank for sharded parameters
            rows.append(
                (names.get(id(p), f"group{gi}.param{pi}"), tuple(p.shape), level, foam, adam)
            )
    return Explanation(rows)
