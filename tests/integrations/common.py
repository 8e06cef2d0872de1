"""What every integration test checks: the policy's levels in the optimizer's state, written
independently of foam_compile's own policy code so that a wrong level fails here."""

from __future__ import annotations

import math
import re

import torch

# The policy the README promises: embeddings, the output head and norms stay at level 0.
UNFOLDED = re.compile(r"embed|lm_head|^output\.|norm")


def expected_level(name: str, p: torch.Tensor, level: int = 2) -> int:
    return 0 if p.dim() < 2 or UNFOLDED.search(name) else level


def folded(shape, level: int) -> tuple[int, ...]:
    shape = tuple(shape)
    return shape if level == 0 else (*shape[:-1], math.ceil(shape[-1] / 2**level))


def check_levels(state_of, named_params, level: int = 2) -> dict[str, int]:
    """Each parameter's ``foam_level`` and moment shapes are the policy's; returns name -> level.

    ``state_of(p)`` is the parameter's optimizer state (one optimizer, or one per parameter).
    """
    seen = {}
    for name, p in named_params:
        st = state_of(p)
        want = expected_level(name, p, level)
        assert st.get("foam_level") == want, (
            f"{name}: foam_level {st.get('foam_level')}, want {want}"
        )
        for key in ("exp_avg", "exp_avg_sq"):
            assert tuple(st[key].shape) == folded(p.shape, want), (name, key, tuple(st[key].shape))
        seen[name] = want
    assert level in seen.values() and 0 in seen.values(), seen  # FOAM really folded something
    return seen
