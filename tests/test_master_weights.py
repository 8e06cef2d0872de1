"""bf16/fp16 weights with correction bits (``foam_compile.master_weights``).

The codec is checked bit for bit against a float64 model written here from the module's
stated arithmetic (float64 holds every intermediate exactly, so each float32 rounding the spec
names is made explicitly); the optimizer against a float32-master FOAM over 1,000 steps, with
plain bf16 weights run beside it to show what the correction buys. Tolerances come from the
formats' unit roundoffs.
"""

from __future__ import annotations

import io
import logging
import math
import sys
import types

import pytest
import torch
from float64_model import Hyper as ModelHyper
from float64_model import ParamModel, assert_param_matches, unit_roundoff

import foam_compile
from foam_compile import FOAM, backends
from foam_compile import master_weights as mw
from foam_compile.functional import foam_adam_
from foam_compile.hyper import Hyper

F32, F64 = torch.float32, torch.float64
LOW = {torch.bfloat16: (7, -126), torch.float16: (10, -14)}  # mantissa bits, smallest exponent
WIDTHS = {"int8": 127, "int16": 32767}


# ------------------------------------------------------------------------ float64 model
def f32(x: torch.Tensor) -> torch.Tensor:
    """Round float64 values to float32 (one round-to-nearest-even), back as float64."""
    return x.to(F32).to(F64)


def model_half_ulp(v: torch.Tensor, dtype) -> torch.Tensor:
    """2**(E - M - 1): E = floor(log2|v|), at least the format's smallest normal exponent."""
    mant, emin = LOW[dtype]
    _m, e = torch.frexp(v.to(F64).abs())  # |v| = m * 2**e, m in [0.5, 1)
    exponent = torch.where(v == 0, emin, (e - 1).clamp(min=emin))
    return torch.pow(2.0, (exponent - mant - 1).to(F64))


def model_split(theta: torch.Tensor, dtype, width: str):
    q = WIDTHS[width]
    p16 = theta.to(dtype)  # the cast: round to nearest even
    p64 = p16.to(F64)
    finite = torch.isfinite(p64)
    d = torch.where(finite, theta.to(F64) - p64, 0.0)  # exact in float64
    t = f32(d / model_half_ulp(p64, dtype) * q)  # d / s exact; the float32 product rounds
    rho = torch.round(t).clamp(-q, q)
    return p16, rho.to(mw.OPTIONS[width][0])


def model_join(p16: torch.Tensor, rho: torch.Tensor, fused: bool) -> torch.Tensor:
    """float32 theta; ``fused``: ``p + c * s`` rounded once, else ``c * s`` rounded first."""
    q = WIDTHS["int8" if rho.dtype == torch.int8 else "int16"]
    inv_q = f32(torch.tensor(1.0 / q, dtype=F64))
    c = f32(rho.to(F64) * inv_q)
    cs = c * model_half_ulp(p16.to(F64), p16.dtype)
    return (p16.to(F64) + (cs if fused else f32(cs))).to(F32)


def awkward_values(dtype) -> torch.Tensor:
    """float32 values at the places a 16-bit rounding is hard: exponent changes, ties, the
    subnormal boundary, zero, the top of the range, plus wide random values."""
    mant, emin = LOW[dtype]
    g = torch.Generator().manual_seed(0)
    top = 127 if dtype == torch.bfloat16 else 15
    ks = torch.arange(emin - mant - 2, top + 1, dtype=F64)
    base = torch.pow(2.0, ks)
    ulp32 = 2.0**-23
    steps = torch.tensor([-3, -1, -0.5, 0, 0.5, 1, 3], dtype=F64) * ulp32
    near_pow2 = (base[:, None] * (1 + steps[None, :])).flatten()
    # exact ties between two neighbours: p16 + s, at every binade
    ties = (base * (1 + 2.0 ** -(mant + 1))).flatten()
    ties = torch.cat([ties, base * (1 + 3 * 2.0 ** -(mant + 1))])
    # the subnormal range and its boundary, at several spacings
    sub = torch.linspace(0, 2.0 ** (emin + 1), 2000, dtype=F64)
    wide = torch.randn(20000, generator=g, dtype=F64) * torch.exp(
        torch.randn(20000, generator=g, dtype=F64) * (20 if dtype == torch.bfloat16 else 3)
    )
    near = torch.randn(5000, generator=g, dtype=F64)
    x = torch.cat([near_pow2, ties, sub, wide, near, torch.tensor([0.0], dtype=F64)])
    x = torch.cat([x, -x]).to(F32)
    finite_max = torch.finfo(dtype).max
    return x[torch.isfinite(x) & (x.abs() <= finite_max)]


