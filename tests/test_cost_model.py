"""The cost formulas against bytes of real tensors, and the error meter against its definition."""

from __future__ import annotations

import math

import pytest
import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from foam_compile import cost_model as cm
from foam_compile.reference import effective_level, fold, folded_shape, unfold

SHAPES = [(), (7,), (1, 1), (3, 1), (4, 2), (64, 64), (4, 1000), (2, 3, 5), (5, 123, 123)]
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _state_dtype(dtype):
    # ALGORITHM.md: float32 state whatever the parameter dtype; float64 parameters keep float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _real_state(shape, level, dtype, amsgrad):
    fshape = folded_shape(shape, effective_level(shape, level))
    keys = MOMENTS if amsgrad else MOMENTS[:2]
    return {k: torch.zeros(fshape, dtype=_state_dtype(dtype)) for k in keys}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_state_bytes_match_tensors(shape, dtype, amsgrad):
    for level in range(0, 11):
        state = _real_state(shape, level, dtype, amsgrad)
        measured = sum(t.nbytes for t in state.values())
        assert cm.state_bytes(shape, level, param_dtype=dtype, amsgrad=amsgrad) == measured
        full = _real_state(shape, 0, dtype, amsgrad)
        assert cm.adamw_state_bytes(shape, param_dtype=dtype, amsgrad=amsgrad) == sum(
            t.nbytes for t in full.values()
        )


@pytest.mark.parametrize("grad_dtype", [None, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_step_bytes_match_tensors(shape, dtype, grad_dtype):
    """A fused step reads p and g, writes p, reads and writes each folded moment once."""
    p = torch.zeros(shape, dtype=dtype)
    g = torch.zeros(shape, dtype=grad_dtype or dtype)
    for amsgrad in (False, True):
        for level in range(0, 9):
            state = _real_state(shape, level, dtype, amsgrad)
            moved = 2 * p.nbytes + g.nbytes + 2 * sum(t.nbytes for t in state.values())
            kw = dict(param_dtype=dtype, grad_dtype=grad_dtype, amsgrad=amsgrad)
            assert cm.step_bytes(shape, level, **kw) == moved
        full = _real_state(shape, 0, dtype, amsgrad)
        moved = 2 * p.nbytes + g.nbytes + 2 * sum(t.nbytes for t in full.values())
        assert cm.adamw_step_bytes(shape, **kw) == moved


@pytest.mark.parametrize(
    "dtype, level, adamw, foam",
    [(torch.float32, 2, 28, 16), (torch.bfloat16, 2, 22, 10)],
)
def test_per_element_figures_of_algorithm_md(dtype, level, adamw, foam):
    shape = (64, 1024)
    numel = math.prod(shape)
    assert cm.adamw_step_bytes(shape, param_dtype=dtype) == adamw * numel
    assert cm.step_bytes(shape, level, param_dtype=dtype) == foam * numel
    for lv in range(0, 4):
        assert cm.state_bytes(shape, lv) * 2**lv == 8 * numel


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 10**6),
    n=st.integers(1, 10**7),
    level=st.integers(0, 20),
    sizes=st.tuples(*[st.sampled_from([1, 2, 4, 8])] * 3),
    k=st.sampled_from([2, 3]),
)
def test_fast_evaluation_equals_exact_sympy(rows, n, level, sizes, k):
    """cost() evaluates lambdified formulas; they must equal sympy's exact integer arithmetic."""
    values = dict(zip(cm._SYMBOLS, (rows, n, level, *sizes, k)))
    for name in ("STATE_BYTES", "ADAMW_STATE_BYTES", "STEP_BYTES", "ADAMW_STEP_BYTES"):
        exact = getattr(cm, name).subs(values)
        assert exact.is_Integer
        assert cm._eval(name, rows, n, level, *sizes, k) == int(exact)


