"""A float64 model of quantized FOAM (nearest rounding), for the tests.

Built on :mod:`float64_model` (FOAM's step in float64) and written from the contract in the
docstrings of ``foam_compile/formats/int8.py`` / ``int4.py``, not from the package's code: it
imports nothing from ``foam_compile``. Where the package pads rows to whole groups and reshapes,
this model finds each element's group by index (``j // G``) and reduces with ``scatter_reduce``;
it reads 4-bit codes with its own nibble arithmetic.

:class:`QuantParamModel` keeps the codes and scales of a parameter's moments; each step decodes
them, runs :class:`float64_model.ParamModel`'s step on the decoded moments, and encodes the new
moments. The comparison with the optimizer (:func:`assert_codes_match`) allows, element by
element, exactly the codes that the model's pre-rounding coordinate can reach when the moment
and the group scale move by the float32 rounding bound of one step: a code differs from the
model's only where float32 arithmetic may legitimately land on the other side of a rounding
boundary.
"""

from __future__ import annotations

import torch
from float64_model import F64, OPS, Hyper, ParamModel, unit_roundoff

U32 = unit_roundoff(torch.float32)
CODEC_OPS = 8  # float32 roundings inside one encode (see the formats' contract)


def levels_of(bits: int, kind: str) -> int:
    return (2 ** (bits - 1) - 1) if kind == "signed" else (2**bits - 1)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)


