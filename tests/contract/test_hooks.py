"""torch.optim's hook contracts: step, state_dict and load_state_dict hooks, pre and post,
local and global, in torch's order; for FOAM at levels 0 and 2 and convert."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import Parameter
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)


def params_with_grads():
    g = torch.Generator().manual_seed(0)
    ps = [Parameter(torch.randn(3, 9, generator=g)), Parameter(torch.randn(3, generator=g))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    return ps


def test_step_hooks_run_in_torchs_order(subject):
    params = params_with_grads()
    opt = subject.build(params, lr=1e-2)
    calls = []

    def note(name):
        def hook(optimizer, args, kwargs):
            assert optimizer is opt
            steps = [float(opt.state[p]["step"]) if opt.state.get(p) else 0 for p in params]
            calls.append((name, steps[0]))

        return hook

    handles = [
        register_optimizer_step_pre_hook(note("global pre")),
        opt.register_step_pre_hook(note("pre")),
        opt.register_step_post_hook(note("post")),
        register_optimizer_step_post_hook(note("global post")),
    ]
    try:
        opt.step()
    finally:
        for h in handles:
            h.remove()
    # torch: global pre-hooks, then the optimizer's; the step; its post-hooks, then global ones.
    assert calls == [("global pre", 0), ("pre", 0), ("post", 1), ("global post", 1)]
    opt.step()
    assert len(calls) == 4  # removed hooks stay removed


def test_step_pre_hook_may_replace_the_arguments(subject):
    params = params_with_grads()
    opt = subject.build(params, lr=1e-2)
    seen = []
    # The hook sees the step's (args, kwargs), args[0] being the optimizer, and may replace them.
    opt.register_step_pre_hook(lambda o, args, kwargs: ((o,), {"closure": lambda: seen.append(1)}))
    opt.step()
    assert seen == [1]


def test_state_dict_hooks(subject):
    params = params_with_grads()
    opt = subject.build(params, lr=1e-2)
    opt.step()

    def pre(optimizer):
        optimizer.state["marker"] = 42  # torch's test: state the pre-hook adds is saved

    def post(optimizer, state_dict):
        state_dict["extra"] = state_dict["state"].pop("marker")
        return state_dict

    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["extra"] == 42 and "marker" not in sd["state"]
    assert set(sd["state"]) == {0, 1}


def test_load_state_dict_hooks_prepend_and_order(subject):
    params = params_with_grads()
    opt = subject.build(params, lr=1e-2)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    fresh = subject.build(params_with_grads(), lr=1e-2)
    calls = []

    def pre1(optimizer, state_dict):
        calls.append("pre1")
        state_dict["param_groups"][0]["lr"] = 0.002
        return state_dict

    def pre2(optimizer, state_dict):
        calls.append("pre2")
        state_dict["param_groups"][0]["lr"] = 0.003  # prepended: runs first, pre1 overrides

    def post(optimizer):
        calls.append("post")
        assert all("foam_level" in st for st in optimizer.state.values())

    fresh.register_load_state_dict_pre_hook(pre1)
    fresh.register_load_state_dict_pre_hook(pre2, prepend=True)
    fresh.register_load_state_dict_post_hook(post)
    fresh.load_state_dict(sd)
    assert calls == ["pre2", "pre1", "post"]
    assert fresh.param_groups[0]["lr"] == 0.002


def test_a_failed_load_runs_no_post_hook_and_changes_nothing(subject):
    params = params_with_grads()
    opt = subject.build(params, lr=1e-2)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg"] = torch.zeros(7, 7)  # fits no parameter
    before = copy.deepcopy(opt.state_dict())
    calls = []
    opt.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(sd)
    assert calls == []
    torch.testing.assert_close(opt.state_dict(), before, rtol=0, atol=0)


def test_hooks_registered_before_convert_keep_running():
    """convert changes the class: hooks the stock optimizer had keep firing."""
    import foam_compile

    params = params_with_grads()
    stock = torch.optim.AdamW(params, lr=1e-2)
    calls = []
    stock.register_step_pre_hook(lambda *a: calls.append("pre"))
    stock.register_step_post_hook(lambda *a: calls.append("post"))
    stock.register_load_state_dict_post_hook(lambda o: calls.append("load"))
    opt = foam_compile.convert(stock)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "load"]