def test_formulas_reduce_to_adamw_at_level_0():
    assert sp.simplify(cm.STATE_BYTES.subs(cm.LEVEL, 0) - cm.ADAMW_STATE_BYTES) == 0
    assert cm.WHITE_NOISE_ERROR.subs(cm.LEVEL, 0) == 0
    j = sp.Symbol("j", integer=True, positive=True)  # n a multiple of the block
    for level in range(0, 6):
        ratio = (cm.STATE_BYTES / cm.ADAMW_STATE_BYTES).subs({cm.N: 2**level * j, cm.LEVEL: level})
        assert sp.simplify(ratio - sp.Rational(1, 2**level)) == 0


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 123, 1024, 1025])
def test_max_useful_level(n):
    cap = cm.max_useful_level((3, n))
    assert folded_shape((3, n), cap)[-1] == 1
    if cap > 0:
        assert folded_shape((3, n), cap - 1)[-1] > 1
    assert cm.max_useful_level((n,)) == 0
    assert cm.state_bytes((3, n), cap) == cm.state_bytes((3, n), cap + 5)


def _direct_share(g64, level):
    n = g64.shape[-1]
    lv = effective_level(g64.shape, level)
    r = g64 - unfold(fold(g64, lv), lv, n)
    return float((r * r).sum() / (g64 * g64).sum())


@pytest.mark.parametrize("shape", [(7,), (1, 1), (3, 1), (4, 2), (5, 9, 123), (2, 1000), (16, 64)])
def test_residual_energies_match_definition(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) + shape[-1]))
    g = g * torch.linspace(0.1, 3, shape[-1])  # uneven energy along the row
    residual, energy = cm.residual_energies(g, 10)
    g64 = g.double()
    assert float(energy) == pytest.approx(float((g64 * g64).sum()), rel=1e-6)
    for level in range(0, 11):
        # the meter rounds g to float32 once; everything after is float64
        assert float(residual[level] / energy) == pytest.approx(_direct_share(g64, level), abs=1e-6)


def test_meter_averages_over_window_and_keeps_only_scalars():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, 37, generator=gen) * s for s in (1.0, 5.0, 0.2)]
    meter = cm.ErrorMeter(max_level=7)
    for g in grads:
        meter.update("w", g)
        meter.update("b", g[0])
    assert meter.steps("w") == 3 and meter.errors("missing") is None
    for level, got in enumerate(meter.errors("w")):
        g64 = [g.double() for g in grads]
        num = sum(_direct_share(g, level) * float((g * g).sum()) for g in g64)
        assert got == pytest.approx(num / sum(float((g * g).sum()) for g in g64), abs=1e-6)
    assert meter.errors("b") == [0.0] * 8  # 1-d never folds
    held = [t for d in vars(meter).values() if isinstance(d, dict) for t in d.values()]
    assert all(not isinstance(t, torch.Tensor) or t.numel() <= meter.max_level + 1 for t in held)


def test_white_noise_prior_matches_measured_noise():
    rows, n = 512, 123
    g = torch.randn(rows, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    meter = cm.ErrorMeter(max_level=8)
    meter.update("w", g)
    for level, got in enumerate(meter.errors("w")):
        expected = cm.white_noise_error((rows, n), level)
        nb = folded_shape((rows, n), min(level, cm.max_useful_level((rows, n))))[-1]
        # kept/total ~ Beta(rows*nb/2, rows*(n-nb)/2) for iid Gaussian rows; allow 6 sigma
        a, b = rows * nb / 2, rows * (n - nb) / 2
        sigma = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
        assert abs(got - expected) <= 6 * sigma + 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_formulas_match_real_foam_optimizer(dtype, amsgrad):
    optimizer = pytest.importorskip("foam_compile.optimizer")
    for shape in SHAPES:
        for level in (0, 1, 3, 8):
            p = torch.nn.Parameter(torch.randn(shape).to(dtype))
            opt = optimizer.FOAM([p], lr=1e-3, level=level, amsgrad=amsgrad)
            p.grad = torch.randn(shape).to(dtype)
            opt.step()
            measured = sum(opt.state[p][k].nbytes for k in MOMENTS if k in opt.state[p])
            assert measured == cm.state_bytes(shape, level, param_dtype=dtype, amsgrad=amsgrad)