# --------------------------------------------------------------------------- the codec
@pytest.mark.parametrize("dtype", list(LOW))
def test_half_ulp_every_16_bit_value(dtype):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    p16 = bits.view(dtype)
    finite = torch.isfinite(p16)
    got = mw.half_ulp(p16)[finite].to(F64)
    assert torch.equal(got, model_half_ulp(p16[finite].to(F64), dtype))
    # and it is half the gap to the next value away from zero (where that is finite)
    up = torch.nextafter(p16.abs(), torch.tensor(float("inf"), dtype=dtype))
    ok = finite & torch.isfinite(up)
    gap = up[ok].to(F64) - p16[ok].abs().to(F64)
    assert torch.equal(got[ok[finite]], gap / 2)


@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("dtype", list(LOW))
def test_split_bitwise_against_float64_model(dtype, width):
    x = awkward_values(dtype)
    p16, rho = mw.split(x, dtype, width)
    want_p, want_rho = model_split(x, dtype, width)
    assert torch.equal(p16.view(torch.int16), want_p.view(torch.int16))
    assert torch.equal(rho, want_rho)
    assert rho.dtype == mw.OPTIONS[width][0]
    # ties go to the even neighbour, the correction then carries the whole half step
    assert rho.abs().max() == WIDTHS[width]


@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("dtype", list(LOW))
def test_join_bitwise_against_float64_model(dtype, width):
    p16, rho = mw.split(awkward_values(dtype), dtype, width)
    got = mw.join(p16, rho)
    assert torch.equal(got, model_join(p16, rho, fused=False))
    # where c * s is exact in float32 a fused multiply-add gives the same bits (module docstring)
    exact = p16.to(F64).abs() >= 2.0**-111
    assert torch.equal(got[exact], model_join(p16, rho, fused=True)[exact])
    diff = (got.to(F64) - model_join(p16, rho, fused=True).to(F64)).abs()
    assert diff.max() <= 2.0**-149


@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("dtype", list(LOW))
def test_round_trip_error_is_one_correction_step(dtype, width):
    """|join(split(x)) - x| <= s / (2 Q) + one float32 rounding: relative 2**-(M+1) / (2 Q)."""
    x = awkward_values(dtype)
    p16, rho = mw.split(x, dtype, width)
    back = mw.join(p16, rho).to(F64)
    s = model_half_ulp(p16.to(F64), dtype)
    err = (back - x.to(F64)).abs()
    ulp32_half = torch.where(x == 0, 0.0, x.to(F64).abs() * unit_roundoff(F32))
    bound = s / (2 * WIDTHS[width]) * (1 + 2 * unit_roundoff(F32)) + ulp32_half + 2.0**-150
    assert (err <= bound).all(), float((err - bound).max())
    mant, emin = LOW[dtype]
    normal = x.abs() >= 2.0**emin
    rel = (err[normal] / x[normal].abs().to(F64)).max()
    assert rel <= 2.0 ** -(mant + 1) / (2 * WIDTHS[width]) + 2 * unit_roundoff(F32)


@pytest.mark.parametrize("dtype", list(LOW))
def test_non_finite_and_overflow(dtype):
    big = torch.finfo(F32).max if dtype == torch.bfloat16 else 65520.0
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), big, -big])
    p16, rho = mw.split(x, dtype, "int8")
    assert torch.equal(rho, torch.zeros(5, dtype=torch.int8))
    assert torch.isinf(p16[[0, 1, 3, 4]]).all() and torch.isnan(p16[2])
    back = mw.join(p16, rho)
    assert torch.isinf(back[[0, 1, 3, 4]]).all() and torch.isnan(back[2])


