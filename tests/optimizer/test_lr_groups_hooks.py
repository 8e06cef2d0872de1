"""Learning rates (tensor, schedulers), param groups, zero_grad, step hooks and closures."""

from __future__ import annotations

import math

import pytest
import torch
from float64_model import (
    F64,
    Hyper,
    ParamModel,
    assert_param_matches,
    assert_state_matches,
    model_folded_shape,
    model_level,
    param_tolerance,
    unit_roundoff,
)
from torch import nn

from foam_compile import FOAM

from .common import (
    OPTIONS,
    assert_unchanged,
    generator,
    new_grads,
    param,
    randn,
    set_grads,
    snapshot,
    twin,
)


# ------------------------------------------------------------ (5) lr, schedulers, groups
@pytest.mark.parametrize("level", [0, 2])
def test_tensor_lr_equals_float_lr(level):
    hp = OPTIONS["amsgrad"]
    gen = generator("tensor-lr", level)
    a = param((4, 37), gen)
    b = twin(a)
    kw = hp.foam_kwargs()
    opt_a = FOAM([a], level=level, **kw)
    opt_b = FOAM([b], level=level, **dict(kw, lr=torch.tensor(hp.lr)))
    model = ParamModel.create(a, level)
    for t in range(5):
        (g,) = new_grads([a], gen, t)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        model.step(g, hp)
    assert isinstance(opt_b.param_groups[0]["lr"], torch.Tensor)
    assert_param_matches(a, model)
    assert_param_matches(b, model)


@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("level", [0, 3])
def test_lambda_lr_scheduler_changes_the_step(level, tensor_lr):
    hp = Hyper(lr=2e-2)
    gen = generator("lambda", level, tensor_lr)
    p = param((3, 13), gen)
    base = torch.tensor(hp.lr) if tensor_lr else hp.lr
    opt = FOAM([p], level=level, **dict(hp.foam_kwargs(), lr=base))
    factor = lambda t: 1.0 / (1 + t) ** 2  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model = ParamModel.create(p, level)
    unscheduled = ParamModel.create(p, level)
    for t in range(5):
        lr_t = float(opt.param_groups[0]["lr"])
        assert lr_t == pytest.approx(hp.lr * factor(t), rel=4 * unit_roundoff(torch.float32))
        (g,) = new_grads([p], gen, t)
        p.grad = g
        opt.step()
        sched.step()
        model.step(g, hp, lr=lr_t)
        unscheduled.step(g, hp)
    assert_param_matches(p, model)
    # The schedule really reached the update: the unscheduled weights are far outside tolerance.
    tol = param_tolerance(model, torch.float32)
    assert ((p.detach().to(F64) - unscheduled.p).abs() > 10 * tol).any()


def test_cosine_annealing_scheduler():
    hp = Hyper(lr=5e-2, betas=(0.9, 0.95))
    gen = generator("cosine")
    ps = [param((4, 37), gen), param((37,), gen)]
    opt = FOAM(ps, level=2, **hp.foam_kwargs())
    T, eta_min = 6, 1e-3
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=T, eta_min=eta_min)
    models = [ParamModel.create(p, 2) for p in ps]
    for t in range(T):
        lr_t = opt.param_groups[0]["lr"]
        closed_form = eta_min + (hp.lr - eta_min) * (1 + math.cos(math.pi * t / T)) / 2
        assert lr_t == pytest.approx(closed_form, rel=1e-9)
        grads = new_grads(ps, gen, t)
        set_grads(ps, grads)
        opt.step()
        sched.step()
        for m, g in zip(models, grads):
            m.step(g, hp, lr=lr_t)
    for p, m in zip(ps, models):
        assert_param_matches(p, m)


def test_add_param_group_with_its_own_level_and_scale():
    # Groups of 2, 1 and 3 parameters (see test_two_param_groups_of_equal_size for equal sizes).
    gen = generator("groups")
    hp = Hyper()
    g0 = [param((4, 37), gen), param((2, 3, 13), gen)]
    g1 = [param((4, 37), gen)]
    g2 = [param((4, 37), gen), param((37,), gen), param((), gen)]
    opt = FOAM(g0, level=2, **hp.foam_kwargs())
    opt.add_param_group({"params": g1, "level": 5, "scale": 0.5, "res_scale": 0.25})
    opt.add_param_group({"params": g2, "level": 0, "amsgrad": True})
    assert [g["level"] for g in opt.param_groups] == [2, 5, 0]
    assert opt.param_groups[1]["lr"] == hp.lr  # defaults fill the rest
    hps = [hp, Hyper(scale=0.5, res_scale=0.25), Hyper(amsgrad=True)]
    levels = [2, 5, 0]
    params = g0 + g1 + g2
    group_of = [0, 0, 1, 2, 2, 2]
    models = [ParamModel.create(p, levels[gi]) for p, gi in zip(params, group_of)]
    for t in range(4):
        grads = new_grads(params, gen, t)
        set_grads(params, grads)
        opt.step()
        for m, g, gi in zip(models, grads, group_of):
            m.step(g, hps[gi])
    for p, m, gi in zip(params, models, group_of):
        assert opt.state[p]["foam_level"] == model_level(p.shape, levels[gi])
        assert opt.state[p]["exp_avg"].shape == model_folded_shape(p.shape, m.level)
        assert_param_matches(p, m)
        assert_state_matches(opt.state[p], m, amsgrad=hps[gi].amsgrad)


