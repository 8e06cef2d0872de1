"""The FOAM Triton kernels against the float64 model of ALGORITHM.md (``tests/float64_model.py``).

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set below before
anything imports triton), so shapes stay small. Every case starts from nonzero moments and runs
several steps (bias correction and state carry). The step works in place, so outputs cannot be
NaN-poisoned up front; instead every tensor sits inside a guarded buffer: gradients between NaNs
(a block mean that reads past its row turns NaN), outputs between sentinels (a write past a tensor
changes one), and with float32 tolerances far below one update an unwritten element fails too.
Tolerances come from the dtypes' unit roundoffs, not from magic numbers.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import pytest  # noqa: E402
from float64_model import F64, Hyper, model_step, unit_roundoff  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

triton = pytest.importorskip("triton")

from foam_compile import kernels  # noqa: E402
from foam_compile.backends import triton_cuda  # noqa: E402
from foam_compile.hyper import Hyper as FoamHyper  # noqa: E402
from foam_compile.kernels import foam_adam  # noqa: E402
from foam_compile.reference import effective_level, folded_shape  # noqa: E402
from foam_compile.state import get_format  # noqa: E402
from foam_compile.update import foam_update_  # noqa: E402


def state_shape(shape, level):
    return folded_shape(shape, effective_level(shape, level))


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
U32 = torch.finfo(torch.float32).eps / 2
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def hyper(**kw) -> Hyper:
    """The float64 model's hyperparameters, with a weight decay large enough to matter."""
    return Hyper(**{"weight_decay": 0.1, **kw})


# ------------------------------------------------------------------------------ fixtures
SENTINEL = -777.0  # guard value around outputs: an out-of-bounds write changes it


def guarded(values: torch.Tensor, guard: int, fill=float("nan")):
    """``values`` copied into the middle of a buffer of ``fill``; returns (view, buffer)."""
    buf = torch.full((values.numel() + 2 * guard,), fill, dtype=values.dtype, device=DEVICE)
    view = buf[guard : guard + values.numel()].view(values.shape)
    view.copy_(values)
    return view, buf


