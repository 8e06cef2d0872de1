"""The plain-torch step backend: :func:`foam_compile.update.foam_update_` for any parameter.

It takes every device, dtype, level and state format: the fallback behind every fast path, and
under ``torch.compile`` the code Inductor fuses where no fast path applies. The state format
decodes each moment to float before the update and encodes it back after (for ``fp32`` both are
no-ops: the update writes the state tensors in place). A bfloat16/float16 parameter with
correction bits (``master_weights``) is stepped as its float32 weight: joined before the update,
split back into the parameter and its correction after (:mod:`foam_compile.master_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .. import master_weights
from ..hyper import Hyper
from ..state import StateFormat, format_of
from ..update import foam_update_, moments_of

__all__ = ["MASTER_WEIGHTS", "step_", "supports"]

#: This backend steps parameters with correction bits (see ``backends.select``).
MASTER_WEIGHTS = True


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
        rho = st.get(master_weights.RHO_KEY)
        theta = p if rho is None else master_weights.join(p, rho)
        foam_update_(theta, g, m, v, vmax, st["step"], st["foam_level"], hp)
        if rho is not None:
            master_weights.split_(theta, p, rho)
        for (key, kind), value in zip(moments, values):
            fmt.write_(st, key, kind, value)
