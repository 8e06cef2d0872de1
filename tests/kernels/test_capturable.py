"""The grouped launcher's steady state: nothing allocated, copied or synchronised, CUDA-graph safe.

Launches are stubbed (``launch_stubs``): what is tested is the host side, i.e. what a
``torch.cuda.graph`` capture or ``torch.compile(mode="reduce-overhead")`` would record around
the kernels. Every aten op the launcher runs is logged with a dispatch mode; after the first
step of a set of tensors there must be none (no table rebuild, no copy, no gather of step
counters), and a step whose gradients moved runs exactly one host-to-device copy per group.
The real CUDA-graph test is in ``test_gpu.py``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from foam_compile.kernels import foam_adam, plan_cache, plans, tile, tuning  # noqa: E402
from tests.kernels.launch_stubs import (  # noqa: E402
    LLAMA_1B,
    AtenLog,
    llama_shapes,
    make_group,
    stub_launches,
)


@pytest.fixture(autouse=True)
def fresh_plans():
    plan_cache.clear()
    yield
    plan_cache.clear()


def step(params, grads, ms, vs, steps, levels, **kw):
    foam_adam.foam_adam_grouped_(params, grads, ms, vs, None, steps, levels, lr=1e-3, **kw)


def test_llama_1b_steady_state_runs_no_aten_op(monkeypatch):
    """219 parameters of LLaMA-1B (meta tensors: real shapes, no memory): the first step builds
    tables and copies them; every later step runs no aten op at all, in 3 launches."""
    stubs = stub_launches(monkeypatch)
    shapes = llama_shapes(**LLAMA_1B)
    assert len(shapes) == 219
    group = make_group(shapes)
    first = AtenLog()
    with first:
        step(*group)
    assert any("copy" in op for op in first.ops)  # the tables went to the device once
    assert len(stubs["multi"].calls) == 3  # level 2 even, level 2 ragged (down_proj), level 0
    for _ in range(3):
        log = AtenLog()
        with log:
            step(*group)
        assert log.ops == []
    assert len(stubs["multi"].calls) == 12
    plan = plan_cache.cached()[0]
    assert sum(g.slots.fills for g in plan.groups) == 3  # one pointer table per group, once


def test_moved_gradients_cost_one_copy_per_group_and_no_allocation(monkeypatch):
    """New gradient tensors (zero_grad(set_to_none=True)) at new addresses: the pointer table is
    refreshed by one copy into a preallocated slot; shape tables are not rebuilt."""
    stub_launches(monkeypatch)
    shapes = [((8, 64), 2), ((8, 61), 2), ((33,), 0)]  # even, ragged, level 0: three groups
    params, grads, ms, vs, steps, levels = make_group(shapes, device="cpu")
    step(params, grads, ms, vs, steps, levels)
    plan = plan_cache.cached()[0]
    tables = [(g.tables.meta, g.tables.chunks) for g in plan.groups]
    new_grads = [torch.empty_like(g) for g in grads]
    log = AtenLog()
    with log:
        step(params, new_grads, ms, vs, steps, levels)
    assert sorted(log.ops) == ["aten.copy_.default"] * 3, log.ops
    assert [(g.tables.meta, g.tables.chunks) for g in plan.groups] == tables
    log = AtenLog()
    with log:  # the old gradients' addresses are still in a slot: nothing to do
        step(params, grads, ms, vs, steps, levels)
    assert log.ops == []


def test_device_steps_are_read_through_the_pointer_table(monkeypatch):
    """Step counters on the device: their addresses are in the table (column 5) and the kernel
    reads them; nothing stacks or copies them per step."""
    stubs = stub_launches(monkeypatch)
    params, grads, ms, vs, steps, levels = make_group([((4, 32), 2), ((4, 32), 2)], device="cpu")
    step(params, grads, ms, vs, steps, levels)
    call = stubs["multi"].calls[-1]
    assert call["kwargs"]["STEP_FROM_PTR"]
    ptrs = call["args"][0]
    assert ptrs[5].item() == steps[0].data_ptr() and ptrs[11].item() == steps[1].data_ptr()
    torch._foreach_add_(steps, 1)  # what functional.foam_adam_ does: one foreach op
    log = AtenLog()
    with log:
        step(params, grads, ms, vs, steps, levels)
    assert log.ops == []


BC1 = tile.HP_FIELDS.index("bc1")  # where the kernels' scalar tuple holds 1 - beta1**t


def test_host_steps_pass_bias_corrections_and_split_by_value(monkeypatch):
    stubs = stub_launches(monkeypatch)
    params, grads, ms, vs, _, levels = make_group([((4, 32), 2)] * 3, device="cpu")
    step(params, grads, ms, vs, [3.0, 3.0, 3.0], levels)
    assert len(stubs["multi"].calls) == 1
    assert not stubs["multi"].calls[0]["kwargs"]["STEP_FROM_PTR"]
    bc1 = stubs["multi"].calls[0]["kwargs"]["hp"][BC1]
    assert bc1 == pytest.approx(1 - 0.9**3)
    step(params, grads, ms, vs, [3.0, 7.0, 3.0], levels)  # a parameter that joined earlier
    assert len(stubs["multi"].calls) == 3
    assert sorted(c["kwargs"]["hp"][BC1] for c in stubs["multi"].calls[1:]) == pytest.approx(
        sorted([1 - 0.9**3, 1 - 0.9**7])
    )


def test_a_cached_plan_still_rejects_changed_metadata(monkeypatch):
    """The plan cache is keyed by every fact the checks read: a changed tensor is re-checked."""
    stub_launches(monkeypatch)
    params, grads, ms, vs, steps, levels = make_group([((4, 32), 2)], device="cpu")
    step(params, grads, ms, vs, steps, levels)
    with pytest.raises(ValueError, match="exp_avg has shape"):
        step(params, grads, [torch.zeros(4, 9)], vs, steps, levels)
    with pytest.raises(ValueError, match="contiguous"):
        step(params, [torch.zeros(32, 4).t()], ms, vs, steps, levels)
    with pytest.raises(ValueError, match="exp_avg_sq must be float32"):
        step(params, grads, ms, [vs[0].double()], steps, levels)
    with pytest.raises(ValueError, match="level"):
        step(params, grads, ms, vs, steps, [11])
    with pytest.raises(ValueError, match="level"):
        step(params, grads, ms, vs, steps, [True])  # == 1, but a bool is not a level


def _capturing(monkeypatch, on: bool):
    monkeypatch.setattr(plans, "capturing", lambda device: on)


def test_no_plan_is_built_during_a_capture(monkeypatch):
    stub_launches(monkeypatch)
    group = make_group([((4, 32), 2)], device="cpu")
    _capturing(monkeypatch, True)
    with pytest.raises(RuntimeError, match="run one step eagerly before capturing"):
        step(*group)
    _capturing(monkeypatch, False)
    step(*group)
    _capturing(monkeypatch, True)
    step(*group)  # built outside: fine inside


def test_host_steps_are_refused_inside_a_capture(monkeypatch):
    """A host step's bias correction would be baked into the graph: refused, for both
    launchers; device counters are fine."""
    stub_launches(monkeypatch)
    params, grads, ms, vs, steps, levels = make_group([((4, 32), 2)], device="cpu")
    step(params, grads, ms, vs, [3.0], levels)
    step(params, grads, ms, vs, steps, levels)
    _capturing(monkeypatch, True)
    with pytest.raises(RuntimeError, match="capturable=True"):
        step(params, grads, ms, vs, [3.0], levels)
    with pytest.raises(RuntimeError, match="capturable=True"):
        foam_adam.foam_adam_step_(params[0], grads[0], ms[0], vs[0], lr=1e-3, step=3, level=2)
    step(params, grads, ms, vs, steps, levels)


def test_captured_pointer_slots_are_never_reused(monkeypatch):
    """A miss inside a capture takes a spare slot (nothing pending on it, no event to wait on);
    every slot a capture reads is kept for the graph's life, and eager misses afterwards take
    other slots, adding some when all are kept."""
    stub_launches(monkeypatch)
    params, grads, ms, vs, steps, levels = make_group([((4, 32), 2)], device="cpu")
    step(params, grads, ms, vs, steps, levels)
    slots = plan_cache.cached()[0].groups[0].slots
    eager_slot = slots.by_addrs[next(iter(slots.by_addrs))]
    _capturing(monkeypatch, True)
    step(params, grads, ms, vs, steps, levels)  # a hit: its slot is now kept
    captured_grads = [torch.empty_like(grads[0])]
    step(params, captured_grads, ms, vs, steps, levels)  # a miss: a spare slot
    spare_left = len(slots.spare)
    _capturing(monkeypatch, False)
    assert eager_slot in slots.captured and len(slots.captured) == 2 and spare_left == 1
    kept = {i: slots.rows[i].clone() for i in slots.captured}
    keep = []
    for _ in range(2 * len(slots.rows)):  # churn: many new gradient addresses
        keep.append([torch.empty_like(grads[0])])
        step(params, keep[-1], ms, vs, steps, levels)
    for i, row in kept.items():
        assert torch.equal(slots.rows[i], row) and slots.by_addrs[slots.addrs[i]] == i
    assert len(slots.spare) == 1  # eager misses never take a spare slot


def test_spare_slots_run_out_with_a_clear_error(monkeypatch):
    stub_launches(monkeypatch)
    params, grads, ms, vs, steps, levels = make_group([((4, 32), 2)], device="cpu")
    step(params, grads, ms, vs, steps, levels)
    _capturing(monkeypatch, True)
    keep = []
    with pytest.raises(RuntimeError, match="run an eager step with the tensors"):
        for _ in range(3):
            keep.append([torch.empty_like(grads[0])])
            step(params, keep[-1], ms, vs, steps, levels)


def test_pointer_slots_grow_when_every_slot_is_captured():
    slots = plans.PointerSlots(6, torch.device("cpu"), n_slots=2, n_spare=0)
    slots.captured.update({0, 1})
    slots.addrs[:] = [(1,) * 6, (2,) * 6]
    slots.by_addrs.update({(1,) * 6: 0, (2,) * 6: 1})
    row, aligned = slots.get((16, 32, 48, 64, 80, 4))
    assert len(slots.rows) == 3 and row.tolist() == [16, 32, 48, 64, 80, 4]
    assert aligned  # the step column (4) does not need 16-byte alignment
    assert not slots.get((16, 32, 48, 64, 81, 4))[1]


def test_no_tuning_inside_a_capture(monkeypatch):
    """Timing a config allocates and launches: never while capturing (the default config runs
    and tuning happens at the next eager step)."""
    stub_launches(monkeypatch)
    monkeypatch.setattr(tuning, "autotune_enabled", lambda: True)
    tuned = []
    monkeypatch.setattr(
        foam_adam, "_tune_multi", lambda g, hp, b: (tuned.append(b), ((2048, 8), {}))[1]
    )
    group = make_group([((4, 32), 2)], device="cpu")
    monkeypatch.setattr(plan_cache, "lookup", _plan_outside_capture(monkeypatch))
    _capturing(monkeypatch, True)
    step(*group)
    assert tuned == []
    _capturing(monkeypatch, False)
    step(*group)
    assert len(tuned) == 1
    step(*group)
    assert len(tuned) == 1  # once per key


def _plan_outside_capture(monkeypatch):
    real = plan_cache.lookup

    def get(*args):
        with monkeypatch.context() as m:
            m.setattr(plans, "capturing", lambda device: False)
            return real(*args)

    return get