@dataclass
class Case:
    """One parameter with its kernel-side tensors (in NaN guards) and its float64 model."""

    shape: tuple
    level: int
    dtype: torch.dtype
    guard: int
    gen: torch.Generator
    p: torch.Tensor = None
    m: torch.Tensor = None
    v: torch.Tensor = None
    vmax: torch.Tensor = None
    bufs: list = field(default_factory=list)
    model: tuple = None
    grad: torch.Tensor = None
    max_p: float = 0.0
    max_update: float = 0.0
    max_g: float = 0.0

    def __post_init__(self):
        fshape = state_shape(self.shape, self.level)
        rnd = lambda s: torch.randn(s, generator=self.gen, dtype=F64)  # noqa: E731
        p0 = rnd(self.shape).to(self.dtype)
        m0 = (0.1 * rnd(fshape)).float()
        v0 = (0.01 + 0.1 * torch.rand(fshape, generator=self.gen, dtype=F64)).float()
        vmax0 = v0 + (0.01 * torch.rand(fshape, generator=self.gen, dtype=F64)).float()
        self.p, bp = guarded(p0.to(DEVICE), self.guard, SENTINEL)
        self.m, bm = guarded(m0.to(DEVICE), self.guard, SENTINEL)
        self.v, bv = guarded(v0.to(DEVICE), self.guard, SENTINEL)
        self.vmax, bx = guarded(vmax0.to(DEVICE), self.guard, SENTINEL)
        self.bufs = [bp, bm, bv, bx]
        self.model = tuple(x.to(F64) for x in (p0, m0, v0, vmax0))
        self.max_p = float(p0.abs().max()) if p0.numel() else 0.0

    def new_grad(self):
        g = torch.randn(self.shape, generator=self.gen, dtype=F64).to(self.dtype)
        self.grad, _ = guarded(g.to(DEVICE), self.guard)
        self.max_g = max(self.max_g, float(g.abs().max()) if g.numel() else 0.0)
        return self.grad

    def model_step(self, t: int, hp: Hyper):
        old = self.model[0]
        self.model = model_step(self.model[0], self.grad.cpu(), *self.model[1:], t, self.level, hp)
        if old.numel():
            self.max_update = max(self.max_update, float((self.model[0] - old).abs().max()))
            self.max_p = max(self.max_p, float(self.model[0].abs().max()))

    def check(self, steps: int, hp: Hyper):
        level = effective_level(self.shape, self.level)
        ops = 32 + level  # float32 roundings in one update chain (a block sum adds ~level)
        # The parameter is rounded to its dtype once a step; the float32 update adds a few
        # roundings of its own size. Errors add up over the steps.
        p_err = steps * unit_roundoff(self.dtype) * self.max_p
        tol_p = p_err + steps * ops * U32 * (self.max_p + self.max_update)
        # Coupled decay feeds that parameter error into the gradient: g + wd * p.
        g_err = 0.0 if hp.decoupled_weight_decay else hp.weight_decay * p_err
        p, m, v, vmax = self.model
        torch.testing.assert_close(self.p.cpu().to(F64), p, rtol=0, atol=tol_p)
        g_max = self.max_g + hp.weight_decay * self.max_p
        tol_m = steps * (ops * U32 * (float(m.abs().max()) + g_max) + g_err) if m.numel() else 0
        tol_v = (
            steps * (ops * U32 * (float(v.abs().max()) + g_max**2) + 2 * g_max * g_err)
            if v.numel()
            else 0
        )
        torch.testing.assert_close(self.m.cpu().to(F64), m, rtol=0, atol=tol_m)
        torch.testing.assert_close(self.v.cpu().to(F64), v, rtol=0, atol=tol_v)
        if hp.amsgrad:
            torch.testing.assert_close(self.vmax.cpu().to(F64), vmax, rtol=0, atol=tol_v)
        for buf, x in zip(self.bufs, (self.p, self.m, self.v, self.vmax)):
            # Nothing written outside (the guards still hold the sentinel); nothing read from
            # outside (the gradient's NaN guards would have poisoned a block mean).
            assert (buf[: self.guard] == SENTINEL).all(), "write before the tensor"
            assert (buf[self.guard + x.numel() :] == SENTINEL).all(), "write past the tensor"
            assert not torch.isnan(x).any(), "read outside the gradient"


def make_cases(specs, seed: int, guard: int = 16):
    gen = torch.Generator().manual_seed(seed)
    return [Case(tuple(shape), level, dtype, guard, gen) for shape, level, dtype in specs]


def run_single(cases, hp: Hyper, steps: int = 3, lr_tensor=False, step_tensor=False):
    for t in range(1, steps + 1):
        for c in cases:
            g = c.new_grad()
            lr = torch.tensor(hp.lr, device=DEVICE) if lr_tensor else hp.lr
            step = torch.tensor(float(t), device=DEVICE) if step_tensor else t
            kw = hp.reference_kwargs()
            kw.pop("lr")
            kernels.foam_adam_step_(
                c.p,
                g,
                c.m,
                c.v,
                c.vmax if hp.amsgrad else None,
                lr=lr,
                step=step,
                level=c.level,
                **kw,
            )
            c.model_step(t, hp)
    for c in cases:
        c.check(steps, hp)


def run_grouped(cases, hp: Hyper, steps: int = 3, lr_tensor=False, step_tensor=False):
    for t in range(1, steps + 1):
        grads = [c.new_grad() for c in cases]
        lr = torch.tensor(hp.lr, device=DEVICE) if lr_tensor else hp.lr
        steps_t = [torch.tensor(float(t), device=DEVICE if step_tensor else "cpu") for _ in cases]
        kw = hp.reference_kwargs()
        kw.pop("lr")
        kernels.foam_adam_grouped_(
            [c.p for c in cases],
            grads,
            [c.m for c in cases],
            [c.v for c in cases],
            [c.vmax for c in cases] if hp.amsgrad else None,
            steps_t,
            [c.level for c in cases],
            lr=lr,
            **kw,
        )
        for c in cases:
            c.model_step(t, hp)
    for c in cases:
        c.check(steps, hp)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LEVELS = [0, 1, 2, 3, 8]


