"""The Triton kernel with int8/int4 moments (``foam::adam_step_quant_``) against the float64 model
of quantized FOAM (``tests/quant_model.py``) and, for stochastic rounding, against the plain-torch
path that draws the same counter-based numbers.

Each step starts the model from the kernel's own codes, scales, step and parameter, so every
step is checked on its own (as ``tests/formats/test_quantized_foam.py`` checks plain torch): the
parameter within the float64 model's tolerance, every code the model's except where float32
rounding may cross a rounding boundary. Shapes leave partial blocks and partial groups (70 and 50
stored elements a row against groups of 32), rows shorter than a group (5 at level 1: 3 blocks),
3-d, 1-d, 0-d, and even tensors whose rows hold whole groups (the flat launch). Under
``TRITON_INTERPRET=1`` (conftest.py) the kernel runs on the CPU; shapes stay small.
"""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton")

from float64_model import F64, Hyper, assert_param_matches  # noqa: E402
from quant_model import QuantParamModel, assert_codes_match  # noqa: E402

from foam_compile.backends import plain_torch, triton_cuda  # noqa: E402
from foam_compile.formats import int4, int8  # noqa: E402
from foam_compile.hyper import Hyper as FoamHyper  # noqa: E402
from foam_compile.kernels import tile  # noqa: E402
from foam_compile.kernels.foam_adam import foam_adam_quant_step_, quant_even  # noqa: E402
from foam_compile.reference import effective_level, fold, folded_shape  # noqa: E402
from foam_compile.state import get_format  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [
    ((4, 70), 0),  # ragged groups at level 0
    ((2, 200), 2),  # 50 stored a row: a partial group
    ((2, 3, 13), 3),  # partial block and a row shorter than a group
    ((3, 5), 1),  # 3 blocks a row
    ((2, 256), 2),  # even: 64 stored a row, the flat launch
    ((37,), 2),  # 1-d runs at level 0
    ((64,), 0),  # 1-d, even
    ((), 2),  # 0-d
    ((0, 8), 2),  # empty
]
OPTIONS = {
    "adamw": Hyper(),
    "amsgrad_coupled": Hyper(amsgrad=True, decoupled_weight_decay=False, weight_decay=0.1),
    "everything": Hyper(
        lr=3e-2,
        betas=(0.8, 0.95),
        weight_decay=0.05,
        amsgrad=True,
        maximize=True,
        scale=0.25,
        res_scale=2.0,
    ),
}
GRAD_SCALES = (4.0, 1.0, 0.25)
MOMENTS = [("exp_avg", "signed"), ("exp_avg_sq", "square")]


def generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(shape, gen, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype).to(DEVICE)


def moments(hp: Hyper):
    return MOMENTS + ([("max_exp_avg_sq", "square")] if hp.amsgrad else [])


def fresh_state(p, fmt_name: str, level: int, hp: Hyper) -> dict:
    fmt = get_format(fmt_name)
    level = effective_level(p.shape, level)
    state = {"step": torch.tensor(0.0, device=DEVICE), "foam_level": level}
    state["foam_format"] = fmt_name
    for key, kind in moments(hp):
        state.update(fmt.zeros(p, level, key, kind))
    return state


def foam_hp(hp: Hyper, lr_tensor: bool = False) -> FoamHyper:
    kw = hp.reference_kwargs()
    if lr_tensor:
        kw["lr"] = torch.tensor(kw["lr"], device=DEVICE)
    return FoamHyper(**kw)


def test_constants_equal_the_formats():
    """The kernels restate the formats' constants (they import nothing from the package)."""
    assert tile.QGROUP == int8.GROUP == int4.GROUP
    assert tile.QLEVELS[tile.STATE_INT8] == (int8.LEVELS["signed"], int8.LEVELS["square"])
    assert tile.QLEVELS[tile.STATE_INT4] == (int4.LEVELS["signed"], int4.LEVELS["square"])
    for name in ("int8", "int4", "int8-sr", "int4-sr"):
        fmt = get_format(name)
        assert fmt.group == tile.QGROUP
        assert triton_cuda.grouped_format_reason(fmt) is None, name


