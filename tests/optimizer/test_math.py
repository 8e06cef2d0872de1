"""FOAM at levels 1..8 against the float64 model: shapes, partial blocks, options, dtypes."""

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
)

from foam_compile import FOAM

from .common import (
    BF16,
    EVERYTHING_DECOUPLED,
    OPTIONS,
    SHAPES,
    generator,
    new_grads,
    odd_params,
    param,
    run,
)


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