# ------------------------------------------------------------------------------ one tensor
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("level", LEVELS)
def test_single_tensor_matches_model(dtype, level):
    # Partial last blocks at every level > 0, a 3-d tensor, a 1-d tensor (runs at level 0).
    specs = [((5, 123), level, dtype), ((2, 3, 40), level, dtype), ((37,), level, dtype)]
    run_single(
        make_cases(specs, seed=level * 10 + DTYPES.index(dtype)), hyper(scale=0.5, res_scale=0.8)
    )


@pytest.mark.parametrize(
    "shape, level",
    [((3, 5461), 2), ((4, 3), 3), ((2, 3), 8), ((1, 256), 8), ((6, 512), 2), ((7, 1), 1), ((), 2)],
    ids=str,
)
def test_awkward_shapes(shape, level):
    run_single(make_cases([(shape, level, torch.float32)], seed=7), hyper(scale=0.25))


OPTIONS = {
    "adamw": hyper(),
    "adam_coupled_wd": hyper(decoupled_weight_decay=False, weight_decay=0.05),
    "no_wd": hyper(weight_decay=0.0),
    "amsgrad": hyper(amsgrad=True),
    "maximize": hyper(maximize=True),
    "maximize_coupled_amsgrad": hyper(maximize=True, decoupled_weight_decay=False, amsgrad=True),
    "scale_res_scale": hyper(scale=0.25, res_scale=0.5),
    "res_scale_0": hyper(res_scale=0.0),
    "betas": hyper(betas=(0.5, 0.95), eps=1e-3, lr=3e-2),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("level", [0, 3])
def test_options(option, level):
    specs = [((5, 123), level, torch.float32), ((3, 40), level, torch.bfloat16)]
    run_single(make_cases(specs, seed=3), OPTIONS[option])


@pytest.mark.parametrize("lr_tensor, step_tensor", [(True, False), (False, True), (True, True)])
def test_tensor_lr_and_step(lr_tensor, step_tensor):
    # A step tensor on the device makes the kernel compute the bias corrections itself.
    specs = [((5, 123), 2, torch.float32), ((9, 17), 0, torch.float16)]
    run_single(
        make_cases(specs, seed=11),
        hyper(amsgrad=True, scale=0.5),
        steps=3,
        lr_tensor=lr_tensor,
        step_tensor=step_tensor,
    )


def test_device_step_bias_correction_matches_host():
    """In-kernel float64 bias correction (hi/lo betas) equals the host's, also at large t."""
    for t in (1, 2, 10, 1234, 98765):
        outs = []
        for step in (t, torch.tensor(float(t), device=DEVICE)):
            gen = torch.Generator().manual_seed(0)
            p = torch.randn(4, 64, generator=gen).to(DEVICE)
            g = torch.randn(4, 64, generator=gen).to(DEVICE)
            m = torch.zeros(4, 16, device=DEVICE)
            v = torch.zeros(4, 16, device=DEVICE)
            kernels.foam_adam_step_(p, g, m, v, lr=1e-2, step=step, level=2, beta2=0.999)
            outs.append(p)
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=4 * U32 * 2)