def test_the_backend_takes_grouped_formats():
    p = torch.zeros(8, 64, device=DEVICE)
    hp = foam_hp(Hyper())
    for name in ("fp32", "int8", "int4", "int8-sr", "int4-sr"):
        assert triton_cuda.supports(p, p, 2, get_format(name), hp) is None, name


def cpu_tensors(state: dict) -> dict:
    return {k: v.cpu() for k, v in state.items() if torch.is_tensor(v)}


# Every option in float32 for both widths; bfloat16 and float16 parameters once each (the
# interpreter is slow).
MODEL_CASES = [(fmt, torch.float32, option) for fmt in ("int8", "int4") for option in OPTIONS]
MODEL_CASES += [("int4", torch.bfloat16, "everything"), ("int8", torch.float16, "adamw")]


@pytest.mark.parametrize("fmt, dtype, option", MODEL_CASES, ids=str)
def test_each_step_equals_the_quantized_model(fmt, dtype, option):
    hp = OPTIONS[option]
    gen = generator("quant kernel", fmt, str(dtype), option)
    params = [randn(shape, gen, dtype) for shape, _ in SHAPES]
    states = [fresh_state(p, fmt, level, hp) for p, (_, level) in zip(params, SHAPES)]
    f = get_format(fmt)
    models = [
        QuantParamModel(p.cpu(), level, f.bits, f.group, hp.amsgrad)
        for p, (_, level) in zip(params, SHAPES)
    ]
    ambiguous = []
    for t, gscale in enumerate(GRAD_SCALES):
        grads = [randn(p.shape, gen, dtype) * gscale for p in params]
        for p, st, model in zip(params, states, models):
            if p.numel():
                model.load(cpu_tensors(st) if t else {}, p.cpu())
            st["step"] += 1
        # a tensor lr on one step in three: the kernel's LR_FROM_PTR path
        triton_cuda.step_(params, grads, states, foam_hp(hp, lr_tensor=t == 1))
        for p, g, st, model in zip(params, grads, states, models):
            if p.numel():
                model.step(g.cpu(), hp)
            assert float(st["step"]) == t + 1
            if p.numel() == 0:
                continue
            assert_param_matches(p.cpu(), model.inner, torch.float32)
            for key, kind in moments(hp):
                ambiguous.append(assert_codes_match(cpu_tensors(st), model, key, kind))
    assert sum(ambiguous) / len(ambiguous) < 0.02, "the float32 leeway was used too often"


def _encoded_state(p, fmt_name: str, level: int, hp: Hyper, gen, step: float) -> dict:
    """A state with nonzero moments (encoded to nearest from random values)."""
    state = fresh_state(p, fmt_name, level, hp)
    fmt = get_format(fmt_name)
    level = state["foam_level"]
    for key, kind in moments(hp):
        value = randn(folded_shape(p.shape, level), gen)
        value = value.abs() if kind == "square" else value
        state.update(fmt.encode(value * 0.1, p, key, kind))
    state["step"] = torch.tensor(float(step), device=DEVICE)
    return state