@pytest.mark.parametrize("dtype", list(LOW))
def test_flush_to_zero_is_graceful(dtype):
    """GPUs may flush float32 subnormals (FTZ/DAZ); ``torch.set_flush_denormal`` does it on CPU.
    The codec never divides and never scales by a subnormal factor, so a flush costs the
    correction of values near the subnormal range (it reads 0) but never makes inf or nan
    (a divide by ``s = 2**-134`` would: 0 / 0 at every zero weight)."""
    x = awkward_values(dtype)
    want_p, want_rho = mw.split(x, dtype, "int8")
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        p16, rho = mw.split(x, dtype, "int8")
        back = mw.join(p16, rho)
    finally:
        torch.set_flush_denormal(False)
    assert torch.isfinite(p16.float()).all() and torch.isfinite(back).all()
    normal = x.abs() >= 2.0**-100  # no float32 subnormal arises from these (d, c * s >= 2**-126)
    assert torch.equal(p16[normal], want_p[normal]) and torch.equal(rho[normal], want_rho[normal])
    assert torch.equal(back[normal], mw.join(want_p, want_rho)[normal])


def test_split_in_place_and_options():
    x = torch.randn(7, 5)
    p16, rho = torch.empty(7, 5, dtype=torch.bfloat16), torch.empty(7, 5, dtype=torch.int16)
    mw.split_(x, p16, rho)
    want_p, want_rho = mw.split(x, torch.bfloat16, "int16")
    assert torch.equal(p16, want_p) and torch.equal(rho, want_rho)
    with pytest.raises(ValueError, match="'int8'"):
        mw.check_option("int4", "FOAM")
    with pytest.raises(ValueError, match="dtype"):
        mw.split(x, torch.float32)


# ------------------------------------------------------------- the optimizer, 1000 steps
# a partial last block at level 2 (the folded update) and a 1-d one (the elementwise update);
# the codec is elementwise, so more shapes would only cost time over 1,000 steps
SHAPES = [(37, 21), (64,)]
STEPS = 1000


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm())


def _weights(opt, params) -> list[torch.Tensor]:
    out = []
    for p in params:
        rho = opt.state[p].get(mw.RHO_KEY)
        out.append(p.detach().to(F64) if rho is None else mw.join(p.detach(), rho).to(F64))
    return out


# (weight dtype, master_weights) of each run; float32 is the master copy the others track
RUNS = [
    (torch.float32, None),
    (torch.bfloat16, "int8"),
    (torch.bfloat16, "int16"),
    (torch.bfloat16, None),
    (torch.float16, "int8"),
    (torch.float16, None),
]