def test_level0_is_torch_adamw():
    """ALGORITHM.md: at level 0 the step is torch.optim.AdamW's (alpha is not applied)."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(6, 33, generator=gen)
    ref = torch.nn.Parameter(w.clone())
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, amsgrad=True)
    p = w.clone().to(DEVICE)
    m, v, vmax = (torch.zeros_like(p) for _ in range(3))
    for t in range(1, 4):
        g = torch.randn(6, 33, generator=gen)
        ref.grad = g.clone()
        opt.step()
        kernels.foam_adam_step_(
            p,
            g.to(DEVICE),
            m,
            v,
            vmax,
            lr=1e-2,
            step=t,
            beta2=0.99,
            weight_decay=0.1,
            level=0,
            amsgrad=True,
            scale=0.25,
        )
    state = opt.state[ref]
    torch.testing.assert_close(p.cpu(), ref.detach(), rtol=0, atol=3 * 32 * U32 * 4)
    torch.testing.assert_close(m.cpu(), state["exp_avg"], rtol=64 * U32, atol=1e-9)
    torch.testing.assert_close(vmax.cpu(), state["max_exp_avg_sq"], rtol=64 * U32, atol=1e-12)


# ---------------------------------------------------------------------------- many tensors
MIXED = [
    ((5, 123), 2, torch.float32),
    ((3, 40), 2, torch.float32),
    ((64, 32), 2, torch.float32),
    ((4, 3), 3, torch.float32),
    ((37,), 3, torch.float32),  # 1-d: level 0
    ((), 2, torch.float32),  # 0-d: level 0
    ((0, 8), 2, torch.float32),  # empty: skipped
    ((6, 600), 8, torch.bfloat16),
    ((2, 3, 40), 1, torch.bfloat16),
    ((9, 17), 0, torch.float16),
    ((3, 2000), 0, torch.float32),  # several chunks
    ((40, 128), 2, torch.float32),  # several chunks, whole blocks
    ((70, 123), 3, torch.float32),  # several chunks, a partial block per row
]


@pytest.mark.parametrize("guard", [16, 7], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("option", ["adamw", "maximize_coupled_amsgrad", "scale_res_scale"])
def test_grouped_matches_model(guard, option):
    cases = make_cases(MIXED, seed=21, guard=guard)
    run_grouped(cases, OPTIONS[option], steps=3)


@pytest.mark.parametrize("lr_tensor, step_tensor", [(True, True), (False, True), (True, False)])
def test_grouped_tensor_lr_and_step(lr_tensor, step_tensor):
    cases = make_cases(MIXED[:5] + MIXED[7:9], seed=22)
    run_grouped(
        cases, hyper(amsgrad=True, scale=0.5), steps=3, lr_tensor=lr_tensor, step_tensor=step_tensor
    )


def test_grouped_is_a_handful_of_launches(monkeypatch):
    """Launches = distinct (param dtype, grad dtype, level, even, aligned), not parameters."""
    launches = []
    real = foam_adam._launch_multi
    monkeypatch.setattr(
        foam_adam, "_launch_multi", lambda *a, **k: (launches.append(k["level"]), real(*a, **k))
    )
    specs = (
        [((8, 64), 2, torch.float32)] * 20
        + [((16,), 2, torch.float32)] * 10
        + [((4, 32), 3, torch.bfloat16)] * 10
    )
    cases = make_cases(specs, seed=1)
    run_grouped(cases, hyper(), steps=1)
    assert sorted(launches) == [0, 2, 3]


def test_grouped_per_tensor_steps():
    """Parameters at different step counts: device steps go in one launch, host steps split."""
    hp = hyper()
    for on_device in (True, False):
        cases = make_cases([((5, 40), 2, torch.float32), ((3, 16), 2, torch.float32)], seed=4)
        t0 = [1, 5]  # the second parameter joined four steps earlier
        for k in range(2):
            grads = [c.new_grad() for c in cases]
            steps = [torch.tensor(float(t + k), device=DEVICE if on_device else "cpu") for t in t0]
            kernels.foam_adam_grouped_(
                [c.p for c in cases],
                grads,
                [c.m for c in cases],
                [c.v for c in cases],
                None,
                steps,
                [2, 2],
                lr=hp.lr,
                weight_decay=hp.weight_decay,
            )
            for c, t in zip(cases, t0):
                c.model_step(t + k, hp)
        for c in cases:
            c.check(2, hp)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 6),
    n=st.integers(1, 300),
    level=st.sampled_from(LEVELS),
    dtype=st.sampled_from(DTYPES),
    grouped=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(rows, n, level, dtype, grouped, seed):
    cases = make_cases([((rows, n), level, dtype), ((n,), level, dtype)], seed=seed, guard=5)
    (run_grouped if grouped else run_single)(cases, hyper(scale=0.5, amsgrad=True), steps=2)


AUTOTUNE_SCRIPT = """
import os, torch
from foam_compile.kernels import foam_adam
from foam_compile.hyper import Hyper
from foam_compile.reference import folded_shape
from foam_compile.update import foam_update_
assert len(foam_adam._CONFIGS) > 1
gen = torch.Generator().manual_seed(0)
def tensors(shape, level):
    fshape = folded_shape(shape, level)
    return [torch.randn(shape, generator=gen), 0.1 * torch.randn(fshape, generator=gen),
            0.1 + torch.rand(fshape, generator=gen)]
