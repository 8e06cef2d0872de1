"""The Triton kernel with master weights: bfloat16/float16 parameters plus int8/int16 correction
bits (``foam_compile/master_weights.py``) read, stepped and written back in the step's pass.

Two checks. With a zero step (``lr = 0``, no decay) the kernel's join and split must give back
the same ``p16`` and ``rho`` bit for bit, including zeros, values near the bottom of the formats
(down to 2**-100, and float16 subnormals), large values and negative ones: that is the codec of
the module docstring, exactly. With a real step (every option, fp32 and int8/int4 moments, ragged
and even, 1-d and 0-d) the float32 weight ``theta = join(p16, rho)`` the kernel leaves must equal
the plain-torch backend's within the roundings of two float32 evaluations of one step plus one
split each (``s / (2 Q)``, ``s`` the half-ulp of ``p16``); a correction ignored or written wrong
is off by up to ``s``, far outside it. Shapes stay small: the interpreter runs the kernel.
"""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton")

from float64_model import F64, Hyper  # noqa: E402

from foam_compile import backends  # noqa: E402
from foam_compile import master_weights as mw  # noqa: E402
from foam_compile.backends import plain_torch, triton_cuda  # noqa: E402
from foam_compile.hyper import Hyper as FoamHyper  # noqa: E402
from foam_compile.kernels.foam_adam import foam_adam_step_  # noqa: E402
from foam_compile.reference import effective_level, folded_shape  # noqa: E402
from foam_compile.state import get_format  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
U32 = 2.0**-24
SHAPES = [((4, 70), 2), ((2, 256), 2), ((3, 5), 1), ((37,), 0), ((), 0)]
OPTIONS = {
    "adamw": Hyper(),
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


def generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def special_values(dtype) -> torch.Tensor:
    """Zeros, the bottom of the contract's exact range (2**-100: below it a device that flushes
    float32 subnormals may differ, master_weights' docstring), float16's smallest normal and a
    subnormal (normal in float32), large values and the largest the dtype holds."""
    tiny = torch.finfo(dtype).tiny
    values = [0.0, -0.0, 2.0**-100, -(2.0**-99) * 1.3, 1e-30, 1.0, -1.5, 60000.0, 3e5, 1e30]
    if dtype == torch.float16:
        values += [tiny, -tiny / 4, 3e-7]
    return torch.tensor(values, dtype=F64)


@pytest.mark.parametrize("width", ["int8", "int16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_zero_step_gives_back_p16_and_rho_bit_for_bit(dtype, width):
    gen = generator("zero step", str(dtype), width)
    theta = torch.randn(3, 45, generator=gen, dtype=F64) * torch.logspace(-6, 4, 45, dtype=F64)
    theta.view(-1)[: len(special_values(dtype))] = special_values(dtype)
    theta = theta.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(torch.float32)
    p16, rho = mw.split(theta, dtype, width)
    assert (rho != 0).float().mean() > 0.5  # the corrections are really exercised
    p, r = p16.clone().to(DEVICE), rho.clone().to(DEVICE)
    m = torch.zeros(3, 45, device=DEVICE)
    g = torch.randn(3, 45, generator=gen).to(dtype).to(DEVICE)
    foam_adam_step_(p, g, m, m.clone(), lr=0.0, step=1, level=0, master_rho=r)
    assert (p.cpu().float() == p16.float()).all()  # -0.0 joins to +0.0 on both paths
    assert torch.equal(r.cpu(), rho)


def _state(p, fmt_name, level, hp, gen, rho) -> dict:
    fmt = get_format(fmt_name)
    level = effective_level(p.shape, level)
    state = {"step": torch.tensor(4.0, device=DEVICE), "foam_level": level, mw.RHO_KEY: rho}
    if fmt_name != "fp32":
        state["foam_format"] = fmt_name
    keys = [("exp_avg", "signed"), ("exp_avg_sq", "square")]
    keys += [("max_exp_avg_sq", "square")] if hp.amsgrad else []
    for key, kind in keys:
        value = torch.randn(folded_shape(p.shape, level), generator=gen).to(DEVICE) * 0.1
        value = value.abs() if kind == "square" else value
        if fmt_name == "fp32":
            state[key] = value
        else:
            state.update(fmt.encode(value, p, key, kind))
    return state


def _clone(state: dict) -> dict:
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}


CASES = [
    ("fp32", torch.bfloat16, "int8", "adamw"),
    ("fp32", torch.float16, "int16", "everything"),
    ("int8", torch.bfloat16, "int16", "everything"),
    ("int4-sr", torch.float16, "int8", "adamw"),
]


@pytest.mark.parametrize("fmt, dtype, width, option", CASES, ids=str)
def test_a_step_equals_plain_torch(fmt, dtype, width, option):
    hp = OPTIONS[option]
    gen = generator("step", fmt, str(dtype), width, option)
    params, states = [], []
    for shape, level in SHAPES:
        theta = torch.randn(shape, generator=gen) * 2
        p16, rho = mw.split(theta, dtype, width)
        params.append(p16.to(DEVICE))
        states.append(_state(params[-1], fmt, level, hp, gen, rho.to(DEVICE)))
    twins = [p.clone() for p in params]
    twin_states = [_clone(st) for st in states]
    grads = [torch.randn(p.shape, generator=gen).to(dtype).to(DEVICE) for p in params]
    foam = FoamHyper(**hp.reference_kwargs(), master_weights=width)
    for p, g, st in zip(params, grads, states):
        assert triton_cuda.supports(p, g, st["foam_level"], get_format(fmt), foam) is None
    triton_cuda.step_(params, grads, states, foam)
    plain_torch.step_(twins, grads, twin_states, foam)
    q = mw.OPTIONS[width][1]
    for p, st, tw, tst in zip(params, states, twins, twin_states):
        got = mw.join(p, st[mw.RHO_KEY]).to(F64)
        want = mw.join(tw, tst[mw.RHO_KEY]).to(F64)
        # float32 roundings of the step (weight, update <= lr * 10 here) in either order, then
        # each path's split (s / (2Q), s at the larger of the two p16) and join's own rounding
        s = torch.maximum(mw.half_ulp(p), mw.half_ulp(tw)).to(F64)
        tol = 16 * U32 * (want.abs() + 10 * hp.lr) + 2 * s / (2 * q) + 2 * U32 * want.abs()
        assert ((got - want).abs() <= tol).all(), (got - want).abs().max()
        assert float(st["step"]) == 4.0  # the backend does not count steps


def test_the_backend_opts_in_to_correction_bits():
    """``backends.select`` sends a bfloat16 parameter with corrections to this backend (it
    serves CUDA devices: on the CPU the registry is asked for a CUDA parameter's choice through
    the same rule, the module's flag)."""
    assert getattr(triton_cuda, "MASTER_WEIGHTS", False) is True
    p = torch.zeros(4, 64, dtype=torch.bfloat16, device=DEVICE)
    foam = FoamHyper(lr=1e-3, master_weights="int8")
    assert triton_cuda.supports(p, p, 2, get_format("int8"), foam) is None
    if DEVICE == "cuda":
        assert backends.select(p, p, 2, get_format("fp32"), foam) is triton_cuda
