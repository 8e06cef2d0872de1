"""State formats in the cost model and the planner: byte formulas against real tensors, the
quantization error and why it adds to the folding residual, (level, format) knapsacks, and the
LLaMA-60M targets of issue 12 (``explain()`` with int8 everywhere, a plan under budget 0.12)."""

from __future__ import annotations

import itertools
import math

import pytest
import sympy as sp
import torch
from torch import nn

import foam_compile
from foam_compile import FOAM
from foam_compile import cost_model as cm
from foam_compile.planner import AutoTuner, plan, plan_params
from foam_compile.reference import effective_level, fold, unfold
from foam_compile.state import get_format

SHAPES = [(), (7,), (1, 1), (3, 1), (4, 2), (64, 64), (4, 1000), (2, 3, 5), (5, 123, 123)]
FORMATS = ("fp32", "int8", "int4")
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _real_state(shape, level, fmt, amsgrad):
    p = torch.empty(shape)
    lv = effective_level(shape, level)
    f = get_format(fmt)
    keys = MOMENTS if amsgrad else MOMENTS[:2]
    out = {}
    for key in keys:
        out.update(f.zeros(p, lv, key, "signed" if key == "exp_avg" else "square"))
    return out


# ------------------------------------------------------------------------------ formulas
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_format_bytes_match_tensors(fmt, shape, amsgrad):
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.zeros(shape, dtype=dtype)
        for level in range(0, 10):
            state = _real_state(shape, level, fmt, amsgrad)
            measured = sum(t.nbytes for t in state.values())
            c = cm.cost(shape, level, param_dtype=dtype, amsgrad=amsgrad, state_format=fmt)
            assert c.state_bytes == measured and c.state_format == fmt
            assert c.step_bytes == 3 * p.nbytes + 2 * measured
            assert c.adamw_state_bytes == (3 if amsgrad else 2) * 4 * p.numel()


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_formula_is_sympy_with_the_scales(fmt):
    state, step = cm.state_bytes_formula(fmt)
    assert state.free_symbols <= {cm.MOMENTS, cm.ROWS, cm.N, cm.LEVEL, cm.STATE_SIZE}
    if fmt == "fp32":
        assert sp.simplify(state - cm.STATE_BYTES) == 0 and sp.simplify(step - cm.STEP_BYTES) == 0
        return
    # int8: one byte a stored element plus 4 bytes a group of 32; int4: half a byte (rounded
    # up per row) plus the same scales
    code = cm.BLOCKS if fmt == "int8" else sp.ceiling(cm.BLOCKS / 2)
    want = cm.MOMENTS * cm.ROWS * (code + 4 * sp.ceiling(cm.BLOCKS / 32))
    vals = {cm.MOMENTS: 2, cm.ROWS: 3, cm.STATE_SIZE: 4}
    for n, level in itertools.product([1, 5, 31, 32, 33, 1000, 5461], range(0, 6)):
        point = {**vals, cm.N: n, cm.LEVEL: level}
        assert int(state.subs(point)) == int(want.subs(point))


# ---------------------------------------------------------------------- quantization error
def _moments(shape, seed=0, steps=6):
    g = torch.Generator().manual_seed(seed)
    meter = cm.MomentMeter()
    scale = torch.exp(torch.randn(shape, generator=g))
    for _ in range(steps):
        meter.update("p", torch.randn(shape, generator=g) * scale + 0.3 * scale)
    return meter


def test_moment_meter_equals_adamw_moments():
    g = torch.Generator().manual_seed(1)
    p = nn.Parameter(torch.zeros(5, 37))
    opt = torch.optim.AdamW([p], lr=0.0, betas=(0.9, 0.999))
    meter = cm.MomentMeter(0.9, 0.999)
    for _ in range(4):
        grad = torch.randn(5, 37, generator=g)
        p.grad = grad.clone()
        opt.step()
        meter.update("p", grad)
    torch.testing.assert_close(meter._m["p"], opt.state[p]["exp_avg"], rtol=0, atol=0)
    torch.testing.assert_close(meter._v["p"], opt.state[p]["exp_avg_sq"], rtol=2e-7, atol=0)


