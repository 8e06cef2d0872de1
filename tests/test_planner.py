"""The planner: budgets hold, the solver is optimal, calibration finds smooth layers, ties."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from foam_compile.cost_model import ErrorMeter, max_useful_level, state_bytes
from foam_compile.planner import AutoTuner, calibrate_meter, plan, plan_params

# ------------------------------------------------------------------------ random instances
dims = st.integers(1, 300)
shapes = st.lists(
    st.one_of(st.tuples(dims, dims), st.tuples(st.integers(1, 4), dims, dims), st.tuples(dims)),
    min_size=1,
    max_size=6,
)


@st.composite
def instances(draw, max_level=8):
    """Meta tensors (no memory) with an error table per name: non-decreasing, or arbitrary."""
    shape_list = draw(shapes)
    params = [(f"p{i}", torch.empty(s, device="meta")) for i, s in enumerate(shape_list)]
    monotone = draw(st.booleans())
    errors = {}
    for name, _ in params:
        steps = draw(st.lists(st.floats(0, 1), min_size=max_level, max_size=max_level))
        table = [0.0]
        for x in steps:
            table.append(min(1.0, table[-1] + x / 4) if monotone else x)
        errors[name] = table
    return params, errors


def _options(params, errors, levels):
    """Every tensor's (level, bytes, weighted error) choices, written out independently."""
    out = []
    for name, p in params:
        if p.dim() < 2:
            out.append([(0, state_bytes(p.shape, 0), 0.0)])
            continue
        lvs = sorted({min(lv, max(p.shape[-1] - 1, 0).bit_length()) for lv in levels})
        out.append([(lv, state_bytes(p.shape, lv), p.numel() * errors[name][lv]) for lv in lvs])
    return out


def _brute_force(params, errors, levels, capacity):
    """``(least error, least bytes at that error)`` with bytes <= capacity, by enumeration."""
    best = None
    for combo in itertools.product(*_options(params, errors, levels)):
        b = sum(c[1] for c in combo)
        e = sum(c[2] for c in combo)
        if b <= capacity and (best is None or (e, b) < best):
            best = (e, b)
    return best


def _plain(**kw):
    return dict(keep_unfolded=(), **kw)


# ------------------------------------------------------------------------------- budgets
@settings(max_examples=60, deadline=None)
@given(instances(), st.floats(0.0, 1.0), st.sampled_from([1 << 16, 64, 8]))
def test_plan_never_exceeds_budget(instance, budget, resolution):
    params, errors = instance
    adamw = sum(state_bytes(p.shape, 0) for _, p in params)
    least = sum(min(o[1] for o in opts) for opts in _options(params, errors, range(9)))
    if least > math.floor(budget * adamw):
        with pytest.raises(ValueError, match="least state"):
            plan_params(params, errors, budget=budget, resolution=resolution, **_plain())
        return
    result = plan_params(params, errors, budget=budget, resolution=resolution, **_plain())
    assert result.state_bytes <= budget * adamw
    assert result.state_bytes == sum(state_bytes(p.shape, result.levels[n]) for n, p in params)
    assert result.adamw_state_bytes == adamw


@settings(max_examples=40, deadline=None)
@given(instances(), st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6))
def test_error_monotone_in_budget(instance, budgets):
    """A larger budget never gives a larger total error (the same rounding unit for all)."""
    params, errors = instance
    previous = None
    for budget in sorted(budgets):
        try:
            result = plan_params(params, errors, budget=budget, **_plain())
        except ValueError:
            assert previous is None  # infeasible only below every feasible budget
            continue
        if previous is not None:
            # 1e-12: the same sums in a possibly different order
            assert result.error <= previous + 1e-12
        previous = result.error


