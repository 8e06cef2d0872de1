"""The grouped launcher's plan cache: the fast guard finds a call's plan, and anything the checks
read that changed sends the call back to the key and the checks (launches stubbed)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from foam_compile.kernels import foam_adam, plan_cache  # noqa: E402
from tests.kernels.launch_stubs import make_group, stub_launches  # noqa: E402

SHAPES = [((4, 32), 2), ((4, 30), 2), ((9,), 0)]


@pytest.fixture(autouse=True)
def fresh_plans():
    plan_cache.clear()
    yield
    plan_cache.clear()


@pytest.fixture
def keys(monkeypatch):
    """Counts the calls that took the slow way (the Python key)."""
    calls = []
    real = plan_cache.call_key

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(plan_cache, "call_key", counted)
    return calls


def step(params, grads, ms, vs, steps, levels):
    foam_adam.foam_adam_grouped_(params, grads, ms, vs, None, steps, levels, lr=1e-3)


def test_steady_steps_take_the_guard(monkeypatch, keys):
    if plan_cache.TensorGuards is None:
        pytest.skip("this torch has no Dynamo tensor guards: keys only")
    stub_launches(monkeypatch)
    group = make_group(SHAPES, device="cpu")
    step(*group)
    assert len(keys) == 1 and plan_cache.cached()[0].guard is not None
    for _ in range(3):
        step(*group)
    params, grads, ms, vs, steps, levels = group
    step(params, [torch.randn_like(g) for g in grads], ms, vs, steps, levels)  # new gradients
    assert len(keys) == 1 and len(plan_cache.cached()) == 1


@pytest.mark.parametrize(
    "change",
    ["param dtype", "grad shape", "grad strides", "grad device", "requires_grad", "level"],
)
def test_a_changed_fact_misses_the_guard_and_is_planned_again(monkeypatch, keys, change):
    """The same state lists (the guard's hint hits), one fact changed: a new plan, whose launch
    sees the new fact, or the checks' error; never the old plan."""
    stubs = stub_launches(monkeypatch)
    params, grads, ms, vs, steps, levels = make_group(SHAPES, device="cpu")
    step(params, grads, ms, vs, steps, levels)
    params, grads, levels = list(params), list(grads), list(levels)
    if change == "param dtype":
        params[0] = params[0].bfloat16()
        step(params, grads, ms, vs, steps, levels)
        assert {c["kwargs"]["P_DTYPE"] for c in stubs["multi"].calls[-3:]} >= {
            foam_adam._TL_DTYPE[torch.bfloat16]
        }
    elif change == "grad shape":
        grads[0] = torch.randn(4, 31)
        with pytest.raises(ValueError, match="grad"):
            step(params, grads, ms, vs, steps, levels)
    elif change == "grad strides":
        grads[0] = torch.randn(32, 4).t()
        with pytest.raises(ValueError, match="contiguous"):
            step(params, grads, ms, vs, steps, levels)
    elif change == "grad device":
        grads[0] = torch.empty(4, 32, device="meta")
        with pytest.raises(ValueError, match="grad is on meta"):
            step(params, grads, ms, vs, steps, levels)
    elif change == "requires_grad":
        params[0] = params[0].clone().requires_grad_()
        step(params, grads, ms, vs, steps, levels)  # a fact the guard reads, not the checks
    elif change == "level":
        levels[2] = True  # == 0 as an int, but a bool is refused
        with pytest.raises(ValueError, match="level"):
            step(params, grads, ms, vs, steps, levels)
    assert len(keys) == 2


def test_number_steps_never_take_the_guard(monkeypatch, keys):
    """Host numbers as steps are keyed by type; the guard checks tensors only."""
    stub_launches(monkeypatch)
    params, grads, ms, vs, _, levels = make_group(SHAPES, device="cpu")
    step(params, grads, ms, vs, [1.0] * 3, levels)
    step(params, grads, ms, vs, [2.0] * 3, levels)
    assert len(keys) == 2 and len(plan_cache.cached()) == 1
    assert plan_cache.cached()[0].guard is None


def test_evicted_plans_leave_no_hint(monkeypatch):
    stub_launches(monkeypatch)
    monkeypatch.setattr(plan_cache, "CACHE_SIZE", 2)
    groups = [make_group([((4, 32 * (k + 1)), 2)], device="cpu") for k in range(4)]
    for group in groups:
        step(*group)
    assert len(plan_cache.cached()) == 2
    live = {id(p) for p in plan_cache.cached()}
    assert all(id(p) in live for p in plan_cache._hints.values())