def group_max(a: torch.Tensor, group: int) -> torch.Tensor:
    """``[rows, n] -> [rows, ceil(n/G)]``: the max of each group, by scatter on ``j // G``."""
    rows, n = a.shape
    ng = (n + group - 1) // group
    idx = (torch.arange(n) // group).expand(rows, n)
    out = torch.zeros(rows, ng, dtype=a.dtype)
    return out.scatter_reduce(1, idx, a, reduce="amax", include_self=True)


def spread(s: torch.Tensor, n: int, group: int) -> torch.Tensor:
    """``[rows, ng] -> [rows, n]``: each element gets its group's value."""
    return s.index_select(1, torch.arange(n) // group)


def code_coordinate(x: torch.Tensor, s: torch.Tensor, kind: str, levels: int) -> torch.Tensor:
    """The real number the code rounds: ``L * softsign(x/s)`` or ``L * sqrt(x)/s`` (float64)."""
    safe = torch.where(s > 0, s, torch.ones_like(s))
    if kind == "signed":
        t = torch.where(s > 0, x / safe, torch.zeros_like(x))
        return levels * 2 * t / (1 + t.abs())
    return torch.where(s > 0, x.clamp_min(0).sqrt() / safe, torch.zeros_like(x)) * levels


def round_code(z: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    q = torch.round(z)  # half to even, as the contract says
    if kind == "square":
        q = torch.where((q == 0) & (x > 0), torch.ones_like(q), q)
    return q


def quantize(x: torch.Tensor, kind: str, bits: int, group: int):
    """float64 moment -> ``(codes [rows, n], scales [rows, ng], coordinate z [rows, n])``."""
    levels = levels_of(bits, kind)
    a = _rows(x.to(F64))
    base = a.abs() if kind == "signed" else a.clamp_min(0).sqrt()
    s = group_max(base, group)
    z = code_coordinate(a, spread(s, a.shape[1], group), kind, levels)
    return round_code(z, a, kind), s, z


def dequantize(q: torch.Tensor, s: torch.Tensor, kind: str, bits: int, group: int, shape):
    levels = levels_of(bits, kind)
    sf = spread(s.to(F64), q.shape[1], group)
    y = q.to(F64) / levels
    if kind == "signed":
        out = y / (2 - y.abs()) * sf
    else:
        out = (y * sf) ** 2
    return out.reshape(shape)


def stored_codes(state: dict, key: str, kind: str, bits: int, n: int) -> torch.Tensor:
    """The optimizer's codes as integers ``[rows, n]``, read from the stored tensor."""
    raw = _rows(state[key]).to(torch.int64) if state[key].dim() else state[key].reshape(1, 1)
    raw = raw.to(torch.int64)
    if bits == 8:
        return raw.to(F64)
    low, high = raw % 16, raw // 16
    nib = torch.stack([low, high], -1).reshape(raw.shape[0], -1)[:, :n]
    return (nib - (8 if kind == "signed" else 0)).to(F64)


class QuantParamModel:
    """One parameter of quantized FOAM in float64: codes and scales between steps."""

    def __init__(self, p: torch.Tensor, level: int, bits: int, group: int, amsgrad: bool):
        self.inner = ParamModel.create(p, level)
        self.bits, self.group = bits, group
        self.keys = [("exp_avg", "signed", "m"), ("exp_avg_sq", "square", "v")]
        if amsgrad:
            self.keys.append(("max_exp_avg_sq", "square", "vmax"))
        self.codes: dict[str, tuple] = {}
        self.tol: dict[str, torch.Tensor] = {}
        for key, kind, attr in self.keys:
            self.codes[key] = quantize(getattr(self.inner, attr), kind, bits, group)

    def _n(self) -> int:
        shape = self.inner.m.shape
        return shape[-1] if len(shape) else 1

    def load(self, state: dict, p: torch.Tensor) -> None:
        """Take the optimizer's codes, scales, step and parameter as the model's (before the
        first step there is no state: the model keeps its zero moments)."""
        if not state:
            self.inner.resync(p)
            return
        for key, kind, _ in self.keys:
            q = stored_codes(state, key, kind, self.bits, self._n())
            s = (
                _rows(state[f"{key}_scale"].to(F64))
                if state[f"{key}_scale"].dim()
                else (state[f"{key}_scale"].to(F64).reshape(1, 1))
            )
            self.codes[key] = (q, s, None)
        self.inner.t = int(state["step"])
        self.inner.resync(p)

    def step(self, grad: torch.Tensor, hp: Hyper) -> None:
        shape = self.inner.m.shape
        for key, kind, attr in self.keys:
            q, s, _ = self.codes[key]
            setattr(self.inner, attr, dequantize(q, s, kind, self.bits, self.group, shape))
        before = {"m": self.inner.m_scale, "v": self.inner.v_scale}
        self.inner.step(grad, hp)
        self.inner.vmax = self.inner.vmax  # amsgrad's max is already taken in the step
        # the size each moment update rounds against in this step (float64_model's bookkeeping)
        step_scale = {
            "m": self.inner.m_scale - before["m"],
            "v": self.inner.v_scale - before["v"],
        }
        step_scale["vmax"] = step_scale["v"]
        for key, kind, attr in self.keys:
            value = getattr(self.inner, attr)
            self.codes[key] = quantize(value, kind, self.bits, self.group)
            self.tol[key] = _rows(
                torch.as_tensor(OPS * U32 * step_scale[attr], dtype=F64).expand(value.shape)
            )

    def decoded(self, key: str) -> torch.Tensor:
        kind = next(k for name, k, _ in self.keys if name == key)
        q, s, _ = self.codes[key]
        return dequantize(q, s, kind, self.bits, self.group, self.inner.m.shape)


def assert_codes_match(state: dict, model: QuantParamModel, key: str, kind: str) -> float:
    """The optimizer's codes and scales of ``key`` against the model's after one step.

    Returns the fraction of elements whose code the rounding bound left ambiguous (the caller
    checks it is small, so that the comparison is not vacuous).
    """
    __tracebackhide__ = True
    bits, group = model.bits, model.group
    levels = levels_of(bits, kind)
    q_model, s_model, _ = model.codes[key]
    attr = {"exp_avg": "m", "exp_avg_sq": "v", "max_exp_avg_sq": "vmax"}[key]
    x = _rows(getattr(model.inner, attr))
    tol = model.tol[key] + U32 * x.abs()  # the update's roundings, then the cast to float32
    n = x.shape[1]
    # the scale is a max over the group: it moves by at most the largest move in the group
    if kind == "signed":
        s_tol = group_max(tol, group)
    else:
        hi, lo = (x + tol).clamp_min(0).sqrt(), (x - tol).clamp_min(0).sqrt()
        s_tol = group_max(hi - lo, group) + U32 * s_model
    s_opt = (
        _rows(state[f"{key}_scale"].to(F64))
        if state[f"{key}_scale"].dim()
        else (state[f"{key}_scale"].to(F64).reshape(1, 1))
    )
    bad = (s_opt - s_model).abs() > s_tol
    assert not bad.any(), f"{key} scales: {s_opt[bad][:4].tolist()} vs {s_model[bad][:4].tolist()}"
    # every code reachable from x +- tol with a scale in s +- s_tol, plus the codec's roundings
    corners = [
        code_coordinate(xx, spread(ss, n, group), kind, levels)
        for xx in (x - tol, x + tol)
        for ss in ((s_model - s_tol).clamp_min(0), s_model + s_tol)
    ]
    eps = CODEC_OPS * U32 * levels
    z_lo = torch.stack(corners).amin(0) - eps
    z_hi = torch.stack(corners).amax(0) + eps
    q_lo = round_code(z_lo.clamp(-levels, levels), x - tol, kind)
    q_hi = round_code(z_hi.clamp(-levels, levels), x + tol, kind)
    if kind == "square":
        q_lo = torch.where(x - tol <= 0, torch.zeros_like(q_lo), q_lo)
    q_opt = stored_codes(state, key, kind, bits, n)
    outside = (q_opt < q_lo) | (q_opt > q_hi)
    assert not outside.any(), (
        f"{key}: {int(outside.sum())} codes outside what float32 rounding allows; e.g. got "
        f"{q_opt[outside][:4].tolist()}, model {q_model[outside][:4].tolist()}, allowed "
        f"[{q_lo[outside][:4].tolist()}, {q_hi[outside][:4].tolist()}]"
    )
    return float((q_lo != q_hi).to(F64).mean()) if q_lo.numel() else 0.0