def test_tracks_float32_master_over_1000_steps():
    """The weights of bf16/fp16 + correction stay with a float32-master FOAM; plain 16-bit
    weights, stepped with the same float32 math, drift away.

    Every run is a param group of one FOAM (same hyperparameters, same gradients, which are
    bf16 values, so every run sees them exactly); the float32 run is held to the float64 model.
    The bound: each step rounds the weight once to the correction's grid, an error of at most
    ``u = 2**-(M+1) / (2 Q)`` relative (one split, see the round-trip test) plus the float32
    step's own ``2**-24``. Those errors are independent and centred, so after ``T`` steps their
    sum has a standard deviation of at most ``sqrt(T / 3) * u`` per element (uniform
    roundings): each tensor's relative error is held to twice that. Int8 on bf16 gives
    ``2 * sqrt(1000 / 3) * 2**-16 ~ 2**-10.8``: one rounding is ``2**-16``, and they add up.
    """
    torch.manual_seed(0)
    hp = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2)
    theta0 = [torch.randn(s).to(torch.bfloat16).to(F32) for s in SHAPES]
    runs = [[t.to(dtype).clone().requires_grad_() for t in theta0] for dtype, _w in RUNS]
    groups = [{"params": ps, "master_weights": w} for ps, (_d, w) in zip(runs, RUNS)]
    opt = FOAM(groups, level=2, **hp)
    model = [ParamModel.create(t, 2) for t in theta0]
    model_hp = ModelHyper(lr=hp["lr"], betas=hp["betas"], weight_decay=hp["weight_decay"])
    for _ in range(STEPS):
        grads = [torch.randn(s).to(torch.bfloat16) for s in SHAPES]
        for params in runs:
            for p, g in zip(params, grads):
                p.grad = g.to(p.dtype)
        opt.step()
        for m, g in zip(model, grads):
            m.step(g, model_hp)

    for p, m in zip(runs[0], model):  # the float32 master itself follows ALGORITHM.md
        assert_param_matches(p, m, what="float32 master")
    ref = _weights(opt, runs[0])
    errors = {
        (dtype, width): [_relative(a, b) for a, b in zip(_weights(opt, params), ref)]
        for params, (dtype, width) in zip(runs[1:], RUNS[1:])
    }
    print(f"\nrelative weight error vs the float32 master after {STEPS} steps (log2):")
    for (dtype, width), errs in errors.items():
        print(f"  {str(dtype):16} {str(width):6} {[round(math.log2(e), 2) for e in errs]}")
    for dtype, width in RUNS[1:]:
        if width is None:
            continue
        mant, _emin = LOW[dtype]
        u = 2.0 ** -(mant + 1) / (2 * WIDTHS[width]) + unit_roundoff(F32)
        corrected = errors[dtype, width]
        assert max(corrected) <= 2 * math.sqrt(STEPS / 3) * u, (dtype, width)
        # plain 16-bit weights round to the 16-bit grid every step: many roundings' error
        plain = errors[dtype, None]
        assert min(plain) > 4 * unit_roundoff(dtype)
        assert min(plain) > 16 * max(corrected)


# ------------------------------------------------------------------------ optimizer state
def _step(opt, params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    opt.step()


def test_state_keys_dtypes_and_float32_params():
    params = [
        torch.randn(3, 6, 9).to(torch.bfloat16).requires_grad_(),
        torch.randn(5).to(torch.float16).requires_grad_(),
        torch.randn(4, 4).requires_grad_(),  # float32: its own master, no correction
        torch.zeros(0, 4).to(torch.bfloat16).requires_grad_(),  # empty
    ]
    opt = FOAM(params, master_weights="int16")
    before = [p.detach().clone() for p in params]
    _step(opt, params, 0)
    assert not torch.equal(params[0], before[0])
    assert opt.state[params[3]][mw.RHO_KEY].shape == (0, 4)
    assert opt.state[params[0]][mw.RHO_KEY].dtype == torch.int16
    assert opt.state[params[0]][mw.RHO_KEY].shape == params[0].shape
    assert opt.state[params[1]][mw.RHO_KEY].shape == params[1].shape
    assert mw.RHO_KEY not in opt.state[params[2]]
    assert opt.param_groups[0]["master_weights"] == "int16"
    # explain() reports moments only: [3, 6, 9] at level 2 -> [3, 6, 3], two float32 moments
    assert foam_compile.explain(opt).rows[0][3] == 3 * 6 * 3 * 4 * 2


def test_invalid_option_is_refused():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="master_weights='int4'"):
        FOAM([p], master_weights="int4")
    opt = FOAM([p])
    opt.param_groups[0]["master_weights"] = "fp32"
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="'int16'"):
        opt.step()


