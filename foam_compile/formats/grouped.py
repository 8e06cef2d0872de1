"""Group-quantized state formats: codes and one float32 scale per group, along the stored last dim.

A moment of folded shape ``S = [..., nb]`` is viewed as ``[rows, nb]`` (a 0-d moment as
``[1, 1]``, a 1-d one as ``[1, nb]``) and cut into groups of ``group`` consecutive elements of a
row; the last group of a row may be short. Groups never cross a row, so a shard of the
parameter's leading dims (FSDP2's dim 0) holds whole groups. The state keeps, per moment ``key``:

* ``key``: the codes, shape ``S`` (int8 signed / uint8 square) at 8 bits, or ``[..., ceil(nb/2)]``
  uint8 at 4 bits (two codes a byte, see :func:`.codec.pack4`);
* ``f"{key}_scale"``: float32 ``[..., ceil(nb/group)]`` (0-d moments: ``[]``).

The codes' arithmetic is :mod:`.codec`; :mod:`.int8` and :mod:`.int4` hold the parameters and the
exact contract a kernel must meet. Nothing full-size outlives a step: the step decodes, updates
and re-encodes in place (:meth:`GroupedFormat.write_`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import distributed
from ..reference import effective_level, folded_shape
from ..state import StateFormat
from . import codec

__all__ = ["GroupedFormat", "SALTS"]

#: Per-moment salt of the stochastic rounding's random numbers (:func:`.codec.uniform`).
SALTS = {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 3}


def _ceil_div(a, b):
    # works for ints and for sympy expressions (-floor(-a/b) == ceiling(a/b))
    return -(-a // b)


class GroupedFormat(StateFormat):
    """``bits``-bit codes (8 or 4) in groups of ``group`` with a float32 absmax scale each.

    ``levels``: the largest code magnitude per kind (``signed``: codes ``-L..L``; ``square``:
    ``0..L``). ``stochastic``: :meth:`write_` (the step's store) rounds stochastically;
    :meth:`encode` (fresh states, migrations) always rounds to nearest.
    """

    parts = ("scale",)

    def __init__(self, name: str, bits: int, group: int, levels: dict, stochastic: bool = False):
        if bits not in (4, 8):
            raise ValueError(f"{name}: bits must be 4 or 8, got {bits}")
        self.name, self.bits, self.group = name, bits, group
        self.levels = dict(levels)
        self.stochastic = stochastic

    # ------------------------------------------------------------------------------ layout
    def code_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the codes tensor for a moment of folded ``shape``."""
        shape = tuple(shape)
        if self.bits == 8 or not shape:
            return shape
        return (*shape[:-1], _ceil_div(shape[-1], 2))

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = tuple(shape)
        return (*shape[:-1], _ceil_div(shape[-1], self.group)) if shape else ()

    def _code_dtype(self, kind: str) -> torch.dtype:
        return torch.int8 if self.bits == 8 and kind == "signed" else torch.uint8

    def _zero_code(self, kind: str) -> int:
        """The stored code of 0 (4-bit signed codes are offset by 8)."""
        return 8 if self.bits == 4 and kind == "signed" else 0

    # ------------------------------------------------------------------------ encode/decode
    def _codes_of(self, q: Tensor, kind: str) -> Tensor:
        """int32 codes ``[rows, n]`` -> the stored tensor (``[rows, n]`` or packed)."""
        if self.bits == 8:
            return q.to(self._code_dtype(kind))
        zero = self._zero_code(kind)
        return codec.pack4(q + zero, zero)

    def _q_of(self, codes: Tensor, n: int, kind: str) -> Tensor:
        """The stored tensor, as ``[rows, ...]`` -> int32 codes ``[rows, n]``."""
        if self.bits == 8:
            return codes.to(torch.int32)
        return codec.unpack4(codes, n) - self._zero_code(kind)

    def _encode2d(self, value: Tensor, kind: str, rand: Tensor | None = None):
        """float ``[..]`` of a folded shape -> ``(stored codes, scales)`` with those shapes."""
        shape = tuple(value.shape)
        x = value.to(torch.float32).reshape(*_rows_n(shape))
        if rand is not None:
            rand = rand.view(x.shape)
        q, s = codec.encode_groups(x, self.group, self.levels[kind], kind, rand)
        codes = self._codes_of(q, kind)
        return codes.reshape(self.code_shape(shape)), s.reshape(self.scale_shape(shape))

    def decode(self, state: dict, key: str, kind: str, p: Tensor) -> Tensor:
        # the folded shape comes from p and the level: 4-bit rows of odd length end in a pad
        shape = folded_shape(p.shape, effective_level(p.shape, state.get("foam_level", 0)))
        rows, n = _rows_n(shape)
        width = self.code_shape(shape)[-1] if shape else 1
        q = self._q_of(state[key].reshape(rows, width), n, kind)
        scale = state[f"{key}_scale"].reshape(rows, _ceil_div(n, self.group))
        x = codec.decode_groups(q, scale, self.group, self.levels[kind], kind)
        return x.reshape(shape).to(self.compute_dtype(p))

    def encode(self, value: Tensor, p: Tensor, key: str, kind: str) -> dict[str, Tensor]:
        _refuse_dtensor(self, p)
        codes, scale = self._encode2d(value, kind)
        return {key: codes, f"{key}_scale": scale}

    def write_(self, state: dict, key: str, kind: str, value: Tensor) -> None:
        rand = None
        if self.stochastic:
            salt = SALTS.get(key, 4)
            rand = codec.uniform(value.numel(), state["step"], salt, value.device)
        codes, scale = self._encode2d(value, kind, rand)
        state[key].copy_(codes)
        state[f"{key}_scale"].copy_(scale)

    def zeros(self, p: Tensor, level: int, key: str, kind: str) -> dict[str, Tensor]:
        _refuse_dtensor(self, p)
        shape = folded_shape(p.shape, level)
        fill = self._zero_code(kind) * (17 if self.bits == 4 else 1)  # both nibbles
        codes = torch.full(
            self.code_shape(shape), fill, dtype=self._code_dtype(kind), device=p.device
        )
        scale = torch.zeros(self.scale_shape(shape), dtype=torch.float32, device=p.device)
        return {key: codes, f"{key}_scale": scale}

    # ------------------------------------------------------------------------------- cost
    def moment_bytes(self, rows, blocks, itemsize):
        """Codes (``bits/8`` bytes an element, rounded up to whole bytes per row at 4 bits) plus
        a 4-byte scale per group; the parameter's dtype does not matter (``itemsize`` unused)."""
        code_bytes = blocks if self.bits == 8 else _ceil_div(blocks, 2)
        return rows * code_bytes + rows * _ceil_div(blocks, self.group) * 4

    def check(self, state: dict, key: str, p: Tensor, shape: tuple[int, ...]) -> str | None:
        want = {
            key: (self.code_shape(shape), self._code_dtype(_kind_of(key))),
            f"{key}_scale": (self.scale_shape(shape), torch.float32),
        }
        for k, (want_shape, dtype) in want.items():
            value = state.get(k)
            if not isinstance(value, Tensor):
                return f"({self.name} {k!r}) is {type(value).__name__}, not a tensor"
            if tuple(value.shape) != tuple(want_shape) or value.dtype != dtype:
                return (
                    f"({self.name} {k!r}) is {value.dtype} {list(value.shape)}, expected "
                    f"{dtype} {list(want_shape)}"
                )
        return None


def _kind_of(key: str) -> str:
    return "signed" if key == "exp_avg" else "square"


def _rows_n(shape) -> tuple[int, int]:
    """``(rows, n)`` of a folded shape: the last dim, and the product of the others."""
    return (_numel(shape[:-1]), shape[-1]) if shape else (1, 1)


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _refuse_dtensor(fmt: GroupedFormat, p: Tensor) -> None:
    if distributed.is_dtensor(p):
        raise NotImplementedError(
            f"FOAM: state_format={fmt.name!r} codes a DTensor's local shard only: call it "
            "through foam_compile.distributed.format_encode/format_decode/format_zeros, which "
            "place the codes and scales like the parameter."
        )
