"""The C++ CPU kernel (``foam_compile/kernels/cpu``) against the float64 model of ALGORITHM.md.

Every level 0..10 in one multi-tensor call per (dtype, option set), with partial last blocks,
odd row counts, rows shorter than a vector, 0-d/1-d/3-d parameters, from nonzero moments over
several steps. Every tensor sits in a guarded buffer: gradients between NaNs (a block that reads
past its row turns NaN), parameters and moments between sentinels (a write past a tensor changes
one). Tolerances are the float64 model's, from the dtypes' unit roundoffs.
"""

import zlib

import pytest
import torch
from float64_model import (
    OPS,
    Hyper,
    ParamModel,
    assert_param_matches,
    assert_state_matches,
    unit_roundoff,
)

from foam_compile.kernels import cpu as kernel
from foam_compile.reference import effective_level, folded_shape

F64 = torch.float64
SENTINEL = -777.0
GUARD = 40  # elements of guard on each side: more than a vector of any dtype
LEVELS = range(11)

HYPERS = {
    "adamw": Hyper(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
    "everything": Hyper(
        lr=3e-2,
        betas=(0.8, 0.95),
        weight_decay=0.05,
        amsgrad=True,
        maximize=True,
        scale=0.25,
        res_scale=2.0,
    ),
    "coupled": Hyper(lr=1e-2, decoupled_weight_decay=False, weight_decay=0.1),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
GRAD_SCALES = (4.0, 1.0, 0.25)  # shrinking: amsgrad's running max differs from v


def generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def shapes_at(level: int) -> list[tuple[int, ...]]:
    """Whole blocks, a partial last block over odd rows, a row shorter than one block."""
    b = 1 << level
    out = [(5, 3 * b + 5), (3, 2 * b)]
    if level:
        out.append((2, 3, b // 2 + 1))
    else:
        out += [(), (1000,), (4, 3, 7)]
    return out


def guarded(values: torch.Tensor, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` in the middle of a 1-d buffer of ``fill``: (the view, the buffer)."""
    buf = torch.full((values.numel() + 2 * GUARD,), fill, dtype=values.dtype)
    view = buf[GUARD : GUARD + values.numel()].view(values.shape)
    view.copy_(values)
    return view, buf


def assert_guards(buf: torch.Tensor, what: str) -> None:
    for part in (buf[:GUARD], buf[-GUARD:]):
        assert (part == SENTINEL).all(), f"{what}: a write past the tensor"


class Case:
    """One parameter, its guarded tensors and its float64 model."""

    def __init__(self, shape, level, dtype, gen):
        std = 0.1 if dtype in (torch.bfloat16, torch.float16) else 1.0
        self.level = effective_level(shape, level)
        state_dtype = F64 if dtype == F64 else torch.float32
        fshape = folded_shape(shape, self.level)
        p0 = (torch.randn(shape, generator=gen, dtype=F64) * std).to(dtype)
        moments = [torch.randn(fshape, generator=gen, dtype=F64) * 1e-3 for _ in range(3)]
        m0, v0, vmax0 = moments[0], moments[1] ** 2, moments[1] ** 2 + moments[2] ** 2
        (self.p, self.p_buf), self.bufs = guarded(p0, SENTINEL), {}
        self.model = ParamModel.create(self.p, self.level)
        self.model.load_state(m0, v0, vmax0, step=3)
        self.state = {"step": torch.tensor(3.0)}
        for key, value in (("exp_avg", m0), ("exp_avg_sq", v0), ("max_exp_avg_sq", vmax0)):
            self.state[key], self.bufs[key] = guarded(value.to(state_dtype), SENTINEL)

    def grad(self, gen, scale):
        g = (torch.randn(self.p.shape, generator=gen, dtype=F64) * scale).to(self.p.dtype)
        return guarded(g, float("nan"))[0], g


def step_all(cases, grads, hp: Hyper, **kw) -> None:
    for c in cases:
        c.state["step"] += 1
    kernel.foam_cpu_step_(
        [c.p for c in cases],
        grads,
        [c.state["exp_avg"] for c in cases],
        [c.state["exp_avg_sq"] for c in cases],
        [c.state["max_exp_avg_sq"] for c in cases],
        [c.state["step"] for c in cases],
        [c.level for c in cases],
        **hp.reference_kwargs(),
        **kw,
    )


def check(cases, hp: Hyper) -> None:
    for c in cases:
        what = f"{tuple(c.p.shape)} level {c.level} {c.p.dtype}"
        math_dtype = F64 if c.p.dtype == F64 else torch.float32
        assert_param_matches(c.p, c.model, math_dtype=math_dtype, what=what)
        state = dict(c.state)
        if not hp.amsgrad:
            state.pop("max_exp_avg_sq")
        assert_state_matches(state, c.model, hp.amsgrad, math_dtype=math_dtype)
        assert_guards(c.p_buf, f"{what} param")
        for key, buf in c.bufs.items():
            assert_guards(buf, f"{what} {key}")


@pytest.mark.parametrize("option", sorted(HYPERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_level_matches_the_float64_model(dtype, option):
    if not kernel.supports_dtype(dtype):
        pytest.skip(f"this CPU's build takes no {dtype}")
    hp = HYPERS[option]
    gen = generator("levels", dtype, option)
    cases = [Case(s, lv, dtype, gen) for lv in LEVELS for s in shapes_at(lv)]
    # Adam's coupled decay feeds the stored (rounded) parameter into the moments: the model
    # starts each step from the stored 16-bit parameter, as the kernel does.
    resync = not hp.decoupled_weight_decay and dtype in (torch.bfloat16, torch.float16)
    for scale in GRAD_SCALES:
        for c in cases if resync else ():
            c.model.resync(c.p)
        grads = [c.grad(gen, scale) for c in cases]
        step_all(cases, [g for g, _ in grads], hp)
        for c, (_, g) in zip(cases, grads):
            c.model.step(g, hp)
    check(cases, hp)


def run_wide(threads: int, grad_layout, check_model: bool) -> list[torch.Tensor]:
    """Parameters large enough to be split between threads (inside rows too): the parameters
    and moments after two steps."""
    gen = generator("wide")
    shapes = [((13, 3001), 2), ((40_001,), 0), ((9, 4100), 5), ((33, 517), 1), ((7, 9), 3)]
    cases = [Case(s, lv, torch.float32, gen) for s, lv in shapes]
    hp = HYPERS["everything"]
    for scale in GRAD_SCALES[:2]:
        grads = [c.grad(gen, scale)[1] for c in cases]
        step_all(cases, [grad_layout(g) for g in grads], hp, threads=threads)
        for c, g in zip(cases, grads if check_model else ()):
            c.model.step(g, hp)
    if check_model:
        check(cases, hp)
    return [t.clone() for c in cases for t in (c.p, c.state["exp_avg"], c.state["exp_avg_sq"])]


def strided(g: torch.Tensor) -> torch.Tensor:
    """The same values as a row-strided view (a column slice of a wider buffer) when 2-d or
    more, else a strided 1-d view; the kernel reads the first in place and copies the second."""
    wide = torch.full((*g.shape[:-1], g.shape[-1] * 2 + 3), float("nan"), dtype=g.dtype)
    view = wide[..., : g.shape[-1]] if g.dim() >= 2 else wide[::2][: g.shape[-1]]
    view.copy_(g)
    return view


def transposed(g: torch.Tensor) -> torch.Tensor:
    """The same values with last stride != 1 (copied by the launcher)."""
    if g.dim() < 2:
        return g
    return g.transpose(-1, -2).contiguous().transpose(-1, -2)


def test_threads_and_gradient_layouts_give_identical_results():
    reference = run_wide(1, lambda g: g, check_model=True)
    for threads, layout in ((2, lambda g: g), (3, strided), (2, transposed)):
        got = run_wide(threads, layout, check_model=False)
        for a, b in zip(got, reference):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float64_step_and_lr_given_as_numbers():
    """A float64 step count; lr, beta, ... as Python numbers: the same as float32 steps."""
    gen = generator("float64-step")
    hp = HYPERS["adamw"]
    cases = [Case((6, 21), 2, torch.float32, gen) for _ in range(2)]
    cases[1].p.copy_(cases[0].p)
    for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        cases[1].state[k].copy_(cases[0].state[k])
    cases[1].state["step"] = torch.tensor(3.0, dtype=F64)
    g = cases[0].grad(gen, 1.0)[1]
    step_all(cases, [g, g.clone()], hp)
    torch.testing.assert_close(cases[1].p, cases[0].p, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_stores_round_like_torch(dtype):
    """Every 16-bit pattern times ``1 - 2**-9`` (decoupled decay with lr 1, weight_decay
    2**-9, a zero gradient): the float32 product is exact and often a tie between two 16-bit
    neighbours, so the store must round to nearest even exactly as ``.to(dtype)`` does."""
    if not kernel.supports_dtype(dtype):
        pytest.skip(f"this CPU's build takes no {dtype}")
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    p = bits.view(dtype).clone().view(256, 256)
    expected = (p.float() * (1 - 2**-9)).to(dtype)
    m, v = torch.zeros(256, 64), torch.zeros(256, 64)
    kernel.foam_cpu_step_(
        [p], [torch.zeros_like(p)], [m], [v], None, [torch.tensor(1.0)], [2], lr=1.0,
        beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=2**-9, decoupled_weight_decay=True,
        amsgrad=False, maximize=False, scale=1.0, res_scale=1.0,
    )  # fmt: skip
    nan = expected != expected
    assert bool((p != p)[nan].all())
    assert bool((p.view(torch.int16) == expected.view(torch.int16))[~nan].all())


def test_bad_state_is_refused_before_anything_is_written():
    gen = generator("bad")
    good = Case((4, 9), 2, torch.float32, gen)
    bad = Case((4, 9), 2, torch.float32, gen)
    before = good.p.clone()
    g = [good.grad(gen, 1.0)[0], bad.grad(gen, 1.0)[0]]
    bad.state["exp_avg_sq"] = torch.zeros(4, 9)  # full size: not the level-2 state
    with pytest.raises(ValueError, match="parameter 1: a moment has 36 elements"):
        step_all([good, bad], g, HYPERS["adamw"])
    torch.testing.assert_close(good.p, before, rtol=0, atol=0)
    bad.state["exp_avg_sq"] = torch.zeros(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="not a contiguous CPU torch.float32"):
        step_all([good, bad], g, HYPERS["adamw"])


def test_summation_error_grows_with_the_level_as_the_model_allows():
    """The block sums are pairwise: their rounding error at level 10 stays within the model's
    budget of OPS roundings (which assumes a tree of depth <= 8 plus the update's chain)."""
    assert OPS >= 8
    u = unit_roundoff(torch.float32)
    gen = generator("sum")
    n = 1 << 10
    g = torch.randn(1, n, generator=gen, dtype=F64).float()
    p = torch.zeros(1, n)
    m, v = torch.zeros(1, 1), torch.zeros(1, 1)
    hp = dict(beta1=0.0, beta2=0.0, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=True)
    kernel.foam_cpu_step_(
        [p], [g], [m], [v], None, [torch.tensor(1.0)], [10], lr=0.0, amsgrad=False,
        maximize=False, scale=1.0, res_scale=1.0, **hp,
    )  # fmt: skip
    exact = g.double().mean()
    assert abs(float(m) - float(exact)) <= 11 * u * float(g.double().abs().mean())