# ------------------------------------------------------------------------------ optimality
small = st.lists(st.tuples(st.integers(1, 8), st.integers(1, 40)), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(small, st.data())
def test_exact_solver_matches_brute_force(shape_list, data):
    levels = range(0, 4)
    params = [(f"p{i}", torch.empty(s, device="meta")) for i, s in enumerate(shape_list)]
    errors = {
        n: [0.0] + data.draw(st.lists(st.floats(0, 1), min_size=3, max_size=3)) for n, _ in params
    }
    adamw = sum(state_bytes(p.shape, 0) for _, p in params)
    numel = sum(p.numel() for _, p in params)
    budget = data.draw(st.floats(0.0, 1.0))
    best = _brute_force(params, errors, levels, math.floor(budget * adamw))
    assume(best is not None)
    result = plan_params(params, errors, budget=budget, levels=levels, **_plain())
    assert result.exact
    assert result.error * numel == pytest.approx(best[0], rel=1e-9, abs=1e-9)
    assert result.state_bytes == best[1]  # the fewest bytes among error-optimal plans

    # error bound: the fewest bytes whose error stays within it
    bound = data.draw(st.floats(0.0, 1.0))
    feasible = [
        (sum(c[1] for c in combo), sum(c[2] for c in combo))
        for combo in itertools.product(*_options(params, errors, levels))
    ]
    within = [b for b, e in feasible if e <= bound * numel]
    assume(within)
    result = plan_params(params, errors, max_error=bound, levels=levels, **_plain())
    assert result.state_bytes == min(within)
    assert result.error <= bound + 1e-12


@settings(max_examples=40, deadline=None)
@given(small, st.data())
def test_rounded_solver_keeps_its_stated_bound(shape_list, data):
    """With few cells the plan still fits, and is no worse than the optimum of budget - slack."""
    levels = range(0, 4)
    params = [(f"p{i}", torch.empty(s, device="meta")) for i, s in enumerate(shape_list)]
    errors = {
        n: [0.0] + data.draw(st.lists(st.floats(0, 1), min_size=3, max_size=3)) for n, _ in params
    }
    adamw = sum(state_bytes(p.shape, 0) for _, p in params)
    numel = sum(p.numel() for _, p in params)
    budget = data.draw(st.floats(0.0, 1.0))
    capacity = math.floor(budget * adamw)
    least = sum(min(o[1] for o in opts) for opts in _options(params, errors, levels))
    assume(least <= capacity)  # below that, a ValueError (test_plan_never_exceeds_budget)
    result = plan_params(params, errors, budget=budget, levels=levels, resolution=4, **_plain())
    assert result.state_bytes <= capacity
    reduced = _brute_force(params, errors, levels, capacity - result.slack_bytes)
    if reduced is not None:
        assert result.error * numel <= reduced[0] * (1 + 1e-9) + 1e-9


# ------------------------------------------------------------------------------ calibration
class TwoPaths(nn.Module):
    """Two equal layers: one sees inputs smooth along its last dim, the other white noise."""

    def __init__(self, n=64):
        super().__init__()
        self.smooth = nn.Linear(n, 32, bias=False)
        self.rough = nn.Linear(n, 32, bias=False)

    def forward(self, xs, xr):
        return self.smooth(xs) + self.rough(xr)


def _calibration(seed=0, batch=16, n=64):
    gen = torch.Generator().manual_seed(seed)
    i = torch.arange(n) / n

    def calibrate(model):
        # grad(W) = delta^T x: rows are mixes of inputs, so smooth inputs give smooth rows
        amp, phase = torch.randn(batch, 2, 1, generator=gen), torch.rand(batch, 2, 1, generator=gen)
        xs = (amp * torch.cos(2 * math.pi * (torch.tensor([[0.5], [1.0]]) * i + phase))).sum(1)
        xr = torch.randn(batch, n, generator=gen)
        target = torch.randn(batch, 32, generator=gen)
        ((model(xs, xr) - target) ** 2).sum().backward()

    return calibrate


@pytest.mark.parametrize("limit", [dict(budget=0.3), dict(max_error=0.3)])
def test_calibration_folds_the_smooth_layer_deeper(limit):
    torch.manual_seed(0)
    model = TwoPaths()
    result = plan(model, calibrate=_calibration(), steps=4, **limit)
    levels = result.levels
    assert levels["smooth.weight"] > levels["rough.weight"], result.report()
    assert result.calibration_steps == 4
    for lv in range(1, 7):  # the measurement itself: smooth rows lose less at every level
        by = {
            e.name: e
            for e in plan(
                model,
                calibrate=_calibration(),
                steps=2,
                fixed={"smooth.weight": lv, "rough.weight": lv},
                budget=1.0,
            ).entries
        }
        assert by["smooth.weight"].error < by["rough.weight"].error


def test_calibration_restores_grads_and_precomputed_grads_agree():
    torch.manual_seed(0)
    model = TwoPaths()
    user = [torch.full_like(p, 3.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), user):
        p.grad = g

    live = calibrate_meter(model, _calibration(seed=5), steps=3)
    assert all(p.grad is g for p, g in zip(model.parameters(), user))

    grads = []
    cal = _calibration(seed=5)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        cal(model)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    stored = calibrate_meter(model, grads)
    for name in ("smooth.weight", "rough.weight"):
        assert live.steps(name) == stored.steps(name) == 3
        assert live.errors(name) == pytest.approx(stored.errors(name), abs=1e-9)


def test_plan_from_a_filled_meter_equals_plan_with_calibration():
    """What level="auto" relies on: statistics collected elsewhere plan the same way."""
    torch.manual_seed(0)
    model = TwoPaths()
    meter = ErrorMeter(max_level=8)
    cal = _calibration(seed=3)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        cal(model)
        meter.update_from(model.named_parameters())
    model.zero_grad(set_to_none=True)
    from_meter = plan(model, budget=0.3, calibrate=meter)
    direct = plan(model, budget=0.3, calibrate=_calibration(seed=3), steps=3)
    assert from_meter.levels == direct.levels and from_meter.calibration_steps == 3
    assert from_meter.error == pytest.approx(direct.error, abs=1e-9)


# ------------------------------------------------------------------------------- rules
class Tied(nn.Module):
    def __init__(self, vocab=20, d=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, x):
        return self.lm_head(self.norm(self.down(torch.relu(self.up(self.embed(x))))))


def _lm_calibration(vocab=20):
    gen = torch.Generator().manual_seed(0)

    def calibrate(model):
        x = torch.randint(0, vocab, (4, 12), generator=gen)
        nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()

    return calibrate


@pytest.mark.parametrize("rules", [{}, dict(keep_unfolded=(), keep_modules=None)])
def test_tied_embedding_gets_one_level_counted_once(rules):
    model = Tied()
    result = plan(model, budget=0.5, calibrate=_lm_calibration(), steps=3, **rules)
    assert result.levels["embed.weight"] == result.levels["lm_head.weight"]
    tied = [e for e in result.entries if model.embed.weight is e.param]
    assert len(tied) == 1 and set(tied[0].aliases) == {"embed.weight", "lm_head.weight"}
    unique = {id(p): p for p in model.parameters()}.values()
    assert result.adamw_state_bytes == sum(8 * p.numel() for p in unique)
    assert len(result.levels_by_param()) == len(list(unique))
    assert result.state_bytes <= 0.5 * result.adamw_state_bytes
    if not rules:  # the default rules keep embeddings (and so the tied head) unfolded
        assert result.levels["embed.weight"] == 0


def test_tied_gradient_is_fed_once_per_step():
    model = Tied()
    meter = calibrate_meter(model, _lm_calibration(), steps=3)
    assert meter.steps("embed.weight") == 3 and "lm_head.weight" not in meter


class MyRMSNorm(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))