def test_quantization_error_orders_formats_and_levels_are_counted_per_element():
    meter = _moments((32, 200))
    errs = meter.errors("p", range(0, 4), FORMATS)
    for level in range(4):
        assert errs[(level, "fp32")] == 0.0
        assert 0 < errs[(level, "int8")] < errs[(level, "int4")] < 1
    assert meter.errors("q", [0], FORMATS) is None


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("level", [1, 2, 3])
def test_quantization_and_folding_errors_add(fmt, level):
    """The claim the planner rests on: with ``v`` constant (so the direction is ``m``'s), the
    error of the stored-and-unfolded moment is exactly the folding residual plus the
    quantization error: one is constant on each block, the other has zero block mean."""
    g = torch.Generator().manual_seed(level)
    shape = (16, 203)  # partial blocks and a partial group
    m = torch.randn(shape, generator=g, dtype=torch.float64).float()
    v = torch.ones(shape)
    errs = cm.quantization_errors(m, v, [level], [fmt], step=10, eps=0.0)
    f = get_format(fmt)
    p = torch.empty(shape)
    st = {"foam_level": level, **f.encode(fold(m, level), p, "exp_avg", "signed")}
    mq = unfold(f.decode(st, "exp_avg", "signed", p), level, shape[-1]).double()
    m64 = m.double()
    total = float(((mq - m64) ** 2).sum() / (m64**2).sum())
    residual = float(
        ((m64 - unfold(fold(m64, level), level, shape[-1])) ** 2).sum() / (m64**2).sum()
    )
    assert total == pytest.approx(residual + errs[(level, fmt)], rel=1e-5)


# ------------------------------------------------------------------------------ planning
def _meta(*shapes):
    return [(f"p{i}", torch.empty(s, device="meta")) for i, s in enumerate(shapes)]


def test_default_formats_plan_as_before():
    params = _meta((64, 64), (32, 100), (50,))
    a = plan_params(params, budget=0.3, keep_unfolded=())
    b = plan_params(params, budget=0.3, keep_unfolded=(), formats=("fp32",))
    assert [(e.level, e.state_format) for e in a.entries] == [
        (e.level, e.state_format) for e in b.entries
    ]
    assert all(e.state_format == "fp32" and e.quant_error == 0 for e in a.entries)


def _brute(params, shares, quant, levels, formats, capacity):
    best = None
    opts = []
    for name, p in params:
        if p.dim() < 2:
            opts.append([(0, "fp32", cm.state_bytes(p.shape, 0), 0.0)])
            continue
        cands = sorted({min(lv, cm.max_useful_level(p.shape)) for lv in levels})
        opts.append(
            [
                (
                    lv,
                    f,
                    cm.cost(p.shape, lv, state_format=f).state_bytes,
                    p.numel() * (shares[name][lv] + quant[name][(lv, f)]),
                )
                for lv in cands
                for f in formats
            ]
        )
    for combo in itertools.product(*opts):
        b, e = sum(c[2] for c in combo), sum(c[3] for c in combo)
        if b <= capacity and (best is None or (e, b) < best[:2]):
            best = (e, b, combo)
    return best


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.2, 0.4])
def test_level_and_format_knapsack_is_optimal(budget):
    params = _meta((16, 40), (8, 64), (12,), (4, 33))
    g = torch.Generator().manual_seed(7)
    shares = {n: [0.0] + sorted(torch.rand(8, generator=g).tolist()) for n, _ in params}
    quant = {
        n: {
            (lv, f): (
                0.0
                if f == "fp32"
                else float(torch.rand((), generator=g)) * (0.02 if f == "int8" else 0.3)
            )
            for lv in range(9)
            for f in FORMATS
        }
        for n, _ in params
    }
    levels = [0, 1, 2, 3]
    adamw = sum(cm.adamw_state_bytes(p.shape) for _, p in params)
    capacity = math.floor(budget * adamw)
    best = _brute(params, shares, quant, levels, FORMATS, capacity)
    result = plan_params(
        params,
        shares,
        budget=budget,
        levels=levels,
        keep_unfolded=(),
        formats=FORMATS,
        quant_errors=quant,
    )
    assert result.exact and result.state_bytes <= capacity
    got = sum(e.numel * e.error for e in result.entries)
    assert got == pytest.approx(best[0], rel=1e-12, abs=1e-12)
    for e in result.entries:
        assert e.error == pytest.approx(e.fold_error + e.quant_error)
        if len(e.shape) < 2:
            assert e.state_format == "fp32"


def test_measured_quantization_error_decides_the_format():
    """Two equal tensors, room for one int8: the one that int4 hurts more gets the int8."""
    params = _meta((64, 64), (64, 64))
    shares = {n: [0.0] + [1.0] * 8 for n, _ in params}  # folding is out of the question
    quant = {
        "p0": {(0, "int8"): 1e-4, (0, "int4"): 0.30, (0, "fp32"): 0.0},
        "p1": {(0, "int8"): 1e-4, (0, "int4"): 0.01, (0, "fp32"): 0.0},
    }
    one_int8 = (2.25 + 1.25) / 2 / 8  # of AdamW's 8 bytes per element
    result = plan_params(
        params,
        shares,
        budget=one_int8,
        keep_unfolded=(),
        formats=("int8", "int4"),
        quant_errors=quant,
    )
    assert result.formats == {"p0": "int8", "p1": "int4"}
    text = result.report()
    assert "int8" in text and "int4" in text and "quant err" in text
    assert "L0/int8 costs" in text  # p1's why: what int8 would have cost


