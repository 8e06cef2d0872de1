"""``"int4"`` / ``"int4-sr"``: 4-bit folded moments, one float32 scale per 32 stored elements.

Bytes per stored (folded) element and moment: 1/2 + 4/32 = 0.625 (a row of odd length rounds
its codes up to a whole byte), so a parameter at level ``l`` keeps ``1.25 / 2**l`` bytes of Adam
state per parameter element (AdamW: 8). The arithmetic is :mod:`.int8`'s with fewer levels (the
recipe that measured best at 4 bits too; ``benchmarks/RESULTS.md``): ``L = 7`` for ``exp_avg``
(codes ``-7..7``) and ``L = 15`` for ``exp_avg_sq`` / ``max_exp_avg_sq`` (codes ``0..15``), same
group layout (``G = 32``, float32 scales ``key + "_scale"``), same rounding, same stochastic
variant (``"int4-sr"``) with the same random numbers.

Packing, the only difference in layout: the codes tensor ``key`` is ``uint8 [..., ceil(n / 2)]``;
element ``2j`` of a row is the low nibble of byte ``j`` and element ``2j + 1`` the high nibble; a
row of odd length ends with a padding nibble equal to the code of 0. A nibble holds ``q + 8`` for
``exp_avg`` (so ``1..15``) and ``q`` for the squares (``0..15``). Unpacked::

    lo = b & 15 ; hi = b >> 4 ; q = nibble - 8 (exp_avg) or nibble (squares)

Pure-torch references: :func:`.codec.pack4` / :func:`.codec.unpack4` and the group functions
of :mod:`.codec`.
"""

from __future__ import annotations

from ..state import register
from .grouped import GroupedFormat

__all__ = ["GROUP", "INT4", "INT4_SR", "LEVELS"]

GROUP = 32
LEVELS = {"signed": 7, "square": 15}

INT4 = register(GroupedFormat("int4", 4, GROUP, LEVELS))
INT4_SR = register(GroupedFormat("int4-sr", 4, GROUP, LEVELS, stochastic=True))
