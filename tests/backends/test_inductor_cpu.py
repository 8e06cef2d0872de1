"""The CPU backend (``foam::folded_update_``) against ``reference_step``: its op eager, and its
op compiled by Inductor through the hand-written lowering.

The backend takes folded parameters (levels 1..3, at least 2-d, not empty); the shapes here have
partial last blocks at every level (123, 13, 33, 7 and 5461 are no multiple of 2, 4 or 8), whole
blocks, a row shorter than one block and a 3-d tensor. The compiled test is one compile: one
function steps five groups (different options, dtypes and a tensor lr) of such parameters.
Harness and tolerances: ``common.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from foam_compile.backends import inductor_cpu
from foam_compile.state import get_format

from .common import (
    BF16,
    F16,
    F32,
    OPTIONS,
    Spec,
    eager,
    generator,
    make_group,
    run_and_compare,
    specs,
)

FOLDED = [
    ((5, 123), 2),
    ((2, 3, 13), 3),
    ((4, 33), 1),
    ((6, 16), 2),
    ((3, 7), 3),
    ((6, 1), 1),
]
DTYPES = [F32, BF16, F16, torch.float64]


def assert_takes_all(group) -> None:
    for p, g, st in zip(group.params, group.grads, group.states):
        reason = inductor_cpu.supports(p, g, st["foam_level"], get_format("fp32"), group.foam_hp)
        assert reason is None, (tuple(p.shape), st["foam_level"], reason)


@pytest.mark.parametrize(
    "option, lr_tensor", [(o, False) for o in OPTIONS] + [("adamw", True)], ids=str
)
def test_op_eager_matches_reference(option, lr_tensor):
    gen = generator("inductor_cpu eager", option, lr_tensor)
    group_specs = [s for dtype in DTYPES for s in specs(FOLDED, dtype)]
    group_specs += specs([((2, 5461), 2)], F32)
    group = make_group(group_specs, OPTIONS[option], gen, lr_tensor=lr_tensor)
    assert_takes_all(group)
    run_and_compare(eager(inductor_cpu.step_), [group], gen, steps=3)


def test_supports_says_why_not():
    hp = make_group([], OPTIONS["adamw"], generator("x")).foam_hp
    fp32 = get_format("fp32")
    p = torch.zeros(4, 8)
    assert inductor_cpu.supports(p, p, 2, fp32, hp) is None
    for q, level in [(p, 0), (p, inductor_cpu.MAX_LEVEL + 1), (torch.zeros(8), 2)]:
        assert "levels 1..3" in inductor_cpu.supports(q, q, level, fp32, hp)
    empty = torch.zeros(0, 8)
    assert inductor_cpu.supports(empty, empty, 2, fp32, hp) == "empty parameter"

    class Other(type(fp32)):
        name = "other"

    assert "state_format='other'" in inductor_cpu.supports(p, p, 2, Other(), hp)


# One compile of three parameters: each op call is two C++ loop nests, and Inductor compiles them
# slowly on small machines (``tests/test_functional_inductor.py`` compiles FOAM's whole step over
# more shapes). Every option but decoupled decay in the first group, decoupled decay with a
# tensor lr in the second; levels 1..3, partial last blocks, 3-d; float16 and float64 (bfloat16
# and float32 at level 2 are pinned there).
COMPILED_GROUPS = [
    ("everything", False, [Spec((2, 3, 13), 3, F16, 6), Spec((5, 123), 2, F32)]),
    ("adamw", True, [Spec((3, 37), 1, torch.float64, 1)]),
]


def test_op_compiled_by_inductor_matches_reference(fresh_dynamo):
    gen = generator("inductor_cpu compiled")
    groups = []
    for option, lr_tensor, group_specs in COMPILED_GROUPS:
        groups.append(make_group(group_specs, OPTIONS[option], gen, lr_tensor=lr_tensor))
    for group in groups:
        assert_takes_all(group)

    @torch.compile(fullgraph=True)
    def step_all():
        for group in groups:
            inductor_cpu.step_(group.params, group.grads, group.states, group.foam_hp)

    codes = []

    def step(_groups):
        if codes:
            step_all()
        else:
            codes.extend(run_and_get_code(step_all)[1])

    run_and_compare(step, groups, gen, steps=3)
    assert fresh_dynamo["stats"]["unique_graphs"] == 1
    # Inductor lowered every call of the op (its own loop nests), none runs as an extern kernel.
    call = "\n".join(code.split("def call")[1] for code in codes)
    assert "torch.ops.foam" not in call
