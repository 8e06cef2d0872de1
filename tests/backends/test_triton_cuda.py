"""The Triton backend against ``reference_step``: its ``step_`` (the grouped op), the one-tensor
op, and the ops' plain-torch fallback (float64, a level above the kernel's).

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py``), so shapes stay small; every kind of parameter is still there: partial last
blocks at each level, whole blocks, 3-d, 1-d and 0-d (level 0), empty, levels 0..8 and the
kernel's deepest, mixed float32/bfloat16/float16 in one group (one launch per dtype and level),
per-parameter step counts. Harness and tolerances: ``common.py``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from foam_compile.backends import triton_cuda  # noqa: E402
from foam_compile.hyper import op_kwargs  # noqa: E402
from foam_compile.kernels import MAX_LEVEL  # noqa: E402
from foam_compile.state import get_format  # noqa: E402

from .common import (  # noqa: E402
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

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EVERY_KIND = [
    ((5, 123), 2),
    ((2, 3, 13), 3),
    ((4, 33), 1),
    ((6, 16), 2),
    ((3, 7), 8),
    ((2, 40), MAX_LEVEL),
    ((6, 20), 0),
    ((37,), 3),
    ((), 2),
    ((0, 8), 2),
]


def mixed_specs() -> list[Spec]:
    """Every kind in float32; a few in bfloat16 and float16 (the interpreter is slow)."""
    out = specs(EVERY_KIND, F32)
    out += specs([((5, 123), 2), ((2, 3, 13), 3), ((37,), 0)], BF16, start_steps=(2,))
    out += specs([((4, 33), 1), ((6, 20), 0)], F16, start_steps=(5,))
    return out


def assert_takes_all(group) -> None:
    for p, g, st in zip(group.params, group.grads, group.states):
        reason = triton_cuda.supports(p, g, st["foam_level"], get_format("fp32"), group.foam_hp)
        assert reason is None, (tuple(p.shape), st["foam_level"], reason)


# Each option on its own is held to the model in tests/kernels/; here the backend's path:
# decoupled decay with a tensor lr, every option at once, rho = 0 without weight decay.
STEP_CASES = [("adamw", True), ("everything", False), ("no_residual", False)]


@pytest.mark.parametrize("option, lr_tensor", STEP_CASES, ids=str)
def test_step_matches_reference(option, lr_tensor):
    gen = generator("triton step_", option, lr_tensor)
    group = make_group(mixed_specs(), OPTIONS[option], gen, DEVICE, lr_tensor=lr_tensor)
    assert_takes_all(group)
    run_and_compare(eager(triton_cuda.step_), [group], gen, steps=2)


def _one_op(groups) -> None:
    """``foam::adam_step_`` per parameter, the step as a tensor (the kernel's own bias
    corrections) or as a number."""
    for group in groups:
        hp = group.foam_hp
        for i, (p, g, st) in enumerate(zip(group.params, group.grads, group.states)):
            as_tensor = i % 2 == 0
            torch.ops.foam.adam_step_(
                p,
                g,
                st["exp_avg"],
                st["exp_avg_sq"],
                st.get("max_exp_avg_sq"),
                float(st["step"]),
                st["step"] if as_tensor else None,
                st["foam_level"],
                **op_kwargs(hp),
            )


@pytest.mark.parametrize("option, lr_tensor", [("everything", True), ("scale_rho", False)])
def test_one_tensor_op_matches_reference(option, lr_tensor):
    gen = generator("triton adam_step_", option)
    group_specs = specs(EVERY_KIND[:6] + EVERY_KIND[7:], F32)
    group_specs += specs([((5, 123), 2)], BF16) + specs([((3, 7), 3)], F16)
    group = make_group(group_specs, OPTIONS[option], gen, DEVICE, lr_tensor=lr_tensor)
    run_and_compare(_one_op, [group], gen, steps=2)


def test_ops_fall_back_to_plain_torch_where_the_kernel_cannot():
    """float64 parameters and a level deeper than the kernel's run the plain-torch update inside
    the same ops, next to kernel-run parameters, and still match the reference."""
    gen = generator("triton fallback")
    group_specs = specs([((3, 13), 2), ((5,), 1), ((2, 3, 7), 3)], torch.float64)
    group_specs += specs([((2, 5000), MAX_LEVEL + 2), ((4, 33), 2)], F32)
    group = make_group(group_specs, OPTIONS["everything"], gen, DEVICE, lr_tensor=True)
    declined = [
        triton_cuda.supports(p, g, st["foam_level"], get_format("fp32"), group.foam_hp)
        for p, g, st in zip(group.params, group.grads, group.states)
    ]
    assert [why is not None for why in declined] == [True] * 4 + [False]
    assert "float32/bfloat16/float16" in declined[0] and f"0..{MAX_LEVEL}" in declined[3]
    run_and_compare(eager(triton_cuda.step_), [group], gen, steps=2)
    run_and_compare(_one_op, [group], gen, steps=1)
