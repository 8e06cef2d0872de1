"""The arithmetic of the quantized state formats, in plain torch: the reference fast paths match.

Everything here is float32 and elementwise within a *group* (consecutive elements of one row of
a folded moment), so a Triton or C++ kernel can reproduce it bit for bit: each line below is one
IEEE-754 float32 operation, correctly rounded (division and sqrt included: in Triton use
``div_rn``/``sqrt_rn``, not the approximate defaults), ``rint`` rounds half to even, and the only
reduction is a ``max`` (exact, order-free). The group functions take ``[..., G]`` and treat the
last dim as one group; :func:`encode_groups` / :func:`decode_groups` lay a ``[rows, n]`` moment
out in groups along its last dim (zero-padded, never across a row).

Two codes, chosen by measurement (``benchmarks/quant_codecs.py``, ``benchmarks/RESULTS.md``):

* ``signed`` (``exp_avg``): absmax scale ``s``, then the softsign compander of FlashOptim
  (Ortiz et al., arXiv 2602.23349, Sec. 3.2): ``t = x * (1/s)``, ``y = (t + t) / (1 + |t|)``,
  ``q = rint(y * L)`` in ``[-L, L]``; decoded ``y = q / L``, ``t = y / (2 - |y|)``, ``x = t * s``.
* ``square`` (``exp_avg_sq``, ``max_exp_avg_sq``): ``u = sqrt(x)``, absmax scale ``s`` of ``u``
  (FlashOptim's sqrt-linear code), ``q = rint(u * (1/s) * L)`` in ``[0, L]``, and a positive
  ``x`` never takes code 0 (it takes 1): a zero ``v`` under a nonzero ``m`` would make Adam's
  step ``m / eps`` (Li et al., arXiv 2309.01507, Sec. 4.1: the "zero-point problem" of ``v``).
  Decoded ``u = (q / L) * s``, ``x = u * u``.

Stochastic rounding (an option) is unbiased in the moment's own domain: with ``q0 = floor(z)``
and ``q1 = min(q0 + 1, L)`` the codes around ``z = y * L`` (``t * L`` for squares), whose decoded
values ``a0 <= t <= a1`` bracket the input, ``q = q1`` if ``r < (t - a0) / (a1 - a0)`` else
``q0`` (for squares the probability is taken on ``t * t``), with ``r`` uniform in ``[0, 1)``:
``E[decoded] = input``. :func:`uniform` makes ``r`` from a counter-based hash so that a kernel
draws the same numbers.

A group whose scale is 0 decodes to zeros; a non-finite input makes the scale non-finite and
the whole group decodes to NaN (it never silently becomes a number).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "decode_groups",
    "decode_signed",
    "decode_square",
    "encode_groups",
    "encode_signed",
    "encode_square",
    "hash32",
    "pack4",
    "uniform",
    "unpack4",
]

_MASK = 0xFFFFFFFF


# ------------------------------------------------------------------------ one group's codes
def _inverse(s: Tensor) -> Tensor:
    """``1 / s`` (correctly rounded), 0 where ``s == 0`` so that an all-zero group codes to 0."""
    return torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)


def encode_signed(x: Tensor, levels: int, rand: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``x`` (float32 ``[..., G]``, one group per row) -> ``(codes int32 in [-L, L], scale)``.

    Nearest rounding, or stochastic with ``rand`` (uniform ``[0, 1)``, the shape of ``x``).
    """
    s = x.abs().amax(-1, keepdim=True)
    t = x * _inverse(s)
    y = (t + t) / (1.0 + t.abs())
    z = y * levels
    if rand is None:
        q = torch.round(z)
    else:
        q0 = torch.floor(z).clamp(-levels, levels - 1)
        a0, a1 = _signed_t(q0, levels), _signed_t(q0 + 1, levels)
        p = (t - a0) / (a1 - a0)
        q = torch.where(rand < p, q0 + 1, q0)
    return _defined(q).to(torch.int32), s.squeeze(-1)


def _defined(q: Tensor) -> Tensor:
    """A NaN code (the element NaN, or inf under the scale inf: ``t = inf * 0``) stores 0, as
    every kernel does: NaN's integer conversion differs between platforms. The group's scale is
    NaN or inf, so it decodes non-finite whatever its codes."""
    return torch.where(q.isnan(), 0.0, q)


def _signed_t(q: Tensor, levels: int) -> Tensor:
    y = q / levels
    return y / (2.0 - y.abs())


def decode_signed(q: Tensor, scale: Tensor, levels: int) -> Tensor:
    """Codes ``[..., G]`` and scales ``[...]`` -> float32 values."""
    return _signed_t(q.to(torch.float32), levels) * scale.unsqueeze(-1)


def _sqrt_rn(x: Tensor) -> Tensor:
    """A correctly rounded float32 sqrt, as the contract requires: torch's vectorised CPU float32
    ``sqrt`` is not (about 1 value in 5 of ``torch.rand(100000)`` is 1 ulp off on torch 2.13);
    float64's sqrt rounded once to float32 is (53 >= 2 * 24 + 2 bits)."""
    return torch.sqrt(x.double()).to(x.dtype) if x.dtype == torch.float32 else torch.sqrt(x)


