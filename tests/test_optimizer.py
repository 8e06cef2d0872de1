"""``foam_compile.FOAM`` against torch.optim.AdamW/Adam at level 0 and the float64 model elsewhere.

Every shape list holds a last dim that no block divides (partial last blocks); inputs are fresh
random tensors from a generator seeded by the test's own parameters. Tolerances come from the
dtypes' unit roundoff and the number of steps (``float64_model.param_tolerance``), except where a
fixed bound is the contract under test (level 0 == AdamW within 1e-6).
"""

from __future__ import annotations

import copy
import io
import math
import zlib

import pytest
import torch
from float64_model import (
    F64,
    Hyper,
    ParamModel,
    assert_param_matches,
    assert_state_matches,
    assert_within,
    model_fold,
    model_folded_shape,
    model_level,
    model_unfold,
    param_tolerance,
    unit_roundoff,
)
from torch import nn

from foam_compile import FOAM

BF16 = torch.bfloat16
GRAD_SCALES = (4.0, 1.0, 0.25, 2.0, 0.5)  # shrinking steps make amsgrad's max differ from v
# Last dims 5, 13, 37, 3 and 5461 leave a partial last block at every level >= 1 (3 is shorter
# than one block at level >= 2); 16 divides into whole blocks up to level 4 (the no-tail path).
SHAPES = [(3, 5), (2, 3, 13), (4, 37), (6, 3), (2, 16)]
OPTIONS = {
    "adamw": Hyper(),
    "coupled": Hyper(decoupled_weight_decay=False, weight_decay=0.1),
    "amsgrad": Hyper(amsgrad=True, weight_decay=0.1),
    "maximize": Hyper(maximize=True),
    "scale_rho": Hyper(scale=0.25, res_scale=0.5),
    "everything": Hyper(
        lr=3e-2,
        betas=(0.8, 0.95),
        weight_decay=0.05,
        decoupled_weight_decay=False,
        amsgrad=True,
        maximize=True,
        scale=0.25,
        res_scale=2.0,
    ),
}
# For bf16 weights: with coupled decay the bf16-rounded weight feeds back into the gradient, which
# the bf16 tolerance (one rounding per step, errors only added up) does not cover.
EVERYTHING_DECOUPLED = Hyper(
    lr=3e-2,
    betas=(0.8, 0.95),
    weight_decay=0.05,
    amsgrad=True,
    maximize=True,
    scale=0.25,
    res_scale=2.0,
)


# ------------------------------------------------------------------------------ helpers
def generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(shape, gen, dtype=torch.float32, std=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=F64) * std).to(dtype)


def param(shape, gen, dtype=torch.float32, std=1.0) -> nn.Parameter:
    return nn.Parameter(randn(shape, gen, dtype, std))


def twin(p: torch.Tensor) -> nn.Parameter:
    """An independent copy with the same strides (non-contiguous stays non-contiguous)."""
    return nn.Parameter(strided_copy(p.detach(), p))


def odd_params(gen, dtype=torch.float32) -> list[nn.Parameter]:
    """0-d, 1-d, 2-d, 3-d and three non-contiguous parameters."""
    ps = [
        param((), gen, dtype),
        param((7,), gen, dtype),
        param((5, 9), gen, dtype),
        param((2, 3, 5), gen, dtype),
        nn.Parameter(randn((9, 5), gen, dtype).t()),  # transposed
        nn.Parameter(randn((5, 2, 3), gen, dtype).permute(1, 2, 0)),  # permuted 3-d
        nn.Parameter(randn((4, 12), gen, dtype)[:, ::3]),  # strided slice
    ]
    assert [p.is_contiguous() for p in ps] == [True] * 4 + [False] * 3
    return ps


def new_grads(params, gen, t: int) -> list[torch.Tensor]:
    """Fresh gradients, laid out like their parameters (non-contiguous ones too)."""
    s = GRAD_SCALES[t % len(GRAD_SCALES)]
    return [strided_copy(randn(p.shape, gen, p.dtype) * s, p) for p in params]