def test_switching_the_option_mid_run():
    p = torch.randn(8, 12).to(torch.bfloat16).requires_grad_()
    opt = FOAM([p], level=2)
    _step(opt, [p], 0)
    before = p.detach().clone()
    opt.param_groups[0]["master_weights"] = "int8"  # on: theta = p, the correction starts at 0
    params, grads, tensors, layouts = [], [], [], []
    opt._init_group(opt.param_groups[0], params, grads, tensors, layouts)
    assert torch.equal(opt.state[p][mw.RHO_KEY], torch.zeros_like(p, dtype=torch.int8))
    assert torch.equal(p, before) and mw.RHO_KEY in layouts[0][2]
    _step(opt, [p], 1)
    theta = mw.join(p.detach(), opt.state[p][mw.RHO_KEY])
    opt.param_groups[0]["master_weights"] = "int16"  # re-coded, p kept
    opt._init_group(opt.param_groups[0], [], [], [], [])
    rho16 = opt.state[p][mw.RHO_KEY]
    assert rho16.dtype == torch.int16
    err = (mw.join(p.detach(), rho16) - theta).abs()
    s = mw.half_ulp(p.detach())
    assert (err <= s / (2 * 32767) + theta.abs() * unit_roundoff(F32)).all()
    opt.param_groups[0]["master_weights"] = None  # off: dropped
    _step(opt, [p], 3)
    assert mw.RHO_KEY not in opt.state[p]


def test_correction_on_a_float32_parameter_is_refused():
    p = torch.randn(4, 4, requires_grad=True)
    opt = FOAM([p], master_weights="int8")
    _step(opt, [p], 0)
    opt.state[p][mw.RHO_KEY] = torch.zeros(4, 4, dtype=torch.int8)
    p.grad = torch.ones(4, 4)
    with pytest.raises(RuntimeError, match="correction bits"):
        opt.step()


def _model(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 24), torch.nn.Linear(24, 6)).to(dtype)


def test_checkpoint_round_trip_continues_bitwise():
    model = _model()
    opt = FOAM(model.parameters(), lr=1e-2, master_weights="int16")
    params = list(model.parameters())
    for i in range(3):
        _step(opt, params, i)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for i in range(3, 6):
        _step(opt, params, i)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = _model()
    model2.load_state_dict(ckpt["model"])
    opt2 = FOAM(model2.parameters(), lr=1e-2, master_weights="int16")
    opt2.load_state_dict(ckpt["opt"])
    params2 = list(model2.parameters())
    rho = opt2.state[params2[0]][mw.RHO_KEY]
    assert rho.dtype == torch.int16  # not cast to the parameter's bf16 by torch's loader
    for i in range(3, 6):
        _step(opt2, params2, i)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p][mw.RHO_KEY], opt2.state[q][mw.RHO_KEY])


def test_bad_correction_in_checkpoint_leaves_state_intact():
    model = _model()
    opt = FOAM(model.parameters(), master_weights="int8")
    params = list(model.parameters())
    _step(opt, params, 0)
    sd = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[params[0]].items() if torch.is_tensor(v)}
    bad = {**sd, "state": {**sd["state"], 0: {**sd["state"][0]}}}
    bad["state"][0][mw.RHO_KEY] = torch.zeros(3, dtype=torch.int8)
    with pytest.raises(ValueError, match="master_rho"):
        opt.load_state_dict(bad)
    for k, v in before.items():
        assert torch.equal(opt.state[params[0]][k], v)


def test_exports():
    model = _model()
    opt = FOAM(model.parameters(), master_weights="int8")
    params = list(model.parameters())
    for i in range(3):
        _step(opt, params, i)
    full = mw.full_precision_state_dict(model, opt)
    for p, value in zip(model.parameters(), full.values()):
        assert value.dtype == F32
        assert torch.equal(value, mw.join(p.detach(), opt.state[p][mw.RHO_KEY]))
    assert all(
        mw.RHO_KEY not in st for st in foam_compile.export_adamw_state_dict(opt)["state"].values()
    )
    # the float32 export loads back into bf16 + correction unchanged
    model2 = _model()
    opt2 = FOAM(model2.parameters(), master_weights="int8")
    _step(opt2, list(model2.parameters()), 9)  # creates the corrections
    mw.load_full_precision_state_dict(model2, opt2, full)
    for p, q in zip(params, model2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p][mw.RHO_KEY], opt2.state[q][mw.RHO_KEY])
    with pytest.raises(ValueError, match="shape"):
        mw.load_full_precision_state_dict(model2, opt2, {**full, "0.weight": torch.zeros(3)})