hp = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True,
          amsgrad=False, maximize=False, scale=0.5, res_scale=1.0)
for grouped in (False, True):
    for shape, level in (((5, 123), 2), ((3, 40), 0)):
        p, m, v = tensors(shape, level)
        ref = [x.clone() for x in (p, m, v)]
        for t in (1, 2):
            g = torch.randn(shape, generator=gen)
            if grouped:
                foam_adam.foam_adam_grouped_([p], [g], [m], [v], None, [torch.tensor(float(t))],
                                             [level], lr=1e-2, **hp)
            else:
                foam_adam.foam_adam_step_(p, g, m, v, lr=1e-2, step=t, level=level, **hp)
            foam_update_(ref[0], g, ref[1], ref[2], None, t, level, Hyper(lr=1e-2, **hp))
        for x, y in zip((p, m, v), ref):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
assert foam_adam._MULTI_TUNED, "the multi-tensor kernel was not tuned"
print("autotuned-ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only check of the tuners")
def test_autotuning_leaves_live_state_untouched():
    """With several configs, tuning (restore_value / scratch group) must not step the state."""
    env = dict(os.environ, TRITON_INTERPRET="1", FOAM_TRITON_AUTOTUNE="force")
    root = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", AUTOTUNE_SCRIPT],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0 and "autotuned-ok" in out.stdout, out.stderr[-3000:]


# -------------------------------------------------------------------------------- the ops
def _op_args(c, g, hp: Hyper, t):
    return (c.p, g, c.m, c.v, c.vmax if hp.amsgrad else None, float(t), None, c.level)


def _op_kw(hp: Hyper, **changed):
    """The step ops' keyword arguments (``hyper.OP_SCHEMA_KWARGS``) for ``hp``."""
    return {**hp.reference_kwargs(), "lr_tensor": None, **changed}


# amsgrad on, every other option at its default: what the compiled-op tests step with
_AMSGRAD_PLAIN = dict(
    decoupled_weight_decay=True, amsgrad=True, maximize=False, scale=1.0, res_scale=1.0
)


def test_op_adam_step_matches_model():
    hp = hyper(amsgrad=True, scale=0.5)
    cases = make_cases([((5, 123), 2, torch.float32), ((37,), 3, torch.bfloat16)], seed=31)
    for t in (1, 2):
        for c in cases:
            torch.ops.foam.adam_step_(*_op_args(c, c.new_grad(), hp, t), **_op_kw(hp))
            c.model_step(t, hp)
    for c in cases:
        c.check(2, hp)


def test_op_grouped_with_fallback_tensors():
    """The grouped op sends float64 parameters (and CPU ones without the interpreter) to torch."""
    hp = hyper(amsgrad=True, scale=0.5)
    cases = make_cases(
        [((5, 123), 2, torch.float32), ((6, 10), 3, torch.float64), ((4, 9), 0, torch.bfloat16)],
        seed=32,
    )
    for t in (1, 2):
        grads = [c.new_grad() for c in cases]
        torch.ops.foam.adam_step_grouped_(
            [c.p for c in cases],
            grads,
            [c.m for c in cases],
            [c.v for c in cases],
            [c.vmax for c in cases],
            [torch.tensor(float(t)) for _ in cases],
            [c.level for c in cases],
            **_op_kw(hp),
        )
        for c in cases:
            c.model_step(t, hp)
    for c in cases:
        c.check(2, hp)


