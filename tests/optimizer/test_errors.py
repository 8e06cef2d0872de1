"""Bad input gets a clear error naming the parameter and the fix; a failed step or load
changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from foam_compile import FOAM

from .common import (
    assert_unchanged,
    generator,
    new_grads,
    param,
    randn,
    set_grads,
    snapshot,
    twin,
)


# ------------------------------------------------------------------- (8) error paths
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(level=-1), r"invalid level=-1; use an int in \[0, 16\]"),
        (dict(level=2.5), r"invalid level=2\.5"),
        (dict(level=2.0), r"invalid level=2\.0"),
        (dict(level=True), r"invalid level=True"),
        (dict(level=17), r"invalid level=17"),
        (dict(level="deep"), r"invalid level='deep'"),
        (dict(betas=(1.0, 0.999)), r"invalid betas\[0\]=1\.0; each beta must be in \[0, 1\)"),
        (dict(betas=(-0.1, 0.999)), r"invalid betas\[0\]=-0\.1"),
        (dict(betas=(0.9, 1.5)), r"invalid betas\[1\]=1\.5"),
        (dict(eps=-1e-8), r"invalid eps=-1e-08; use eps >= 0"),
        (dict(lr=-1e-3), r"invalid lr=-0\.001; use lr >= 0"),
        (dict(lr=float("nan")), r"invalid lr=nan"),
        (
            dict(lr=torch.tensor([1e-3, 1e-3])),
            r"lr as a tensor must have one element, got shape \[2\]",
        ),
        (dict(lr=torch.tensor(-1.0)), r"invalid lr=-1\.0"),
        (dict(weight_decay=-0.1), r"invalid weight_decay=-0\.1; use weight_decay >= 0"),
        (dict(scale=-1.0), r"invalid scale=-1\.0; use a finite number > 0"),
        (dict(scale=0.0), r"invalid scale=0\.0; use a finite number > 0"),
        (dict(scale=float("inf")), r"invalid scale=inf"),
        (dict(scale=float("nan")), r"invalid scale=nan"),
        (dict(res_scale=-0.5), r"invalid res_scale=-0\.5"),
    ],
    ids=lambda v: v if isinstance(v, str) else repr(v),
)
def test_constructor_rejects_bad_hyperparameters(kwargs, match):
    p = param((3, 5), generator("bad"))
    with pytest.raises(ValueError, match=r"FOAM: " + match):
        FOAM([p], **kwargs)


@pytest.mark.parametrize(
    "extra, match",
    [
        (dict(level=-2), r"invalid level=-2"),
        (dict(betas=(0.9, 1.0)), r"invalid betas\[1\]=1\.0"),
        (dict(lr=-1.0), r"invalid lr=-1\.0"),
        (dict(scale=-1.0), r"invalid scale=-1\.0"),
    ],
    ids=str,
)
def test_add_param_group_rejects_bad_hyperparameters(extra, match):
    gen = generator("bad-group")
    opt = FOAM([param((3, 5), gen)])
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [param((3, 5), gen)], **extra})
    assert len(opt.param_groups) == 1


def test_complex_params_are_rejected():
    gen = generator("complex")
    z = nn.Parameter(torch.randn(3, 4, dtype=torch.complex64, generator=gen))
    with pytest.raises(
        ValueError,
        match=r"parameter 1 of param group 0 \(shape \[3, 4\], dtype torch.complex64\) is complex",
    ):
        FOAM([param((3, 4), gen), z])
    opt = FOAM([param((3, 4), gen)])
    with pytest.raises(ValueError, match=r"is complex; FOAM folds real tensors only"):
        opt.add_param_group({"params": [z]})
    FOAM([torch.zeros(3, dtype=torch.long)])  # as torch.optim: accepted, never stepped (issue 14)


def test_sparse_gradient_is_rejected():
    gen = generator("sparse")
    a, b = param((3, 5), gen), param((4, 6), gen)
    opt = FOAM([a, b])
    a.grad = randn((3, 5), gen)
    b.grad = randn((4, 6), gen).to_sparse()
    with pytest.raises(
        RuntimeError, match=r"parameter 1 of param group 0 \(shape \[4, 6\].*has a sparse gradient"
    ):
        opt.step()


def test_state_from_another_optimizer_is_rejected():
    gen = generator("foreign")
    p = param((3, 8), gen)
    opt = FOAM([p])
    opt.state[p] = {
        "step": torch.tensor(1.0),
        "exp_avg": torch.zeros(3, 8),
        "exp_avg_sq": torch.zeros(3, 8),
    }
    p.grad = randn((3, 8), gen)
    with pytest.raises(
        RuntimeError, match=r"has no 'foam_level'; it was written by another optimizer"
    ):
        opt.step()


def test_state_of_wrong_shape_is_rejected_at_step():
    gen = generator("wrong-shape-step")
    p = param((3, 8), gen)
    opt = FOAM([p], level=2)
    p.grad = randn((3, 8), gen)
    opt.step()
    opt.state[p]["exp_avg"] = torch.zeros(3, 4)
    with pytest.raises(
        RuntimeError,
        match=r"exp_avg of parameter 0 of param group 0 \(shape \[3, 8\].*has shape \[3, 4\], "
        r"expected \[3, 2\] for level 2",
    ):
        opt.step()


def _foam_state_dict(shape, level, gen):
    p = param(shape, gen)
    opt = FOAM([p], level=level)
    p.grad = randn(shape, gen)
    opt.step()
    return opt.state_dict()


def test_load_state_dict_rejects_shapes_that_do_not_fit():
    gen = generator("sd-shape")
    sd = _foam_state_dict((4, 16), 2, gen)
    opt = FOAM([param((4, 20), gen)], level=2)
    with pytest.raises(
        ValueError,
        match=r"'exp_avg' of parameter 0 of param group 0 \(shape \[4, 20\].*has shape \[4, 4\], "
        r"expected \[4, 5\] \(folded at level 2\)\. Was the checkpoint saved for a different model "
        r"or fold level\?",
    ):
        opt.load_state_dict(sd)

    q = param((4, 16), gen)
    stock = torch.optim.AdamW([q])
    q.grad = randn((4, 16), gen)
    stock.step()
    with pytest.raises(
        ValueError, match=r"has shape \[4, 16\], expected \[4, 20\] \(a stock AdamW moment\)"
    ):
        opt.load_state_dict(stock.state_dict())


def test_load_state_dict_rejects_wrong_group_structure():
    gen = generator("sd-groups")
    sd = _foam_state_dict((4, 16), 2, gen)
    two = FOAM(
        [{"params": [param((4, 16), gen)]}, {"params": [param((4, 16), gen), param((5,), gen)]}]
    )
    with pytest.raises(ValueError, match=r"the checkpoint has 1 param groups, this optimizer 2"):
        two.load_state_dict(sd)
    more = FOAM([param((4, 16), gen), param((5,), gen)])
    with pytest.raises(
        ValueError, match=r"param group 0 has 1 parameters in the checkpoint and 2 here"
    ):
        more.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"expected a dict with 'state' and 'param_groups'"):
        more.load_state_dict({"state": {}})


def test_set_levels_rejects_unknown_tensor():
    gen = generator("set-levels-unknown")
    opt = FOAM([param((3, 8), gen)])
    with pytest.raises(
        ValueError, match=r"set_levels: a tensor of shape \[2, 2\] is not in this optimizer"
    ):
        opt.set_levels({torch.zeros(2, 2): 1})


@pytest.mark.parametrize("level", [-1, 2.5, "deep"], ids=repr)
def test_set_levels_rejects_bad_level(level):
    gen = generator("set-levels-bad")
    p = param((3, 8), gen)
    opt = FOAM([p], level=2)
    p.grad = randn((3, 8), gen)
    opt.step()
    snap = snapshot(opt, [p])
    with pytest.raises(ValueError, match=r"invalid level"):
        opt.set_levels({p: level})
    assert_unchanged(snap, opt, [p])


# --------------------------------------------------- (9) a failed step changes nothing
def _stepped(level=2, amsgrad=False, key=()):
    gen = generator("atomic", level, amsgrad, key)
    ps = [param((4, 37), gen), param((3, 13), gen), param((5,), gen)]
    opt = FOAM(ps, level=level, amsgrad=amsgrad)
    for t in range(2):
        set_grads(ps, new_grads(ps, gen, t))
        opt.step()
    set_grads(ps, new_grads(ps, gen, 2))
    return gen, ps, opt


def test_failed_step_sparse_grad_changes_nothing():
    gen, ps, opt = _stepped()
    ps[1].grad = ps[1].grad.to_sparse()
    snap = snapshot(opt, ps)
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()
    assert_unchanged(snap, opt, ps)


def test_failed_step_in_second_group_changes_first_group():
    gen = generator("atomic-groups")
    g0 = [param((4, 37), gen), param((3, 13), gen)]
    g1 = [param((5, 6), gen)]
    opt = FOAM([{"params": g0}, {"params": g1, "level": 0}])
    ps = g0 + g1
    set_grads(ps, new_grads(ps, gen, 0))
    opt.step()
    set_grads(ps, new_grads(ps, gen, 1))
    g1[0].grad = g1[0].grad.to_sparse()
    snap = snapshot(opt, ps)
    with pytest.raises(RuntimeError, match=r"parameter 0 of param group 1 .*sparse gradient"):
        opt.step()
    assert_unchanged(snap, opt, ps)


@pytest.mark.parametrize(
    "key, amsgrad", [("exp_avg", False), ("exp_avg_sq", False), ("max_exp_avg_sq", True)]
)
def test_failed_step_wrong_state_shape_changes_nothing(key, amsgrad):
    """Moments of the wrong shape (second parameter) must be caught before anything is written."""
    gen, ps, opt = _stepped(amsgrad=amsgrad, key=key)
    opt.state[ps[1]][key] = torch.zeros(3, 5)
    snap = snapshot(opt, ps)
    with pytest.raises(
        RuntimeError, match=rf"{key} of parameter 1 of param group 0 .*has shape \[3, 5\]"
    ):
        opt.step()
    assert_unchanged(snap, opt, ps)


def test_failed_load_state_dict_changes_nothing():
    gen, ps, opt = _stepped(key="load")
    sd = opt.state_dict()
    sd = {
        "state": {**sd["state"], 1: {**sd["state"][1], "exp_avg_sq": torch.zeros(3, 3)}},
        "param_groups": sd["param_groups"],
    }
    snap = snapshot(opt, ps)
    groups = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    )
    with pytest.raises(ValueError, match=r"'exp_avg_sq' of parameter 1 .*has shape \[3, 3\]"):
        opt.load_state_dict(sd)
    assert_unchanged(snap, opt, ps)
    assert groups == [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def test_failed_first_step_then_recovery_equals_clean_run():
    """A first step that fails leaves nothing that changes later steps."""
    gen = generator("recover")
    ps = [param((4, 37), gen), param((3, 13), gen)]
    qs = [twin(p) for p in ps]
    opt, clean = FOAM(ps, level=2, amsgrad=True), FOAM(qs, level=2, amsgrad=True)
    grads = new_grads(ps, gen, 0)
    ps[0].grad = grads[0].clone()
    ps[1].grad = grads[1].to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    for t in range(3):
        grads = new_grads(ps, gen, t + 1)
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        clean.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], clean.state[q]["exp_avg"])
        assert float(opt.state[p]["step"]) == float(clean.state[q]["step"]) == 3