def test_functional_refuses_a_state_that_disagrees():
    p = torch.randn(4, 8).to(torch.bfloat16)
    st = {"step": torch.tensor(0.0), "foam_level": 0}
    st.update(exp_avg=torch.zeros(4, 8), exp_avg_sq=torch.zeros(4, 8))
    st[mw.RHO_KEY] = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="master_weights=None"):
        foam_adam_([p], [torch.ones_like(p)], [st], hp=Hyper(lr=1e-3))
    foam_adam_([p], [torch.ones_like(p)], [st], hp=Hyper(lr=1e-3, master_weights="int8"))
    assert float(st["step"]) == 1


# ------------------------------------------------------------------ step backends decline
def test_fast_paths_decline_corrections(caplog):
    """A backend that does not set MASTER_WEIGHTS never gets a parameter with a correction: a
    stand-in fast path that takes everything is declined and plain torch steps it."""
    fake = types.ModuleType("tests._fake_fast_path")
    fake.supports = lambda p, g, level, fmt, hp: None
    fake.step_ = lambda *a: (_ for _ in ()).throw(AssertionError("fake backend stepped"))
    sys.modules[fake.__name__] = fake
    saved = list(backends._REGISTRY)
    try:
        backends.register("fake", fake.__name__, ("cpu",), before=backends.registered()[0])
        p = torch.randn(8, 8).to(torch.bfloat16)
        fmt = foam_compile.state.get_format("fp32")
        assert backends.select(p, p, 2, fmt, Hyper(lr=1e-3)) is fake
        with caplog.at_level(logging.INFO, logger="foam_compile"):
            chosen = backends.select(p, p, 2, fmt, Hyper(lr=1e-3, master_weights="int8"))
        assert chosen is not fake and chosen.MASTER_WEIGHTS  # plain torch, or the CPU kernel
        assert "does not read correction bits" in caplog.text
        # float32 parameters carry no correction: the fast path keeps them
        assert backends.select(p.float(), p, 2, fmt, Hyper(lr=1e-3, master_weights="int8")) is fake
    finally:
        backends._REGISTRY[:] = saved
        backends._MODULES.pop("fake", None)
        sys.modules.pop(fake.__name__, None)
    # both fast paths have opted in: the Triton one (tests/kernels/test_master_kernel.py) and the
    # CPU kernel (tests/kernels/test_cpu_quant.py), which takes a bf16 parameter with corrections
    for name in ("triton", "cpu"):
        module = backends._load(next(b for b in backends._REGISTRY if b.name == name))
        assert module is None or getattr(module, "MASTER_WEIGHTS", False) is True, name
    p = torch.randn(8, 8).to(torch.bfloat16)
    fmt = foam_compile.state.get_format("fp32")
    chosen = backends.select(p, p, 2, fmt, Hyper(lr=1e-3, master_weights="int8"))
    assert chosen.__name__ == "foam_compile.backends.cpu"


def test_compiled_step_equals_eager(fresh_dynamo):
    """Inductor drops narrowing casts inside fused kernels; the split is written so that the
    compiled step still rounds exactly as eager does."""
    torch.manual_seed(0)
    shapes = [(6, 10), (7,)]
    eager = [torch.randn(s).to(torch.bfloat16).requires_grad_() for s in shapes]
    compiled = [p.detach().clone().requires_grad_() for p in eager]
    o1 = FOAM(eager, lr=torch.tensor(1e-3), master_weights="int8")
    o2 = FOAM(compiled, lr=torch.tensor(1e-3), master_weights="int8")
    step = torch.compile(o2.step)
    for _ in range(2):
        grads = [torch.randn(s).to(torch.bfloat16) for s in shapes]
        for p, q, g in zip(eager, compiled, grads):
            p.grad, q.grad = g, g.clone()
        o1.step()
        step()
    for p, q in zip(eager, compiled):
        assert torch.equal(p, q)
        assert torch.equal(o1.state[p][mw.RHO_KEY], o2.state[q][mw.RHO_KEY])