@pytest.mark.parametrize("level", [0, 2, 3])
def test_torch_fallback_matches_model(level):
    hp = hyper(amsgrad=True, scale=0.5, res_scale=0.7, maximize=True)
    cases = make_cases([((5, 123), level, torch.float32), ((3, 7), level, torch.float64)], seed=33)
    for t in (1, 2, 3):
        for c in cases:
            g = c.new_grad()
            foam_hp = FoamHyper(**hp.reference_kwargs())
            foam_update_(c.p, g, c.m, c.v, c.vmax, torch.tensor(float(t)), c.level, foam_hp)
            c.model_step(t, hp)
    for c in cases:
        c.check(3, hp)


def test_ops_compile_and_declare_their_mutations(fresh_dynamo):
    """Under torch.compile both ops write what they declare (no output is lost or reordered)."""
    hp = hyper(amsgrad=True)
    a = make_cases([((5, 40), 2, torch.float32)], seed=41)[0]
    b = make_cases([((5, 40), 2, torch.float32)], seed=41)[0]  # the same values, eager

    def one(p, g, m, v, vm, step):
        torch.ops.foam.adam_step_(
            p,
            g,
            m,
            v,
            vm,
            0.0,
            step,
            2,
            **_op_kw(hp, **_AMSGRAD_PLAIN),
        )
        return p.sum()

    def grouped(p, g, m, v, vm, step):
        torch.ops.foam.adam_step_grouped_(
            [p],
            [g],
            [m],
            [v],
            [vm],
            [step],
            [2],
            **_op_kw(hp, **_AMSGRAD_PLAIN),
        )
        return p.sum()

    for fn in (one, grouped):
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        for t in (1, 2):
            g = a.new_grad()
            b.grad = g.clone()
            step = torch.tensor(float(t), device=DEVICE)
            out = compiled(a.p, g, a.m, a.v, a.vmax, step)
            ref = fn(b.p, b.grad, b.m, b.v, b.vmax, step)
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
            for x, y in zip((a.p, a.m, a.v, a.vmax), (b.p, b.m, b.v, b.vmax)):
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- checking
def _good(shape=(4, 8), level=2):
    p = torch.randn(*shape, device=DEVICE)
    fshape = state_shape(shape, level)
    return dict(
        param=p,
        grad=torch.randn_like(p),
        exp_avg=torch.zeros(fshape, device=DEVICE),
        exp_avg_sq=torch.zeros(fshape, device=DEVICE),
    )


@pytest.mark.parametrize(
    "change, kwargs, match",
    [
        ("grad", {}, "grad"),
        ("exp_avg", {}, "exp_avg"),
        ("exp_avg_sq_dtype", {}, "exp_avg_sq must be float32"),
        ("noncontig", {}, "contiguous"),
        ("param_dtype", {}, "param dtype"),
        (None, {"level": 11}, "level"),
        (None, {"amsgrad": True}, "max_exp_avg_sq"),
        (None, {"step": 0}, "step"),
        (None, {"step": 1.5}, "step"),
        (None, {"beta2": 1.0}, "beta2"),
        (None, {"lr": torch.tensor([1.0, 2.0])}, "lr"),
    ],
)
def test_launcher_rejects_bad_inputs(change, kwargs, match):
    args = _good()
    if change == "grad":
        args["grad"] = torch.randn(4, 9, device=DEVICE)
    elif change == "exp_avg":
        args["exp_avg"] = torch.zeros(4, 3, device=DEVICE)
    elif change == "exp_avg_sq_dtype":
        args["exp_avg_sq"] = args["exp_avg_sq"].double()
    elif change == "noncontig":
        args["param"] = torch.randn(8, 4, device=DEVICE).t()
    elif change == "param_dtype":
        args["param"] = args["param"].double()
    kw = dict(lr=1e-3, step=1, level=2)
    kw.update(kwargs)
    before = args["param"].clone()
    with pytest.raises(ValueError, match=match):
        kernels.foam_adam_step_(**args, **kw)
    torch.testing.assert_close(args["param"], before)  # nothing written


