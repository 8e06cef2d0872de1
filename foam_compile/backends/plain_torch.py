"""The plain-torch step backend: :func:`foam_compile.update.foam_update_` for any parameter.

It takes every device, dtype, level and state format: the fallback behind every fast path, and
under ``torch.compile`` the code Inductor fuses where no fast path applies. The state format
decodes each moment to float before the update and encodes it back after (for ``fp32`` both are
no-ops: the update writes the state tensors in place).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..hyper import Hyper
from ..state import StateFormat, format_of
from ..update import foam_update_, moments_of

__all__ = ["step_", "supports"]


def supports(p: Tensor, g: Tensor, level: int, fmt: StateFormat, hp: Hyper) -> str | None:
    return None


def step_(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict], hp: Hyper
) -> None:
    moments = moments_of(hp)
    for p, g, st in zip(params, grads, states):
        fmt = format_of(st)
        values = [fmt.decode(st, key, kind, p) for key, kind in moments]
        m, v, vmax = (*values, None)[:3]
        foam_update_(p, g, m, v, vmax, st["step"], st["foam_level"], hp)
        for (key, kind), value in zip(moments, values):
            fmt.write_(st, key, kind, value)