def test_keep_rules_overrides_and_cap():
    model = nn.ModuleDict(
        {
            "tok_embeddings": nn.Embedding(10, 8),
            "block": nn.Linear(8, 5),
            "odd": nn.Linear(5, 8),
            "head": nn.Linear(8, 10),
            "scale": MyRMSNorm((4, 8)),
        }
    )
    result = plan(model, budget=1.0, levels=[8], calibrate=None)
    lv = result.levels
    assert lv["tok_embeddings.weight"] == 0 and lv["head.weight"] == 0 and lv["scale.weight"] == 0
    assert lv["block.bias"] == 0  # 1-d
    assert lv["block.weight"] == max_useful_level((5, 8)) == 3
    assert lv["odd.weight"] == max_useful_level((8, 5)) == 3
    assert result.report().count("planned (prior)") == 2

    result = plan(model, budget=1.0, levels=[2], fold_anyway=[r"^head\."], fixed={"odd.weight": 1})
    assert result.levels["head.weight"] == 2 and result.levels["odd.weight"] == 1
    assert result.levels["tok_embeddings.weight"] == 0


def test_infeasible_budget_and_missing_limits_raise():
    model = Tied()
    with pytest.raises(ValueError, match="least state possible"):
        plan(model, budget=0.1)
    with pytest.raises(ValueError, match="budget"):
        plan(model)


def test_report_lists_every_name_and_the_totals():
    model = Tied()
    result = plan(model, budget=0.9, calibrate=_lm_calibration(), steps=2)
    text = result.report()
    for name, _ in model.named_parameters(remove_duplicate=False):
        assert name in text
    assert f"({result.state_fraction:.1%})" in text and "exact" in text


# ------------------------------------------------------------------------ with the optimizer
def _foam():
    module = pytest.importorskip("foam_compile.optimizer")
    if not hasattr(module.FOAM, "set_levels"):
        pytest.skip("FOAM.set_levels not written yet")
    return module.FOAM


def _moment_bytes(opt):
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    return sum(s[k].nbytes for s in opt.state.values() for k in keys if k in s)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_applied_plan_matches_real_optimizer_state(amsgrad):
    FOAM = _foam()
    torch.manual_seed(0)
    model = TwoPaths()
    opt = FOAM(model.parameters(), lr=1e-3, level=0, amsgrad=amsgrad)
    _calibration()(model)
    opt.step()
    result = plan(model, budget=0.3, calibrate=_calibration(), steps=2, amsgrad=amsgrad)
    result.apply(opt)
    assert _moment_bytes(opt) == result.state_bytes <= 0.3 * result.adamw_state_bytes
    for p, level in result.levels_by_param().items():
        assert opt.state[p]["foam_level"] == level


def test_autotuner_plans_after_k_real_steps():
    FOAM = _foam()
    torch.manual_seed(0)
    model = TwoPaths()
    opt = FOAM(model.parameters(), lr=1e-3, level=0)
    tuner = AutoTuner(list(model.named_parameters()), steps=3, budget=0.3, model=model)
    cal = _calibration()
    plans = []
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        cal(model)
        found = tuner.observe()  # what FOAM.step() does first when level="auto"
        if found is not None:
            plans.append(found)
            opt.set_levels(found.levels_by_param())
        opt.step()
    assert len(plans) == 1 and tuner.done and plans[0].calibration_steps == 3
    assert plans[0].levels["smooth.weight"] > plans[0].levels["rough.weight"]
    assert _moment_bytes(opt) == plans[0].state_bytes
