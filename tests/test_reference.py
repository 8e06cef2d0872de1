"""``foam_compile.reference`` against the independent float64 model in ``float64_model.py``.

Shapes always include blocks that do not divide the last dim (partial last blocks), and levels
run 0..8. Inputs are fresh random tensors from a generator seeded by the test id, so every case
sees different data and failures reproduce.
"""

from __future__ import annotations

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
    model_fold,
    model_folded_shape,
    model_level,
    model_unfold,
    unit_roundoff,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foam_compile.reference import effective_level, fold, folded_shape, reference_step, unfold

LEVELS = list(range(9))
# Last dims: a multiple of every block up to 2**3, primes, smaller than a block, 5461 = 4*1365+1.
SHAPES = [(3, 5), (2, 3, 13), (4, 33), (5, 3), (2, 16)]
OPTIONS = {
    "adamw": Hyper(),
    "coupled": Hyper(decoupled_weight_decay=False, weight_decay=0.1),
    "amsgrad": Hyper(amsgrad=True),
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
# Gradient scale per step: shrinking steps make amsgrad's running max differ from v.
GRAD_SCALES = (4.0, 1.0, 0.25, 2.0, 0.5)


def generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(shape, gen, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def run_reference(shape, level, hp: Hyper, steps: int, dtype=torch.float32, state=None, key=()):
    """Run ``reference_step`` and the model side by side on the same random inputs."""
    gen = generator(shape, level, steps, dtype, key)
    p = randn(shape, gen, dtype)
    model = ParamModel.create(p, level)
    state = {} if state is None else state
    for t in range(steps):
        g = randn(shape, gen, dtype) * GRAD_SCALES[t % len(GRAD_SCALES)]
        reference_step(p, g, state, level=level, **hp.reference_kwargs())
        model.step(g, hp)
    return p, state, model


def assert_matches_model(p, state, model, hp, math_dtype=torch.float32):
    assert_param_matches(p, model, math_dtype)
    assert tuple(state["exp_avg"].shape) == model_folded_shape(p.shape, model.level)
    assert_state_matches(state, model, hp.amsgrad, math_dtype)


# ------------------------------------------------------------------------ fold / unfold
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", SHAPES + [(2, 5461)], ids=str)
def test_fold_matches_model(shape, level):
    x = randn(shape, generator("fold", shape, level))
    got = fold(x, level)
    expected = model_fold(x, level)
    assert tuple(got.shape) == model_folded_shape(shape, level) == folded_shape(shape, level)
    # A block mean of up to 2**level float32 values: one rounding per addition and the divide.
    tol = (2**level + 1) * unit_roundoff(torch.float32) * float(x.abs().max())
    torch.testing.assert_close(got.to(F64), expected, atol=tol, rtol=0)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", SHAPES + [(2, 5461)], ids=str)
def test_unfold_matches_model(shape, level):
    n = shape[-1]
    y = randn(model_folded_shape(shape, level), generator("unfold", shape, level))
    got = unfold(y, level, n)
    assert tuple(got.shape) == shape
    assert torch.equal(got.to(F64), model_unfold(y, level, n))


@pytest.mark.parametrize("level", LEVELS)
def test_folded_shape_and_effective_level(level):
    for shape in [(), (1,), (7,), (5461,), (3, 1), (3, 5), (2, 3, 13), (2, 5461), (1, 2, 3, 257)]:
        lvl = effective_level(shape, level)
        assert lvl == model_level(shape, level)
        assert folded_shape(shape, lvl) == model_folded_shape(shape, lvl)
        if len(shape) >= 2:
            assert folded_shape(shape, level)[-1] == math.ceil(shape[-1] / 2**level)
            assert folded_shape(shape, level)[:-1] == shape[:-1]


@pytest.mark.parametrize(
    "n, level", [(5461, 2), (3, 3), (7, 2), (5, 1), (100, 5), (257, 8), (2, 8)]
)
def test_partial_last_block_is_mean_of_its_own_elements(n, level):
    block = 2**level
    assert n % block != 0
    x = randn((3, n), generator("partial", n, level)).abs() + 1.0  # positive: padding would show
    got = fold(x, level)
    head = (n // block) * block
    own_mean = x[:, head:].to(F64).mean(-1)
    zero_padded = x[:, head:].to(F64).sum(-1) / block
    tol = (block + 1) * unit_roundoff(torch.float32) * float(x.abs().max())
    torch.testing.assert_close(got[:, -1].to(F64), own_mean, atol=tol, rtol=0)
    assert (got[:, -1].to(F64) - zero_padded).abs().min() > 100 * tol  # not the reference code's


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", SHAPES + [(2, 5461)], ids=str)
def test_fold_of_constant_blocks_is_the_constant(shape, level):
    n = shape[-1]
    gen = generator("const", shape, level)
    # Small integers: every block sum and the divide by the count are exact in float32.
    y = torch.randint(-50, 50, model_folded_shape(shape, level), generator=gen).float()
    x = y.index_select(-1, torch.arange(n) // 2**level)  # each block holds one constant
    assert torch.equal(fold(x, level), y)


@pytest.mark.parametrize("level", [0, 1, 3])
@pytest.mark.parametrize("shape", [(3, 0), (0, 5), (2, 0, 4)], ids=str)
def test_empty_params_fold_and_step(shape, level):
    """Zero-size tensors fold to zero-size folded shapes and step without error."""
    x = torch.zeros(shape)
    assert tuple(fold(x, level).shape) == model_folded_shape(shape, level)
    assert tuple(unfold(fold(x, level), level, shape[-1]).shape) == shape
    hp = OPTIONS["amsgrad"]
    p, state, model = run_reference(shape, level, hp, steps=2)
    assert_matches_model(p, state, model, hp)


_settings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def shapes_and_levels(draw, min_dims=1):
    ndim = draw(st.integers(min_dims, 4))
    lead = [draw(st.integers(1, 4)) for _ in range(ndim - 1)]
    n = draw(st.one_of(st.integers(1, 40), st.sampled_from([63, 65, 127, 129, 255, 257, 300])))
    return (*lead, n), draw(st.integers(0, 8))


@_settings
@given(shapes_and_levels(), st.integers(0, 2**31 - 1))
def test_fold_unfold_roundtrip_property(shape_level, seed):
    shape, level = shape_level
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    # Integer-valued folded tensors: unfold then fold returns them exactly.
    y = torch.randint(-1000, 1000, folded_shape(shape, level), generator=gen).float()
    assert torch.equal(fold(unfold(y, level, n), level), y)
    # Random floats: equal up to the rounding of one block mean.
    z = torch.randn(folded_shape(shape, level), generator=gen)
    tol = (2**level + 1) * unit_roundoff(torch.float32) * float(z.abs().max())
    torch.testing.assert_close(fold(unfold(z, level, n), level), z, atol=tol, rtol=0)
    # And fold agrees with the model on arbitrary data.
    x = torch.randn(shape, generator=gen)
    tol = (2**level + 1) * unit_roundoff(torch.float32) * float(x.abs().max())
    torch.testing.assert_close(fold(x, level).to(F64), model_fold(x, level), atol=tol, rtol=0)


# ------------------------------------------------------------------------------ steps
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_step_matches_model(shape, level):
    hp = OPTIONS["adamw"]
    p, state, model = run_reference(shape, level, hp, steps=5)
    assert state.get("exp_avg").dtype == torch.float32
    assert_matches_model(p, state, model, hp)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize(
    "shape, level",
    [((4, 33), 0), ((4, 33), 2), ((2, 3, 13), 3), ((5, 3), 3), ((3, 20), 8)],
    ids=str,
)
def test_reference_step_options_match_model(option, shape, level):
    hp = OPTIONS[option]
    p, state, model = run_reference(shape, level, hp, steps=6, key=option)
    assert_matches_model(p, state, model, hp)


@pytest.mark.parametrize("option", ["adamw", "everything"])
@pytest.mark.parametrize("shape, level", [((2, 5461), 2), ((2, 5461), 8), ((3, 3), 3)], ids=str)
def test_reference_step_partial_blocks(option, shape, level):
    hp = OPTIONS[option]
    p, state, model = run_reference(shape, level, hp, steps=4, key=option)
    assert_matches_model(p, state, model, hp)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", [(), (1,), (7,), (5461,)], ids=str)
def test_reference_step_low_dim_params_run_at_level_0(shape, option):
    hp = OPTIONS[option]
    p, state, model = run_reference(shape, 3, hp, steps=4, key=option)
    assert model.level == 0
    assert tuple(state["exp_avg"].shape) == shape  # never folded
    assert_matches_model(p, state, model, hp)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape, level", [((3, 13), 0), ((3, 13), 2), ((2, 2, 7), 3)], ids=str)
def test_reference_step_float64_is_the_model(option, shape, level):
    """With float64 parameters and float64 state the reference is the model up to float64 noise."""
    hp = OPTIONS[option]
    lvl = model_level(shape, level)
    state = {
        k: torch.zeros(model_folded_shape(shape, lvl), dtype=F64)
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    }
    p, state, model = run_reference(shape, level, hp, steps=6, dtype=F64, state=state, key=option)
    assert state["exp_avg"].dtype == F64
    assert_matches_model(p, state, model, hp, math_dtype=F64)


def test_reference_step_tensor_step_stays_a_tensor():
    hp = OPTIONS["adamw"]
    state = {"step": torch.tensor(0.0)}
    p, state, model = run_reference((3, 9), 2, hp, steps=3, state=state)
    assert isinstance(state["step"], torch.Tensor) and float(state["step"]) == 3
    assert_matches_model(p, state, model, hp)


@st.composite
def hypers(draw):
    return Hyper(
        lr=draw(st.sampled_from([1e-3, 1e-2, 1e-1])),
        betas=(draw(st.sampled_from([0.0, 0.5, 0.9])), draw(st.sampled_from([0.9, 0.999]))),
        weight_decay=draw(st.sampled_from([0.0, 0.01, 0.1])),
        decoupled_weight_decay=draw(st.booleans()),
        amsgrad=draw(st.booleans()),
        maximize=draw(st.booleans()),
        scale=draw(st.sampled_from([1.0, 0.25])),
        res_scale=draw(st.sampled_from([1.0, 0.0, 0.5])),
    )


@_settings
@given(shapes_and_levels(), hypers(), st.integers(0, 2**31 - 1))
def test_reference_step_property(shape_level, hp, seed):
    shape, level = shape_level
    p, state, model = run_reference(shape, level, hp, steps=3, key=seed)
    assert_matches_model(p, state, model, hp)
