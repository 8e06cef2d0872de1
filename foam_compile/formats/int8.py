"""``"int8"`` / ``"int8-sr"``: 8-bit folded moments, one float32 scale per 32 stored elements.

Bytes per stored (folded) element and moment: 1 + 4/32 = 1.125 against float32's 4, so a
parameter at level ``l`` keeps ``2.25 / 2**l`` bytes of Adam state per parameter element (AdamW:
8). The recipe, chosen by measurement (``benchmarks/quant_codecs.py``; table and reasons in
``benchmarks/RESULTS.md``): FlashOptim's companders (Ortiz et al., arXiv 2602.23349, Sec. 3.2)
with float32 scales instead of their float16 ones (float16 scales lose precision for small
gradients and, rounded up, stop following a shrinking group: accumulated ``v`` error 0.155
against 0.067 over 300 steps at beta2 = 0.999), and a positive ``v`` never coded as zero (Li et
al., arXiv 2309.01507: without it, heavy-tailed moments gave Adam directions off by 10**4).

The contract a kernel (Triton, C++) must meet bit for bit; all arithmetic float32, IEEE
correctly rounded (``/`` and ``sqrt`` included), ``rint`` = round half to even:

Layout. A moment of folded shape ``[..., n]`` (0-d: ``[1, 1]``; 1-d: ``[1, n]``) is cut, row by
row, into groups of ``G = 32`` consecutive elements; the last group of a row holds ``n % 32``
when that is not 0. State tensors: ``key`` (the codes, the moment's folded shape, ``int8`` for
``exp_avg``, ``uint8`` for ``exp_avg_sq`` and ``max_exp_avg_sq``) and ``key + "_scale"``
(``float32 [..., ceil(n / 32)]``, one per group, row-major like the codes).

``exp_avg`` (signed, ``L = 127``), for the values ``x`` of one group::

    s   = max(|x|)                         # the stored scale
    inv = 1 / s  if s > 0 else 0
    t   = x * inv                          # |t| <= 1
    y   = (t + t) / (1 + |t|)              # softsign compander
    q   = rint(y * 127)                    # in [-127, 127]; stored as int8
  decode:
    y = q / 127 ;  t = y / (2 - |y|) ;  x = t * s

``exp_avg_sq`` / ``max_exp_avg_sq`` (square, ``L = 255``)::

    u   = sqrt(max(x, 0))
    s   = max(u)                           # the stored scale (of sqrt(v))
    inv = 1 / s  if s > 0 else 0
    t   = u * inv
    q   = rint(t * 255) ; if q == 0 and u > 0: q = 1      # stored as uint8
  decode:
    u = (q / 255) * s ;  x = u * u

``"int8-sr"`` rounds stochastically where the step stores its moments (``write_``; fresh states
and migrations round to nearest). With ``r`` uniform in ``[0, 1)`` from
:func:`.codec.uniform` (the element's flat index in the moment, the step count being written,
salt 1 ``exp_avg``, 2 ``exp_avg_sq``, 3 ``max_exp_avg_sq``)::

    signed: q0 = clamp(floor(y * 127), -127, 126) ; a0, a1 = t of q0, q0 + 1 (decode above)
            q  = q0 + 1 if r < (t - a0) / (a1 - a0) else q0
    square: q0 = clamp(floor(t * 255), 0, 254) ; a0 = q0 / 255 ; a1 = (q0 + 1) / 255
            q  = q0 + 1 if r < (t * t - a0 * a0) / (a1 * a1 - a0 * a0) else q0
            (then the same "q == 0 and u > 0 -> 1" rule)

A NaN or inf in a group makes its scale NaN or inf, and the group decodes non-finite. Its codes
are still defined: a NaN ``q`` (a NaN element, or ``inf * 0`` where ``s`` is inf) stores 0,
before the square's rule (so an inf ``v`` decodes inf, as the square's finite positive values do).

so ``E[decoded] = x``: unbiased in the moment's own domain, which keeps an EMA whose per-step
change is below a code step moving (the staleness of arXiv 2603.16731; ``tests/formats/``).
The pure-torch reference of one group is :func:`.codec.encode_signed` /
:func:`.codec.decode_signed` / :func:`.codec.encode_square` / :func:`.codec.decode_square`.
"""

from __future__ import annotations

from ..state import register
from .grouped import GroupedFormat

__all__ = ["GROUP", "INT8", "INT8_SR", "LEVELS"]

GROUP = 32
LEVELS = {"signed": 127, "square": 255}

INT8 = register(GroupedFormat("int8", 8, GROUP, LEVELS))
INT8_SR = register(GroupedFormat("int8-sr", 8, GROUP, LEVELS, stochastic=True))
