"""Every migration of optimizer state, in one place.

* a fresh FOAM state for a parameter (:func:`new_state`), laid out as its layout says
  (:mod:`foam_compile.layout`);
* state from elsewhere into FOAM (:func:`to_foam_state`): a stock AdamW/Adam state (full-size
  moments, folded here), a FOAM checkpoint (checked against the parameter), a ``step`` saved as
  a plain number (older torch) made a tensor;
* a changed level (:func:`relevel`): deeper keeps block means, shallower spreads them; a changed
  level and/or state format (:func:`relayout`): decoded, refolded, encoded in the new format;
* a FOAM optimizer out to a stock AdamW/Adam checkpoint (:func:`export_adamw_state_dict`);
* a whole ``state_dict`` checked against an optimizer before anything changes
  (:func:`prepare_load`).

Moments go through the state format (:mod:`foam_compile.state`), so a format never needs its
own copy of these rules. Every function here returns new dicts and raises before it mutates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .distributed import (
    check_format_shards,
    fold,
    format_decode,
    format_encode,
    format_zeros,
    unfold,
)
from .layout import LAYOUT_KEY, format_for, level_for
from .master_weights import RHO_KEY, check_rho
from .reference import effective_level, folded_shape
from .state import DEFAULT_FORMAT, StateFormat, format_of, get_format

__all__ = [
    "describe",
    "export_adamw_state_dict",
    "new_state",
    "prepare_load",
    "relayout",
    "relevel",
    "step_device",
    "step_tensor",
    "to_foam_state",
]

Moments = Sequence[tuple[str, str]]  # (state key, kind), as families.Family.moments gives them
FOAM_KEYS = ("foam_level", "foam_format", RHO_KEY)  # a stock AdamW has no correction bits


def describe(p: Tensor, gi: int, pi: int) -> str:
    """How error messages name a parameter."""
    return f"parameter {pi} of param group {gi} (shape {list(p.shape)}, dtype {p.dtype})"


def step_tensor(step, device: torch.device | str = "cpu") -> Tensor:
    """A step count as the float32 0-d tensor torch.optim keeps (older checkpoints hold floats)."""
    if isinstance(step, Tensor):
        return step
    return torch.tensor(float(step), dtype=torch.float32, device=device)


def step_device(p: Tensor, group: dict) -> torch.device | str:
    """Where torch.optim keeps a parameter's step: on its device if capturable or fused."""
    return p.device if group.get("capturable") or group.get("fused") else "cpu"


def _with_format(st: dict, fmt: StateFormat) -> dict:
    if fmt.name != DEFAULT_FORMAT:
        st["foam_format"] = fmt.name
    else:
        st.pop("foam_format", None)
    return st


def new_state(p: Tensor, level: int, moments: Moments, fmt: StateFormat, step_device="cpu") -> dict:
    """Zero moments for ``p`` at ``level`` (its effective level) in format ``fmt``, step 0."""
    level = effective_level(p.shape, level)
    st: dict = {"step": torch.tensor(0.0, dtype=torch.float32, device=step_device)}
    for key, kind in moments:
        st.update(format_zeros(fmt, p, level, key, kind))
    st["foam_level"] = level
    return _with_format(st, fmt)


def _encode_full(
    p: Tensor, st: dict, level: int, moments: Moments, fmt: StateFormat, where: str, what: str
) -> dict:
    """Fold and encode the full-size (stock) moments of ``st``; check their shapes first."""
    out = {}
    for key, kind in moments:
        if key not in st:
            continue
        value = st[key]
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(p.shape):
            got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"{where}: '{key}' of {what} has shape {got}, expected {list(p.shape)} (a stock "
                "AdamW moment). Was the checkpoint saved for a different model?"
            )
        folded = fold(value.to(fmt.compute_dtype(p)), level)
        out.update(format_encode(fmt, folded, p, level, key, kind, what))
    return out


def to_foam_state(
    p: Tensor,
    st: dict,
    *,
    level: int,
    moments: Moments,
    fmt: StateFormat | None = None,
    where: str = "FOAM",
    what: str = "a parameter",
    migrate: bool = False,
) -> dict:
    """``st`` (stock or FOAM) as a FOAM state for ``p``; raises ``ValueError`` if it cannot be.

    A stock state (no ``foam_level``) has full-size moments: they are folded at ``level`` (the
    parameter's effective level is used) and encoded in ``fmt`` (default ``fp32``). A FOAM state
    is checked against ``p`` and keeps its own level and format, unless ``migrate``: then it is
    moved to ``level`` and ``fmt`` (if given) by :func:`relayout`. A numeric ``step`` becomes a
    tensor. A parameter's correction bits (``master_rho``) are checked against it and
    kept. Error messages start with ``where`` and name the parameter as ``what``.
    """
    st = dict(st)
    if RHO_KEY in st:
        check_rho(p, st[RHO_KEY], where, what)
    if "foam_level" in st:
        fmt_saved = get_format(st.get("foam_format", DEFAULT_FORMAT), where)
        shape = folded_shape(p.shape, st["foam_level"])
        for key, kind in moments:
            if key in st:
                why = fmt_saved.check(st, key, p, shape)
                if why is not None:
                    raise ValueError(
                        f"{where}: '{key}' of {what} {why} (folded at level "
                        f"{st['foam_level']}). Was the checkpoint saved for a different model "
                        "or fold level?"
                    )
                # a sharded parameter: its shards must hold whole groups of the saved format
                check_format_shards(fmt_saved, p, st["foam_level"], key, kind, what)
        if migrate:
            st = relayout(p, st, moments, level=level, fmt=fmt)
    else:
        fmt = fmt or get_format(DEFAULT_FORMAT)
        level = effective_level(p.shape, level)
        st.update(_encode_full(p, st, level, moments, fmt, where, what))
        st["foam_level"] = level
        _with_format(st, fmt)
    if "step" in st:
        st["step"] = step_tensor(st["step"])
    return st


