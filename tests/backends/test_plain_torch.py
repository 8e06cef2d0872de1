"""The plain-torch backend (``foam_update_`` for any parameter) against ``reference_step``.

It takes everything, so one group holds every kind of parameter: partial last blocks (123 and
5461 at level 2, 13 at level 3, 7 at level 8, 33 at level 1), whole blocks, 3-d, level 0, 1-d and
0-d (level 0 whatever is asked), and empty ones; every option, float and tensor ``lr``, and the
four dtypes it serves (float64 runs float64 math). Harness and tolerances: ``common.py``.
"""

from __future__ import annotations

import pytest
import torch

from foam_compile.backends import plain_torch

from .common import BF16, F16, F32, OPTIONS, eager, generator, make_group, run_and_compare, specs

EVERY_KIND = [
    ((5, 123), 2),
    ((2, 3, 13), 3),
    ((4, 33), 1),
    ((6, 16), 2),
    ((3, 7), 8),
    ((6, 20), 0),
    ((37,), 3),
    ((), 2),
    ((0, 8), 2),
    ((3, 0), 1),
]
DTYPES = [F32, BF16, F16, torch.float64]


# Every option with a float lr; a tensor lr (a float32 0-d tensor) where it enters the decay
# factor (decoupled decay) and where every option is on.
CASES = [(option, False) for option in OPTIONS] + [("adamw", True), ("everything", True)]


@pytest.mark.parametrize("option, lr_tensor", CASES, ids=str)
def test_plain_torch_matches_reference(option, lr_tensor):
    """One group: every kind of parameter in each dtype, plus n = 5461 at level 2."""
    gen = generator("plain_torch", option, lr_tensor)
    group_specs = [s for dtype in DTYPES for s in specs(EVERY_KIND, dtype)]
    group_specs += specs([((2, 5461), 2)], F32) + specs([((2, 5461), 2)], BF16, start_steps=(3,))
    group = make_group(group_specs, OPTIONS[option], gen, lr_tensor=lr_tensor)
    assert all(
        plain_torch.supports(p, g, st["foam_level"], None, group.foam_hp) is None
        for p, g, st in zip(group.params, group.grads, group.states)
    )
    run_and_compare(eager(plain_torch.step_), [group], gen, steps=3)