def test_plan_measures_quantization_errors_and_applies_formats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 8))
    x = torch.randn(32, 40)

    def calibrate(m):
        m(x).square().mean().backward()

    result = plan(model, budget=0.15, calibrate=calibrate, steps=3, formats=FORMATS)
    assert result.state_fraction <= 0.15
    for e in result.entries:
        if len(e.shape) >= 2 and e.state_format != "fp32":
            assert e.quant_error != cm.QUANT_ERROR_PRIOR[e.state_format]  # measured
    opt = FOAM(model.parameters(), lr=1e-3, level=0)
    result.apply(opt)
    model.zero_grad()
    calibrate(model)
    opt.step()  # state comes with the first gradient, in the recorded layout
    for p, (level, fmt) in result.layouts_by_param().items():
        assert opt.state[p]["foam_level"] == level
        assert opt.state[p].get("foam_format", "fp32") == fmt
    assert foam_compile.explain(opt, model).state_bytes == result.state_bytes


def test_autotuner_with_formats_keeps_moments_only_until_it_plans():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 8))
    x = torch.randn(32, 40)
    tuner = AutoTuner(list(model.named_parameters()), steps=2, budget=0.2, formats=FORMATS)
    assert tuner.moments is not None
    found = None
    for _ in range(2):
        model.zero_grad()
        model(x).square().mean().backward()
        found = tuner.observe()
    assert found is not None and tuner.moments is None
    assert found.state_fraction <= 0.2
    assert {e.state_format for e in found.entries} - {"fp32"}


# ------------------------------------------------------------------- LLaMA-60M targets
LLAMA_60M = dict(hidden=512, inter=1376, layers=8, vocab=32000)  # benchmarks/step_bench.py


class _Block(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.attention_norm = nn.RMSNorm(h)
        self.attention = nn.ModuleDict(
            {k: nn.Linear(h, h, bias=False) for k in ("wq", "wk", "wv", "wo")}
        )
        self.ffn_norm = nn.RMSNorm(h)
        self.feed_forward = nn.ModuleDict(
            {
                "w1": nn.Linear(h, i, bias=False),
                "w2": nn.Linear(i, h, bias=False),
                "w3": nn.Linear(h, i, bias=False),
            }
        )


class _Llama(nn.Module):
    """The LLaMA-60M parameter shapes (untied head), on the meta device: no memory."""

    def __init__(self, hidden, inter, layers, vocab):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(_Block(hidden, inter) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.output = nn.Linear(hidden, vocab, bias=False)


def _llama():
    with torch.device("meta"):
        return _Llama(**LLAMA_60M)


def _first_step(opt, model) -> None:
    """State comes with the first gradient (meta tensors: shapes only, no memory)."""
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt.step()


def test_llama60m_int8_everywhere_keeps_at_most_a_fifth_of_adamw_state():
    model = _llama()
    opt = foam_compile.convert(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model)
    for p in model.parameters():
        opt._set_layout(p, state_format="int8")
    _first_step(opt, model)
    ex = foam_compile.explain(opt, model)
    assert ex.state_bytes <= 0.20 * ex.adamw_bytes, str(ex)
    assert {r[5] for r in ex.rows} == {"int8"}
    assert "int8" in str(ex) and "format" in str(ex).splitlines()[0]
    levels = {name: level for name, _, level, *_ in ex.rows}
    assert levels["output.weight"] == 0 and levels["layers.0.attention.wq.weight"] == 2
    # the formulas agree with the tensors
    formula = sum(
        cm.cost(p.shape, opt.state[p]["foam_level"], state_format="int8").state_bytes
        for p in model.parameters()
    )
    assert formula == ex.state_bytes


def test_llama60m_plan_under_budget_012_says_why():
    model = _llama()
    result = plan(model, budget=0.12, formats=FORMATS, calibrate=None)
    assert result.state_fraction <= 0.12
    text = result.report()
    for e in result.entries:
        assert e.name in text
        if len(e.shape) >= 2:  # every (level, format) choice comes with its trade-off
            assert e.tradeoff and ("saves" in e.tradeoff or "costs" in e.tradeoff), e
    assert "kept: name" in text or "kept: module" in text
    assert {e.state_format for e in result.entries} >= {"fp32", "int4"}
    opt = FOAM(model.parameters(), lr=1e-3, level=0)
    result.apply(opt)
    _first_step(opt, model)
    assert foam_compile.explain(opt, model).state_bytes == result.state_bytes