def strided_copy(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(like.shape, like.stride(), dtype=x.dtype).copy_(x)


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = strided_copy(g, g)


def run(opt, params, models, hp: Hyper, steps: int, gen) -> None:
    """Step ``opt`` and the models on the same fresh gradients."""
    for t in range(steps):
        grads = new_grads(params, gen, t)
        set_grads(params, grads)
        opt.step()
        for model, g in zip(models, grads):
            model.step(g, hp)


def state_tensors(opt) -> dict:
    return {
        (i, k): v
        for i, p in enumerate(opt.param_groups[0]["params"])
        for k, v in opt.state[p].items()
        if isinstance(v, torch.Tensor)
    }


def snapshot(opt, params):
    state = {id(p): copy.deepcopy(dict(opt.state[p])) for p in params if p in opt.state}
    return [p.detach().clone() for p in params], state


def assert_unchanged(snap, opt, params) -> None:
    values, state = snap
    for i, (p, v) in enumerate(zip(params, values)):
        assert torch.equal(p.detach(), v), f"parameter {i} changed"
    assert {id(p) for p in params if p in opt.state and opt.state[p]} == set(state)
    for p in params:
        if id(p) not in state:
            continue
        before, now = state[id(p)], opt.state[p]
        assert set(before) == set(now), f"state keys changed: {set(before)} -> {set(now)}"
        for k, v in before.items():
            if isinstance(v, torch.Tensor):
                assert now[k].shape == v.shape and torch.equal(now[k], v), f"state {k!r} changed"
            else:
                assert now[k] == v, f"state {k!r} changed"


# ------------------------------------------------------- (1) level 0 is AdamW / Adam
ADAM_OPTIONS = {
    "wd": dict(weight_decay=0.1),
    "amsgrad": dict(weight_decay=0.1, amsgrad=True),
    "maximize": dict(weight_decay=0.1, maximize=True),
    "amsgrad_maximize": dict(weight_decay=0.01, amsgrad=True, maximize=True),
}


def _compare_with_stock(stock_cls, foam_kwargs, option, lr):
    gen = generator(stock_cls.__name__, option, lr)
    ps = odd_params(gen)
    qs = [twin(p) for p in ps]
    kw = dict(ADAM_OPTIONS[option], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    foam = FOAM(ps, **kw, **foam_kwargs)
    stock = stock_cls(qs, **kw)
    for t in range(10):
        grads = new_grads(ps, gen, t)
        set_grads(ps, grads)
        set_grads(qs, grads)
        foam.step()
        stock.step()
    for i, (p, q) in enumerate(zip(ps, qs)):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=lambda m, i=i: f"param {i}: {m}")
        assert p.stride() == q.stride()
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if kw.get("amsgrad") else ()):
            torch.testing.assert_close(foam.state[p][key], stock.state[q][key])
        assert float(foam.state[p]["step"]) == float(stock.state[q]["step"]) == 10


@pytest.mark.parametrize("lr", [1e-3, 1e-2, 1e-1])
@pytest.mark.parametrize("option", list(ADAM_OPTIONS))
def test_level0_equals_adamw(option, lr):
    _compare_with_stock(torch.optim.AdamW, dict(level=0), option, lr)


@pytest.mark.parametrize("lr", [1e-3, 1e-2, 1e-1])
@pytest.mark.parametrize("option", list(ADAM_OPTIONS))
def test_level0_coupled_decay_equals_adam(option, lr):
    _compare_with_stock(torch.optim.Adam, dict(level=0, decoupled_weight_decay=False), option, lr)


@pytest.mark.parametrize("option", ["wd", "amsgrad_maximize"])
def test_low_dim_params_at_level_2_equal_adamw(option):
    """0-d and 1-d parameters never fold, and FOAM's scale applies to folded parameters only."""
    gen = generator("lowdim", option)
    ps = [param((), gen), param((7,), gen), param((5461,), gen)]
    qs = [twin(p) for p in ps]
    kw = dict(ADAM_OPTIONS[option], lr=1e-3)
    foam = FOAM(ps, **kw, level=2, scale=0.25, res_scale=0.5)
    stock = torch.optim.AdamW(qs, **kw)
    for t in range(5):
        grads = new_grads(ps, gen, t)
        set_grads(ps, grads)
        set_grads(qs, grads)
        foam.step()
        stock.step()
    for p, q in zip(ps, qs):
        assert foam.state[p]["foam_level"] == 0
        assert foam.state[p]["exp_avg"].shape == p.shape
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


# -------------------------------------------------- (2) + (3) levels against the model
def _model_run(shape, level, hp, dtype, steps, key=(), std=1.0):
    gen = generator(shape, level, dtype, steps, key)
    p = param(shape, gen, dtype, std)
    model = ParamModel.create(p, level)
    opt = FOAM([p], level=level, **hp.foam_kwargs())
    run(opt, [p], [model], hp, steps, gen)
    return p, opt, model