def encode_square(x: Tensor, levels: int, rand: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``x >= 0`` (float32 ``[..., G]``) -> ``(codes int32 in [0, L], scale of sqrt(x))``."""
    u = _sqrt_rn(x.clamp_min(0.0))
    s = u.amax(-1, keepdim=True)
    t = u * _inverse(s)
    z = t * levels
    if rand is None:
        q = torch.round(z)
    else:
        q0 = torch.floor(z).clamp(0, levels - 1)
        a0, a1 = q0 / levels, (q0 + 1) / levels
        p = (t * t - a0 * a0) / (a1 * a1 - a0 * a0)
        q = torch.where(rand < p, q0 + 1, q0)
    q = _defined(q)
    q = torch.where((q == 0) & (u > 0), 1.0, q)  # a positive v never decodes to 0
    return q.to(torch.int32), s.squeeze(-1)


def decode_square(q: Tensor, scale: Tensor, levels: int) -> Tensor:
    u = (q.to(torch.float32) / levels) * scale.unsqueeze(-1)
    return u * u


# ------------------------------------------------------------------------------ randomness
def hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mix (int64 tensors holding uint32 values; the result likewise).

    Structure and constants from Chris Wellons' hash-prospector (github.com/skeeto/hash-prospector,
    public domain): xorshift-multiply rounds. Both multipliers are below 2**31, so every product
    of a uint32 fits an int64 and plain torch computes exactly what uint32 arithmetic does.
    """
    x = x & _MASK
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK
    return x ^ (x >> 15)


def uniform(numel: int, step: Tensor | int, salt: int, device=None) -> Tensor:
    """``numel`` float32 numbers in ``[0, 1)`` for one moment at one step.

    ``r[i] = (hash32(i + hash32(4 * step + salt)) >> 8) * 2**-24``: ``i`` the element's flat
    index in the moment (row-major), ``step`` the step count being written, ``salt`` the moment
    (1 ``exp_avg``, 2 ``exp_avg_sq``, 3 ``max_exp_avg_sq``). 24 bits: every value is exact in
    float32. Counter-based, so resuming from a checkpoint draws the same numbers.
    """
    if isinstance(step, Tensor):
        step = step.to(device=device, dtype=torch.int64)
    seed = hash32(torch.as_tensor(step, dtype=torch.int64, device=device) * 4 + salt)
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    return (hash32(idx + seed) >> 8).to(torch.float32) * (2.0**-24)


# ----------------------------------------------------------------------------- group layout
def encode_groups(
    x: Tensor, group: int, levels: int, kind: str, rand: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``x`` float32 ``[rows, n]`` -> ``(codes int32 [rows, n], scales float32 [rows, ceil(n/G)])``.

    Groups of ``group`` consecutive elements of a row; the last group of a row may be short (it
    is zero-padded, which changes neither code: zeros do not raise an absmax). ``rand``: see
    :func:`encode_signed`, shape ``[rows, n]``.
    """
    rows, n = x.shape
    ng = -(-n // group)
    pad = ng * group - n
    xg = torch.nn.functional.pad(x, (0, pad)).view(rows, ng, group)
    rg = None
    if rand is not None:
        rg = torch.nn.functional.pad(rand, (0, pad)).view(rows, ng, group)
    encode = encode_signed if kind == "signed" else encode_square
    q, s = encode(xg, levels, rg)
    return q.view(rows, ng * group)[:, :n], s


def decode_groups(q: Tensor, scale: Tensor, group: int, levels: int, kind: str) -> Tensor:
    """Inverse of :func:`encode_groups`: codes ``[rows, n]`` and scales -> float32 ``[rows, n]``."""
    rows, n = q.shape
    ng = scale.shape[-1]
    qg = torch.nn.functional.pad(q, (0, ng * group - n)).view(rows, ng, group)
    decode = decode_signed if kind == "signed" else decode_square
    return decode(qg, scale, levels).view(rows, ng * group)[:, :n]


# ----------------------------------------------------------------------------- 4-bit packing
def pack4(nibbles: Tensor, pad: int) -> Tensor:
    """``[rows, n]`` values in ``[0, 15]`` -> uint8 ``[rows, ceil(n/2)]``: element ``2j`` in the
    low nibble of byte ``j``, ``2j + 1`` in the high one; an odd row ends with ``pad`` high."""
    rows, n = nibbles.shape
    if n % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1), value=pad)
    pairs = nibbles.reshape(rows, (n + 1) // 2, 2).to(torch.uint8)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack4(packed: Tensor, n: int) -> Tensor:
    """uint8 ``[rows, ceil(n/2)]`` -> int32 nibbles ``[rows, n]``."""
    b = packed.to(torch.int32)
    return torch.stack([b & 15, b >> 4], -1).flatten(-2)[:, :n]