def test_grouped_rejects_before_writing():
    good, bad = _good(), _good()
    bad["exp_avg"] = torch.zeros(4, 5, device=DEVICE)
    before = good["param"].clone()
    with pytest.raises(ValueError, match="parameter 1.*exp_avg"):
        kernels.foam_adam_grouped_(
            [good["param"], bad["param"]],
            [good["grad"], bad["grad"]],
            [good["exp_avg"], bad["exp_avg"]],
            [good["exp_avg_sq"], bad["exp_avg_sq"]],
            None,
            [torch.tensor(1.0)] * 2,
            [2, 2],
            lr=1e-3,
        )
    torch.testing.assert_close(good["param"], before)
    with pytest.raises(ValueError, match="levels has 1 entries"):
        kernels.foam_adam_grouped_(
            [good["param"]] * 2,
            [good["grad"]] * 2,
            [good["exp_avg"]] * 2,
            [good["exp_avg_sq"]] * 2,
            None,
            [1, 1],
            [2],
            lr=1e-3,
        )


def test_backend_supports():
    """The Triton backend takes what its kernel can run and says why not otherwise."""
    p = torch.zeros(4, 8, device=DEVICE)
    hp, fp32 = FoamHyper(lr=1e-3), get_format("fp32")
    assert triton_cuda.supports(p, p, 2, fp32, hp) is None
    assert "float32/bfloat16/float16" in triton_cuda.supports(p.double(), p.double(), 2, fp32, hp)
    assert triton_cuda.supports(p, p, kernels.MAX_LEVEL + 1, fp32, hp) is not None
    assert triton_cuda.supports(p.t(), p.t(), 2, fp32, hp) is not None


# -------------------------------------------------------------------------------- GPU only
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_level0_matches_fused_adamw(dtype):
    torch.manual_seed(0)
    w = torch.randn(257, 1031, device="cuda", dtype=dtype)
    ref = torch.nn.Parameter(w.clone())
    opt = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.1, fused=True)
    p = w.clone()
    m = torch.zeros_like(p, dtype=torch.float32)
    v = torch.zeros_like(m)
    for t in range(1, 6):
        g = torch.randn_like(w)
        ref.grad = g.clone()
        opt.step()
        kernels.foam_adam_grouped_(
            [p], [g], [m], [v], None, [torch.tensor(float(t))], [0], lr=1e-3, weight_decay=0.1
        )
    tol = 5 * (unit_roundoff(dtype) * 5 + 32 * U32 * 5)
    torch.testing.assert_close(p.float(), ref.detach().float(), rtol=0, atol=tol)


@requires_cuda
def test_cuda_autotuned_and_compiled_inductor(fresh_dynamo):
    """Real GPU: autotuning on, the triton_op under Inductor, large shapes, many tensors."""
    hp = hyper(amsgrad=True, scale=0.5)
    cases = make_cases(
        [
            ((512, 1000), 2, torch.bfloat16),
            ((300, 4096), 3, torch.float32),
            ((4097,), 0, torch.float32),
        ],
        seed=51,
    )
    run_grouped(cases, hp, steps=3, lr_tensor=True, step_tensor=True)
    c = make_cases([((256, 1030), 2, torch.float32)], seed=52)[0]

    @torch.compile(fullgraph=True)
    def step(p, g, m, v, vm, t):
        torch.ops.foam.adam_step_(
            p,
            g,
            m,
            v,
            vm,
            0.0,
            t,
            2,
            **_op_kw(
                hp,
                decoupled_weight_decay=True,
                amsgrad=True,
                maximize=False,
                scale=0.5,
                res_scale=1.0,
            ),
        )

    for t in (1, 2, 3):
        step(c.p, c.new_grad(), c.m, c.v, c.vmax, torch.tensor(float(t), device="cuda"))
        c.model_step(t, hp)
    c.check(3, hp)