@pytest.mark.parametrize("fmt", ["int8-sr", "int4-sr"])
def test_stochastic_rounding_draws_the_formats_numbers(fmt):
    """The kernel's counter-based numbers are ``codec.uniform``'s: from the same state it writes
    the codes plain torch writes. A code may differ only where the two paths' float32 moments
    (one rounding apart) put the rounding probability on either side of the same draw; with
    other numbers about a third of the codes that are not exact would differ."""
    hp = OPTIONS["everything"]
    gen = generator("sr", fmt)
    params = [randn(shape, gen) for shape, _ in SHAPES[:5]]
    states = [
        _encoded_state(p, fmt, level, hp, gen, step=7) for p, (_, level) in zip(params, SHAPES)
    ]
    twins = [p.clone() for p in params]
    twin_states = [
        {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()} for st in states
    ]
    grads = [randn(p.shape, gen) for p in params]
    triton_cuda.step_(params, grads, states, foam_hp(hp))
    plain_torch.step_(twins, grads, twin_states, foam_hp(hp))
    differ = total = 0
    for st, tw in zip(states, twin_states):
        for key, _ in moments(hp):
            a, b = st[key].to(torch.int64), tw[key].to(torch.int64)
            if get_format(fmt).bits == 4:
                a = torch.stack([a & 15, a >> 4], -1)
                b = torch.stack([b & 15, b >> 4], -1)
            assert (a - b).abs().max() <= 1, key
            differ += int((a != b).sum())
            total += a.numel()
            torch.testing.assert_close(st[f"{key}_scale"], tw[f"{key}_scale"], rtol=1e-6, atol=0)
    assert differ <= max(2, total // 100), f"{differ} of {total} codes differ"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_non_finite_groups_code_as_the_codec(fmt):
    """A group holding NaN, +inf or -inf: its scale and its (defined) codes are the codec's,
    bit for bit. Betas 0 and dyadic whole blocks: the moments are exact block means."""
    f = get_format(fmt)
    hp = Hyper(betas=(0.0, 0.0), weight_decay=0.0)
    for shape, level in [((4, 70), 0), ((2, 256), 2)]:
        gen = generator("non-finite", fmt, shape)
        p = randn(shape, gen)
        st = fresh_state(p, fmt, level, hp)
        lv = st["foam_level"]
        g = torch.randint(-64, 65, shape, generator=gen).to(torch.float32) / 64
        g[0, 3] = float("nan")
        g[1, 40] = float("inf")
        g[-1, -1] = -float("inf")
        triton_cuda.step_([p], [g.to(DEVICE)], [st], foam_hp(hp))
        want = {"foam_level": lv}
        for key, kind in MOMENTS:
            want.update(f.zeros(p.cpu(), lv, key, kind))
            f.write_(want, key, kind, fold(g if kind == "signed" else g * g, lv))
            got = cpu_tensors(st)
            assert torch.equal(got[key], want[key]), (shape, key)
            scale = f"{key}_scale"
            torch.testing.assert_close(got[scale], want[scale], rtol=0, atol=0, equal_nan=True)
            assert not want[scale].isfinite().all(), (shape, key)


def test_host_step_and_a_bad_scale_shape():
    """A step passed as a number takes the host's bias corrections; a wrong scale shape is
    refused by name before anything is written."""
    hp = Hyper()
    gen = generator("host")
    p = randn((4, 128), gen)
    st = _encoded_state(p, "int8", 1, hp, gen, step=3)
    twin, twin_state = (
        p.clone(),
        {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()},
    )
    g = randn(p.shape, gen)
    kw = dict(bits=8, level=1, lr=hp.lr, weight_decay=hp.weight_decay)
    args = (st["exp_avg"], st["exp_avg_scale"], st["exp_avg_sq"], st["exp_avg_sq_scale"])
    before_step = p.clone()
    assert quant_even(p.shape, 1)  # 64 stored a row: whole groups, the flat launch
    foam_adam_quant_step_(p, g, *args, step=3, **kw)
    twin_args = [
        twin_state[k] for k in ("exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale")
    ]
    foam_adam_quant_step_(twin, g, *twin_args, step=twin_state["step"], **kw)
    # host (float64 pow) and kernel (float64 squaring) bias corrections: a few float32 roundings
    # of the parameter and of the update (|update| <= lr * alpha / (1 - beta1) at most)
    u32 = 2.0**-24
    torch.testing.assert_close(p, twin, rtol=4 * u32, atol=4 * u32 * hp.lr * 10, equal_nan=False)
    assert not torch.equal(p, before_step)  # the step happened
    assert all(torch.equal(st[k], twin_state[k]) for k in ("exp_avg", "exp_avg_scale"))
    bad = torch.zeros(4, 3, device=DEVICE)
    before = p.clone()
    with pytest.raises(ValueError, match=r"exp_avg_sq_scale is torch.float32 \[4, 3\].*\[4, 2\]"):
        foam_adam_quant_step_(p, g, args[0], args[1], args[2], bad, step=4, **kw)
    assert torch.equal(p, before)