def relevel(p: Tensor, st: dict, level: int, moments: Moments) -> dict:
    """``st`` moved to ``level``: each moment unfolded to full size and folded again.

    Going deeper (``new >= old``) keeps the moments' block means; going shallower unfolds them
    (each element gets its block's mean). The format is kept.
    """
    return relayout(p, st, moments, level=level)


def relayout(
    p: Tensor,
    st: dict,
    moments: Moments,
    *,
    level: int | None = None,
    fmt: StateFormat | None = None,
) -> dict:
    """``st`` moved to another ``level`` and/or state format ``fmt`` (``None``: keep it).

    Each moment is decoded, unfolded to full size and folded again if the level changes
    (:func:`relevel`'s rule), and encoded in the new format; the old format's side tensors are
    dropped. Unchanged level and format return a copy of ``st`` with the same tensors.
    """
    old_fmt, old = format_of(st), st["foam_level"]
    fmt = old_fmt if fmt is None else fmt
    level = old if level is None else effective_level(p.shape, level)
    out = dict(st)
    if level == old and fmt.name == old_fmt.name:
        return out
    n = p.shape[-1] if p.dim() else 1
    for key, kind in moments:
        if key not in st:
            continue
        value = format_decode(old_fmt, st, key, kind, p)
        if level != old:
            value = fold(unfold(value, old, n), level)
        for part in old_fmt.keys(key):
            out.pop(part, None)
        out.update(format_encode(fmt, value, p, level, key, kind))
    out["foam_level"] = level
    return _with_format(out, fmt)


def export_adamw_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """A stock ``torch.optim.AdamW``/``Adam`` state dict of a FOAM optimizer.

    Each folded moment is decoded and unfolded to full size (every element gets its block's
    mean), so that ``fold(unfold(m)) == m`` and re-importing into FOAM is exact. FOAM's keys
    (levels, formats, format side tensors, group options) are dropped.
    """
    from .hyper import GROUP_DEFAULTS

    family = getattr(optimizer, "foam_family", None)
    if family is None:
        raise TypeError(
            f"export_adamw_state_dict: {type(optimizer).__name__} is not a FOAM optimizer; its "
            "state_dict() already is a stock one"
        )
    sd = optimizer.state_dict()
    index = {
        pid: (p, group)
        for group, saved in zip(optimizer.param_groups, sd["param_groups"])
        for pid, p in zip(saved["params"], group["params"])
    }
    state = {}
    for pid, st in sd["state"].items():
        p, group = index[pid]
        fmt, level = format_of(st), st.get("foam_level", 0)
        n = p.shape[-1] if p.dim() else 1
        out = {k: v for k, v in st.items() if k not in FOAM_KEYS}
        for key, kind in family.moments(family.hyper(group)):
            if key in st:
                for part in fmt.keys(key):
                    out.pop(part, None)
                full = unfold(format_decode(fmt, st, key, kind, p), level, n)
                out[key] = full.reshape(p.shape).clone()
        state[pid] = out
    drop = (*GROUP_DEFAULTS, "decoupled_weight_decay", LAYOUT_KEY)
    groups = [{k: v for k, v in g.items() if k not in drop} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def prepare_load(
    opt: torch.optim.Optimizer, state_dict: dict, *, moments_of_group, where: str
) -> tuple[dict, dict[Tensor, dict]]:
    """Check ``state_dict`` against ``opt`` and make every parameter's state FOAM's.

    Returns the state dict to hand to ``torch.optim.Optimizer.load_state_dict`` and, per
    parameter, the FOAM values to put back after it (torch casts floating state to the
    parameter's dtype, and strings such as ``foam_format`` to garbage; FOAM keeps its own).
    ``moments_of_group(group)`` gives a group's moments.
    Mutates nothing.
    """
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(f"{where}: expected a dict with 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"{where}: the checkpoint has {len(saved_groups)} param groups, this optimizer "
            f"{len(opt.param_groups)}"
        )
    id_map = {}
    for gi, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{where}: param group {gi} has {len(saved['params'])} parameters in the "
                f"checkpoint and {len(group['params'])} here"
            )
        merged = {**group, **saved}  # the checkpoint's options and layouts win, as in torch
        if merged.get(LAYOUT_KEY) is None:
            merged[LAYOUT_KEY] = group.get(LAYOUT_KEY) or {}
        moments = moments_of_group(merged)
        for pi, (sid, p) in enumerate(zip(saved["params"], group["params"])):
            fmt = get_format(format_for(merged, pi, DEFAULT_FORMAT), where)
            id_map[sid] = (gi, pi, p, level_for(merged, pi, p), fmt, moments)
    new_states, tensors = {}, {}
    for sid, st in state_dict["state"].items():
        if sid not in id_map:
            new_states[sid] = st
            continue
        gi, pi, p, level, fmt, moments = id_map[sid]
        st = to_foam_state(
            p, st, level=level, moments=moments, fmt=fmt, where=where, what=describe(p, gi, pi)
        )
        new_states[sid] = st
        fmt = format_of(st)
        tensors[p] = {part: st[part] for key, _ in moments if key in st for part in fmt.keys(key)}
        if "foam_format" in st:  # torch's load casts strings as iterables (to "<generator ...>")
            tensors[p]["foam_format"] = st["foam_format"]
        if RHO_KEY in st:  # torch would cast the integer correction to the parameter's dtype
            tensors[p][RHO_KEY] = st[RHO_KEY]
    return {**state_dict, "state": new_states, "param_groups": saved_groups}, tensors
