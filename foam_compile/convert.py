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

from .discovery import parameter_names
from .distributed import fold, local_numel, unfold
from .optimizer import (
    _MOMENTS,
    FOAM,
    FOAM_DEFAULTS,
    _check_autotune,
    check_hyperparameters,
    check_params,
    state_dtype,
)
from .policy import KEEP_UNFOLDED, choose_levels
from .reference import folded_shape

__all__ = ["convert", "is_converted", "export_adamw_state_dict", "explain", "Explanation"]

SUPPORTED = (torch.optim.Adam, torch.optim.AdamW)
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

    Parameters fold at ``level`` (default 2) except embeddings, the output head, norms (names matching
    ``keep_unfolded``) and 0-d/1-d parameters, which stay at level 0 (plain Adam); ``levels``
    overrides per parameter name or tensor. ``scale`` (alpha) applies to folded parameters.
    Existing moments are folded (a checkpointed run continues); ``fused=True`` and ``foreach``
    optimizers convert too, since FOAM's own step replaces theirs. ``level="auto"`` calibrates
    on the next ``calibration_steps`` real steps (run as AdamW) and then folds each parameter at
    the level the planner picks under ``budget`` and/or ``max_error`` (see :class:`FOAM`). ``tensor_lr=True`` turns float
    learning rates into 0-d tensors, so that a scheduler does not recompile a compiled step.

    One line to resume a FOAM checkpoint into a script that builds a stock AdamW::

        opt = foam_compile.convert(torch.optim.AdamW(model.parameters(), lr=1e-3))
        opt.load_state_dict(torch.load("ckpt.pt"))
    """
    if isinstance(optimizer, FOAM):
        return optimizer
    if not isinstance(optimizer, SUPPORTED):
        raise TypeError(
            f"foam_compile.convert: {type(optimizer).__name__} is not torch.optim.Adam or "
            "torch.optim.AdamW; FOAM folds Adam's two moments. For new code use "
            "foam_compile.FOAM(params, ...)."
        )
    given = {"level": level, "scale": scale, "res_scale": res_scale}
    group_options = [
        {k: v if v is not None else g.get(k, FOAM_DEFAULTS[k]) for k, v in given.items()}
        for g in optimizer.param_groups
    ]
    for group, options in zip(optimizer.param_groups, group_options):
        check_hyperparameters({**group, **options}, where="foam_compile.convert")
    check_params(optimizer.param_groups)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    chosen = choose_levels(
        params, lambda p: _int_level(group_options[group_of[id(p)]]["level"]),
        model=model, levels=levels, keep_unfolded=keep_unfolded,
    )
    decoupled = isinstance(optimizer, torch.optim.AdamW)

    # Build every new state first: a bad moment raises before the optimizer changes.
    new_states = {}
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            new_states[p] = _folded_state(optimizer, p, group, chosen[id(p)], gi, pi)

    optimizer.__class__ = foam_class_for(type(optimizer))
    defaults = {k: v if v is not None else FOAM_DEFAULTS[k] for k, v in given.items()}
    for group, options in zip([*optimizer.param_groups, optimizer.defaults], [*group_options, defaults]):
        group.update(options)
        group["decoupled_weight_decay"] = decoupled or bool(group.get("decoupled_weight_decay"))
        group["fused"] = False  # FOAM's step replaces the fused kernel; keeps load casts right
        if tensor_lr and not isinstance(group.get("lr"), Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
    for p, state in new_states.items():
        optimizer.state[p] = state
    optimizer.autotune = dict(
        budget=budget, max_error=max_error, steps=calibration_steps, model=model,
        keep_unfolded=keep_unfolded,
    )
    _check_autotune(optimizer)
    _rebind_scheduler_wrapper(optimizer)
    optimizer._patch_step_function()  # step hooks run for the new class too
    return optimizer


def _int_level(level) -> int:
    return 0 if level == "auto" else level  # 'auto' runs as AdamW until calibrated


def _folded_state(opt, p: Tensor, group: dict, level: int, gi: int, pi: int) -> dict:
    old = opt.state.get(p)
    if not old:
        return FOAM._new_state(opt, p, {**group, "amsgrad": group.get("amsgrad", False)}, level)
    state = dict(old)
    if "foam_level" in old:  # folded state already (a FOAM checkpoint loaded into a stock class)
        level, expected, convert = old["foam_level"], folded_shape(p.shape, old["foam_level"]), False
    else:
        expected, convert = tuple(p.shape), True
    for key in _MOMENTS:
        if key not in old:
            continue
        if tuple(old[key].shape) != expected:
            raise ValueError(
                f"foam_compile.convert: '{key}' of parameter {pi} of param group {gi} has shape "
                f"{list(old[key].shape)}, expected {list(expected)}"
            )
        if convert:
            state[key] = fold(old[key].to(state_dtype(p)), level).contiguous()
    if "step" in state and not isinstance(state["step"], Tensor):
        state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
    state["foam_level"] = level
    return state


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


def export_adamw_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """A stock ``torch.optim.AdamW``/``Adam`` state dict of a FOAM optimizer.

    Each folded moment is unfolded to full size (every element gets its block's mean), so that
    ``fold(unfold(m)) == m`` and re-importing into FOAM is exact. FOAM keys are dropped.
    """
    sd = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    index = {pid: p for g, sg in zip(optimizer.param_groups, sd["param_groups"])
             for pid, p in zip(sg["params"], g["params"])}
    state = {}
    for pid, st in sd["state"].items():
        p = index[pid]
        st = dict(st)
        level = st.pop("foam_level", 0)
        n = p.shape[-1] if p.dim() else 1
        for key in _MOMENTS:
            if key in st:
                st[key] = unfold(st[key], level, n).reshape(p.shape).clone()
        state[pid] = st
    groups = [{k: v for k, v in g.items() if k not in (*FOAM_DEFAULTS, "decoupled_weight_decay")}
              for g in sd["param_groups"]]
    del params
    return {"state": state, "param_groups": groups}


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
        lines = [f"{'parameter':<40} {'shape':<18} {'level':>5} {'FOAM state':>12} {'AdamW state':>12}"]
        for name, shape, level, foam, adam in self.rows:
            lines.append(f"{name[:40]:<40} {str(list(shape)):<18} {level:>5} {foam:>12,} {adam:>12,}")
        ratio = self.state_bytes / max(self.adamw_bytes, 1)
        lines.append(
            f"{'total':<40} {'':<18} {'':>5} {self.state_bytes:>12,} {self.adamw_bytes:>12,}"
            f"  ({ratio:.1%} of AdamW)"
        )
        return "\n".join(lines)


def explain(optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> Explanation:
    """Which parameters are folded, at what level, and their state bytes against AdamW's.

    Bytes are measured from the tensors in ``optimizer.state`` (moments only, not the step);
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
            foam = sum(local_numel(st[k]) * st[k].element_size() for k in _MOMENTS if k in st)
            adam = n_moments * 4 * local_numel(p)  # per rank for sharded parameters
            rows.append((names.get(id(p), f"group{gi}.param{pi}"), tuple(p.shape), level, foam, adam))
    return Explanation(rows)