def test_two_param_groups_of_equal_size():
    """The common recipe: folded weights in one group, biases at level 0 in another."""
    gen = generator("two-groups")
    w, b = param((4, 37), gen), param((37,), gen)
    opt = FOAM([{"params": [w], "level": 2}, {"params": [b], "level": 0, "weight_decay": 0.0}])
    models = [ParamModel.create(w, 2), ParamModel.create(b, 0)]
    hps = [Hyper(lr=1e-3), Hyper(lr=1e-3, weight_decay=0.0)]
    for t in range(3):
        grads = new_grads([w, b], gen, t)
        set_grads([w, b], grads)
        opt.step()
        for m, g, hp in zip(models, grads, hps):
            m.step(g, hp)
    for p, m in zip([w, b], models):
        assert_param_matches(p, m)


def test_param_groups_accept_generators():
    """``model.parameters()`` is a generator; param groups built from one keep their params."""
    lin1, lin2 = nn.Linear(8, 5), nn.Linear(5, 3)
    opt = FOAM([{"params": lin1.parameters(), "level": 2}])
    assert len(opt.param_groups[0]["params"]) == 2
    opt.add_param_group({"params": lin2.parameters(), "level": 0})
    assert len(opt.param_groups[1]["params"]) == 2
    assert len(FOAM(lin1.parameters()).param_groups[0]["params"]) == 2


def test_zero_grad_and_grad_none_params_are_skipped():
    gen = generator("zero-grad")
    hp = Hyper()
    a, b, c = param((4, 37), gen), param((3, 5), gen), param((5,), gen)
    opt = FOAM([a, b, c], level=2, **hp.foam_kwargs())
    model = ParamModel.create(a, 2)
    b_before, c_before = b.detach().clone(), c.detach().clone()
    for t in range(3):
        (g,) = new_grads([a], gen, t)
        a.grad = g.clone()  # b and c have grad None
        opt.step()
        model.step(g, hp)
    assert_param_matches(a, model)
    assert torch.equal(b, b_before) and torch.equal(c, c_before)
    assert b not in opt.state and c not in opt.state

    opt.zero_grad()
    assert all(p.grad is None for p in (a, b, c))
    snap = snapshot(opt, [a, b, c])
    opt.step()  # nothing has a gradient: nothing moves
    assert_unchanged(snap, opt, [a, b, c])

    b.grad = torch.ones_like(b)
    opt.zero_grad(set_to_none=False)
    assert a.grad is None and torch.equal(b.grad, torch.zeros_like(b))

    (b.grad,) = new_grads([b], gen, 0)  # b starts its own state now, at step 1
    opt.step()
    assert float(opt.state[b]["step"]) == 1 and float(opt.state[a]["step"]) == 3


def test_step_hooks_fire_around_the_update():
    gen = generator("hooks")
    p = param((3, 13), gen)
    opt = FOAM([p], level=2)
    calls = []

    def pre(optimizer, args, kwargs):
        assert optimizer is opt
        calls.append(
            ("pre", p.detach().clone(), float(opt.state[p]["step"]) if p in opt.state else 0)
        )

    def post(optimizer, args, kwargs):
        assert optimizer is opt
        calls.append(("post", p.detach().clone(), float(opt.state[p]["step"])))

    h_pre, h_post = opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)
    for t in range(2):
        (p.grad,) = new_grads([p], gen, t)
        before = p.detach().clone()
        opt.step()
        kinds = [c[0] for c in calls[-2:]]
        assert kinds == ["pre", "post"]
        assert torch.equal(calls[-2][1], before) and calls[-2][2] == t
        assert torch.equal(calls[-1][1], p.detach()) and calls[-1][2] == t + 1
        assert not torch.equal(before, p.detach())
    h_pre.remove()
    h_post.remove()
    (p.grad,) = new_grads([p], gen, 2)
    opt.step()
    assert len(calls) == 4


def test_closure_is_called_with_grad_enabled():
    gen = generator("closure")
    p = param((3, 13), gen)
    x = randn((13,), gen)
    opt = FOAM([p], level=2)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = (p @ x).square().sum()
        loss.backward()
        return loss

    before = p.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert not torch.equal(before, p.detach())