@pytest.mark.parametrize("level", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
def test_levels_match_model(dtype, shape, level):
    std = 0.1 if dtype == BF16 else 1.0  # small bf16 weights: the update is many ulps
    p, opt, model = _model_run(shape, level, OPTIONS["adamw"], dtype, steps=5, std=std)
    state = opt.state[p]
    assert p.dtype == dtype and state["exp_avg"].dtype == torch.float32
    assert state["foam_level"] == level
    assert_param_matches(p, model)
    assert_state_matches(state, model, amsgrad=False)


@pytest.mark.parametrize("level", [2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
def test_partial_block_5461_matches_model(dtype, level):
    hp = OPTIONS["everything"] if dtype == torch.float32 else EVERYTHING_DECOUPLED
    p, opt, model = _model_run((2, 5461), level, hp, dtype, steps=4, std=0.1)
    assert opt.state[p]["exp_avg"].shape == (2, math.ceil(5461 / 2**level))
    assert_param_matches(p, model)
    assert_state_matches(opt.state[p], model, amsgrad=True)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape, level", [((4, 37), 2), ((2, 3, 13), 3), ((6, 3), 8)], ids=str)
def test_options_match_model(option, shape, level):
    hp = OPTIONS[option]
    p, opt, model = _model_run(shape, level, hp, torch.float32, steps=6, key=option)
    assert_param_matches(p, model)
    assert_state_matches(opt.state[p], model, amsgrad=hp.amsgrad)


@pytest.mark.parametrize("option", ["adamw", "amsgrad", "maximize", "scale_rho"])
@pytest.mark.parametrize(
    "shape, level", [((4, 37), 0), ((4, 37), 2), ((6, 3), 3), ((7,), 2)], ids=str
)
def test_bfloat16_params_within_bf16_rounding_of_model(option, shape, level):
    """bf16 parameters, float32 state: off the float64 model by at most one bf16 rounding per step
    (plus float32 noise), summed over the steps; ``param_tolerance`` derives it from bf16's eps."""
    hp = OPTIONS[option]
    p, opt, model = _model_run(shape, level, hp, BF16, steps=10, key=option, std=0.1)
    assert p.dtype == BF16
    assert all(v.dtype == torch.float32 for k, v in opt.state[p].items() if k != "foam_level")
    assert_param_matches(p, model)
    assert_state_matches(opt.state[p], model, amsgrad=hp.amsgrad)


@pytest.mark.parametrize("shape, level", [((4, 37), 0), ((4, 37), 2), ((2, 3, 13), 8)], ids=str)
def test_bfloat16_each_step_is_one_rounding_of_the_model_step(shape, level):
    """Per step, from the optimizer's own bf16 weights: within a bf16 rounding of the exact step."""
    hp = OPTIONS["amsgrad"]
    gen = generator("bf16-per-step", shape, level)
    p = param(shape, gen, BF16, std=0.1)
    model = ParamModel.create(p, level)
    opt = FOAM([p], level=level, **hp.foam_kwargs())
    for t in range(8):
        (g,) = new_grads([p], gen, t)
        p.grad = g
        model.resync(p)
        opt.step()
        model.step(g, hp)
        assert_param_matches(p, model, what=f"step {t + 1}")


@pytest.mark.parametrize("level", [0, 3])
def test_mixed_shapes_in_one_group_match_model(level):
    """One group: folded 2-d/3-d, never-folded 0-d/1-d, and non-contiguous parameters."""
    hp = OPTIONS["everything"]
    gen = generator("mixed", level)
    ps = odd_params(gen) + [param((3, 37), gen)]
    models = [ParamModel.create(p, level) for p in ps]
    opt = FOAM(ps, level=level, **hp.foam_kwargs())
    run(opt, ps, models, hp, 5, gen)
    for p, model in zip(ps, models):
        assert opt.state[p]["foam_level"] == model_level(p.shape, level)
        assert_param_matches(p, model)
        assert_state_matches(opt.state[p], model, amsgrad=True)


@pytest.mark.parametrize("level", [0, 2])
def test_float64_params_match_model_in_float64(level):
    """float64 parameters keep float64 state (FOAM's docstring), so the math must be float64 too."""
    hp = OPTIONS["everything"]
    p, opt, model = _model_run((3, 13), level, hp, F64, steps=5)
    assert opt.state[p]["exp_avg"].dtype == F64
    assert_param_matches(p, model, math_dtype=F64)


@pytest.mark.parametrize("dtype", [torch.float32, BF16, F64], ids=str)
@pytest.mark.parametrize("level", [0, 2])
def test_zero_lr_leaves_params_bit_identical(dtype, level):
    gen = generator("lr0", dtype, level)
    p = param((3, 13), gen, dtype)
    before = p.detach().clone()
    opt = FOAM([p], lr=0.0, level=level)
    for t in range(2):
        (p.grad,) = new_grads([p], gen, t)
        opt.step()
    assert torch.equal(p.detach(), before)


# --------------------------------------------------------------------- (4) state bytes
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
@pytest.mark.parametrize(
    "shape, level",
    [((4, 37), 1), ((4, 37), 2), ((2, 3, 13), 3), ((2, 5461), 2), ((6, 3), 3), ((5, 100), 8)],
    ids=str,
)
def test_state_bytes_are_folded(shape, level, dtype, amsgrad):
    gen = generator("bytes", shape, level, dtype)
    p = param(shape, gen, dtype)
    opt = FOAM([p], level=level, amsgrad=amsgrad)
    (p.grad,) = new_grads([p], gen, 0)
    opt.step()
    rows, n = math.prod(shape[:-1]), shape[-1]
    nb = math.ceil(n / 2**level)
    tensors = {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    moments = {k: v for k, v in tensors.items() if k != "step"}
    assert set(moments) == {"exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    moment_bytes = sum(v.numel() * v.element_size() for v in moments.values())
    assert moment_bytes == len(moments) * 4 * rows * nb
    step = tensors["step"]
    assert step.dim() == 0 and step.numel() * step.element_size() == 4
    assert all(v.numel() <= rows * nb < p.numel() for v in moments.values())  # nothing full-size
    total = sum(v.untyped_storage().nbytes() for v in tensors.values())
    assert total == moment_bytes + 4  # no hidden storage behind views


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


# ------------------------------------------------------------------- (6) checkpoints
def _checkpoint_params(gen, dtype):
    return [
        param((4, 37), gen, dtype),
        param((2, 3, 13), gen, dtype),
        param((7,), gen, dtype),
        param((), gen, dtype),
    ]


@pytest.mark.parametrize("level", [1, 2, 8])
def test_state_dict_is_compact_and_serialises(level, tmp_path):
    gen = generator("compact", level)
    ps = _checkpoint_params(gen, torch.float32)
    opt = FOAM(ps, level=level, amsgrad=True)
    run(opt, ps, [ParamModel.create(p, level) for p in ps], Hyper(amsgrad=True), 2, gen)
    sd = opt.state_dict()
    for i, p in enumerate(ps):
        st = sd["state"][i]
        lvl = model_level(p.shape, level)
        assert st["foam_level"] == lvl
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert tuple(st[key].shape) == model_folded_shape(p.shape, lvl)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    torch.save(sd, tmp_path / "foam.pt")
    loaded_file = torch.load(tmp_path / "foam.pt", weights_only=True)
    for got in (loaded, loaded_file):
        assert got["param_groups"] == sd["param_groups"]
        for i in sd["state"]:
            assert set(got["state"][i]) == set(sd["state"][i])
            for k, v in sd["state"][i].items():
                assert (
                    torch.equal(got["state"][i][k], v)
                    if isinstance(v, torch.Tensor)
                    else got["state"][i][k] == v
                )


@pytest.mark.parametrize("via", ["bytesio", "file"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
def test_checkpoint_resume_is_bit_identical(dtype, amsgrad, via, tmp_path):
    gen = generator("resume", dtype, amsgrad)
    hp = Hyper(amsgrad=amsgrad, scale=0.5)
    ps = _checkpoint_params(gen, dtype)
    opt = FOAM(ps, level=2, **hp.foam_kwargs())
    for t in range(3):
        set_grads(ps, new_grads(ps, gen, t))
        opt.step()
    if via == "bytesio":
        buf = io.BytesIO()
        torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in ps]}, buf)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
    else:
        torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in ps]}, tmp_path / "c.pt")
        ckpt = torch.load(tmp_path / "c.pt", weights_only=True)

    qs = [nn.Parameter(v.clone()) for v in ckpt["params"]]
    fresh = FOAM(qs, level=3)  # a fresh optimizer with other settings: the checkpoint wins
    fresh.load_state_dict(ckpt["opt"])
    assert fresh.param_groups[0]["level"] == 2 and fresh.param_groups[0]["scale"] == 0.5
    for p, q in zip(ps, qs):
        assert fresh.state[q]["exp_avg"].dtype == torch.float32
        assert fresh.state[q]["foam_level"] == opt.state[p]["foam_level"]
    for t in range(3, 7):
        grads = new_grads(ps, gen, t)
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        fresh.step()
        for i, (p, q) in enumerate(zip(ps, qs)):
            assert torch.equal(p, q), f"step {t + 1}, param {i}"
    a, b = state_tensors(opt), state_tensors(fresh)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# -------------------------------------------------------- (7) stock AdamW/Adam checkpoints
def _fold_tolerance(x: torch.Tensor, level: int) -> float:
    return (2**level + 1) * unit_roundoff(torch.float32) * float(x.abs().max())


@pytest.mark.parametrize("level", [2, 3, 8])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize(
    "stock_cls", [torch.optim.AdamW, torch.optim.Adam], ids=lambda c: c.__name__
)
def test_load_stock_state_dict_folds_moments(stock_cls, amsgrad, level):
    gen = generator("stock", stock_cls.__name__, amsgrad, level)
    decoupled = stock_cls is torch.optim.AdamW
    hp = Hyper(amsgrad=amsgrad, weight_decay=0.05, decoupled_weight_decay=decoupled)
    ps = [param((4, 37), gen), param((37,), gen), param((), gen)]
    stock = stock_cls(ps, lr=hp.lr, weight_decay=hp.weight_decay, amsgrad=amsgrad)
    for t in range(3):
        set_grads(ps, new_grads(ps, gen, t))
        stock.step()
    buf = io.BytesIO()
    torch.save(stock.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    full = {i: {k: v.clone() for k, v in st.items()} for i, st in sd["state"].items()}

    qs = [twin(p) for p in ps]
    foam = FOAM(qs, level=level)
    foam.load_state_dict(sd)
    group = foam.param_groups[0]
    assert group["level"] == level and group["scale"] == 1.0 and group["res_scale"] == 1.0
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    models = []
    for i, q in enumerate(qs):
        st = foam.state[q]
        lvl = model_level(q.shape, level)
        assert st["foam_level"] == lvl and float(st["step"]) == 3
        for key in keys:
            expected = model_fold(full[i][key], lvl)
            assert st[key].dtype == torch.float32
            assert tuple(st[key].shape) == tuple(expected.shape)
            assert_within(st[key], expected, _fold_tolerance(full[i][key], lvl), f"{key} of {i}")
        m = ParamModel.create(q, level)
        m.load_state(*(st[k] for k in keys), step=3)
        models.append(m)
    run(foam, qs, models, hp, 3, gen)
    for q, m in zip(qs, models):
        assert_param_matches(q, m)
        assert_state_matches(foam.state[q], m, amsgrad=amsgrad)


def test_load_bf16_stock_adamw_state_dict():
    """bf16 AdamW keeps bf16 moments; FOAM folds them into float32 state and steps on."""
    gen = generator("stock-bf16")
    hp = Hyper(weight_decay=0.05)
    ps = [param((4, 37), gen, BF16, std=0.1), param((37,), gen, BF16, std=0.1)]
    stock = torch.optim.AdamW(ps, lr=hp.lr, weight_decay=hp.weight_decay)
    for t in range(3):
        set_grads(ps, new_grads(ps, gen, t))
        stock.step()
    full = [{k: stock.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p in ps]
    assert full[0]["exp_avg"].dtype == BF16
    qs = [twin(p) for p in ps]
    foam = FOAM(qs, level=3)
    foam.load_state_dict(stock.state_dict())
    models = []
    for q, moments in zip(qs, full):
        st, lvl = foam.state[q], model_level(q.shape, 3)
        for key, x in moments.items():
            assert st[key].dtype == torch.float32
            assert_within(st[key], model_fold(x, lvl), _fold_tolerance(x, lvl), key)
        m = ParamModel.create(q, 3)
        m.load_state(st["exp_avg"], st["exp_avg_sq"], step=3)
        models.append(m)
    run(foam, qs, models, hp, 3, gen)
    for q, m in zip(qs, models):
        assert q.dtype == BF16
        assert_param_matches(q, m)


def test_empty_params_step():
    gen = generator("empty")
    ps = [param((3, 0), gen), param((0, 5), gen), param((0,), gen), param((4, 37), gen)]
    hp = Hyper(amsgrad=True)
    opt = FOAM(ps, level=2, **hp.foam_kwargs())
    models = [ParamModel.create(p, 2) for p in ps]
    run(opt, ps, models, hp, 2, gen)
    for p, m in zip(ps, models):
        assert tuple(opt.state[p]["exp_avg"].shape) == model_folded_shape(p.shape, m.level)
        assert_param_matches(p, m)


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


# --------------------------------------------------------------- (10) set_levels refolds
def _full_moments(shape, gen):
    """Full-size positive 'moments' whose folds at each level set the expected state."""
    return {k: randn(shape, gen).abs() + 0.1 for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}


@pytest.mark.parametrize("old, new", [(0, 2), (1, 3), (2, 2), (2, 5), (0, 8), (3, 8)])
@pytest.mark.parametrize("shape", [(3, 37), (2, 2, 13)], ids=str)
def test_set_levels_deeper_keeps_block_means(shape, old, new):
    """Refolding ``fold(X, old)`` to a deeper level gives ``fold(X, new)``: the new blocks are
    unions of old ones and each old block mean is weighted by how many elements it holds."""
    gen = generator("deeper", shape, old, new)
    p = param(shape, gen)
    opt = FOAM([p], level=old, amsgrad=True)
    p.grad = randn(shape, gen)
    opt.step()
    full = _full_moments(shape, gen)
    for k, x in full.items():
        opt.state[p][k] = model_fold(x, old).float()
    step_before = float(opt.state[p]["step"])
    opt.set_levels({p: new})
    st = opt.state[p]
    assert st["foam_level"] == new and float(st["step"]) == step_before
    for k, x in full.items():
        assert st[k].dtype == torch.float32 and st[k].is_contiguous()
        assert_within(st[k], model_fold(x, new), 2 * _fold_tolerance(x, new), k)


@pytest.mark.parametrize("old, new", [(3, 1), (2, 0), (8, 2), (5, 4)])
def test_set_levels_shallower_spreads_block_means(old, new):
    shape = (3, 37)
    gen = generator("shallower", old, new)
    p = param(shape, gen)
    opt = FOAM([p], level=old, amsgrad=True)
    p.grad = randn(shape, gen)
    opt.step()
    before = {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    opt.set_levels({p: new})
    for k, y in before.items():
        expected = model_fold(model_unfold(y, old, shape[-1]), new)
        assert tuple(opt.state[p][k].shape) == model_folded_shape(shape, new)
        assert_within(opt.state[p][k], expected, _fold_tolerance(y, new), k)


@pytest.mark.parametrize("old, new", [(2, 4), (4, 1)])
def test_set_levels_then_steps_match_model(old, new):
    hp = OPTIONS["everything"]
    gen = generator("set-levels-step", old, new)
    ps = [param((4, 37), gen), param((9,), gen)]
    opt = FOAM(ps, level=old, **hp.foam_kwargs())
    run(opt, ps, [ParamModel.create(p, old) for p in ps], hp, 2, gen)
    opt.set_levels({ps[0]: new, ps[1]: new})
    assert opt.state[ps[1]]["foam_level"] == 0  # 1-d stays unfolded
    models = []
    for p in ps:
        st = opt.state[p]
        m = ParamModel.create(p, new)
        m.load_state(st["exp_avg"], st["exp_avg_sq"], st["max_exp_avg_sq"], step=st["step"])
        models.append(m)
    run(opt, ps, models, hp, 3, gen)
    for p, m in zip(ps, models):
        assert opt.state[p]["exp_avg"].shape == model_folded_shape(p.shape, m.level)
        assert_param_matches(p, m)
        assert_state_matches(opt.state[p], m, amsgrad=True)


def test_set_levels_before_first_step_creates_state_at_that_level():
    gen = generator("set-levels-fresh")
    p = param((3, 37), gen)
    hp = Hyper()
    opt = FOAM([p], level=2, **hp.foam_kwargs())
    opt.set_levels({p: 4})
    assert not opt.state.get(p)  # state comes with the first gradient, at the level set (issue 14)
    model = ParamModel.create(p, 4)
    run(opt, [p], [model], hp, 2, gen)
    assert opt.state[p]["foam_level"] == 4
    assert opt.state[p]["exp_avg"].shape == (3, 3)
    assert_param_matches(p, model)
