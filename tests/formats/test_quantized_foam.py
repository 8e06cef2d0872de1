"""FOAM with int8/int4 moments on the plain-torch path, against the float64 model of quantized FOAM.

Each step starts the model from the optimizer's own stored codes, scales, step and parameter
(``QuantParamModel.load``), so every step is checked on its own: the parameter within the float64
model's tolerance (``float64_model``), every code exactly the model's except where float32
rounding may cross a rounding boundary (``quant_model.assert_codes_match``, which also bounds how
often that leeway is used). Shapes leave partial blocks and partial groups (n = 70 with groups
of 32; 200 at level 2 gives 50 stored elements), and 0-d / 1-d / 3-d parameters.
"""

from __future__ import annotations

import io
import zlib

import pytest
import torch
from float64_model import F64, Hyper, assert_param_matches
from quant_model import QuantParamModel, assert_codes_match
from torch import nn

from foam_compile import FOAM, backends, export_adamw_state_dict
from foam_compile.checkpoint import relayout, to_foam_state
from foam_compile.reference import fold, folded_shape, unfold
from foam_compile.state import format_of, get_format

CASES = [
    ((3, 5), 0),
    ((4, 37), 2),
    ((2, 3, 13), 3),
    ((6, 70), 0),
    ((2, 200), 2),
    ((7,), 2),
    ((), 2),
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
GRAD_SCALES = (4.0, 1.0, 0.25, 2.0, 0.5, 1.0)
MOMENTS = [("exp_avg", "signed"), ("exp_avg_sq", "square")]


def generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(shape, gen, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype)


def quantized_foam(params, fmt: str, hp: Hyper, level: int):
    opt = FOAM(params, level=level, **hp.foam_kwargs())
    for p in params:
        opt._set_layout(p, state_format=fmt)
    return opt


def moments(hp: Hyper):
    return MOMENTS + ([("max_exp_avg_sq", "square")] if hp.amsgrad else [])


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape, level", CASES, ids=str)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_each_step_equals_the_quantized_model(fmt, shape, level, dtype, option):
    hp = OPTIONS[option]
    gen = generator(fmt, shape, level, str(dtype), option)
    p = nn.Parameter(randn(shape, gen, dtype))
    opt = quantized_foam([p], fmt, hp, level)
    bits = get_format(fmt).bits
    model = QuantParamModel(p, level, bits, get_format(fmt).group, hp.amsgrad)
    # decoding is float32 arithmetic (the formats' contract), so even a float64 parameter's step
    # carries float32 roundings of its moments
    math = torch.float32
    ambiguous = []
    for t in range(len(GRAD_SCALES)):
        model.load(opt.state[p], p)
        g = randn(shape, gen, dtype) * GRAD_SCALES[t]
        p.grad = g.clone()
        opt.step()
        model.step(g, hp)
        assert_param_matches(p, model.inner, math)
        for key, kind in moments(hp):
            ambiguous.append(assert_codes_match(opt.state[p], model, key, kind))
        assert float(opt.state[p]["step"]) == t + 1
    assert sum(ambiguous) / len(ambiguous) < 0.02, "the float32 leeway was used too often"


@pytest.mark.parametrize("fmt", ["int8", "int4", "int8-sr"])
def test_nothing_full_size_is_kept_between_steps(fmt):
    gen = generator("bytes", fmt)
    ps = [nn.Parameter(randn(s, gen)) for s in [(64, 100), (37,), ()]]
    opt = quantized_foam(ps, fmt, Hyper(amsgrad=True), level=2)
    for _ in range(3):
        for p in ps:
            p.grad = randn(p.shape, gen)
        opt.step()
    f = get_format(fmt)
    for p in ps:
        st = opt.state[p]
        lv = st["foam_level"]
        fshape = folded_shape(p.shape, lv)
        rows, n = (int(torch.tensor(fshape[:-1]).prod()), fshape[-1]) if fshape else (1, 1)
        moment_bytes = sum(t.nbytes for k, t in st.items() if torch.is_tensor(t) and k != "step")
        assert moment_bytes == 3 * f.moment_bytes(rows, n, 4)
        assert {k for k, t in st.items() if torch.is_tensor(t) and t.is_floating_point()} == {
            "step",
            "exp_avg_scale",
            "exp_avg_sq_scale",
            "max_exp_avg_sq_scale",
        }


def test_quantized_parameters_take_the_cpu_kernel():
    """CPU float32/bfloat16 parameters: the C++ step (tests/kernels/test_cpu_quant.py); float64
    ones (the formats' arithmetic is float32) plain torch."""
    p = torch.zeros(8, 64)
    hp = Hyper().foam_kwargs()
    from foam_compile.hyper import Hyper as PackageHyper

    hyper = PackageHyper.from_group({**hp, "level": 2})
    for name in ("int8", "int4", "int8-sr", "int4-sr"):
        chosen = backends.select(p, p, 2, get_format(name), hyper)
        assert chosen.__name__ == "foam_compile.backends.cpu"
        chosen = backends.select(p.double(), p.double(), 2, get_format(name), hyper)
        assert chosen.__name__ == "foam_compile.backends.plain_torch"


def test_a_wrong_scale_shape_fails_before_anything_changes():
    gen = generator("fail")
    ps = [nn.Parameter(randn((4, 40), gen)), nn.Parameter(randn((3, 9), gen))]
    opt = quantized_foam(ps, "int8", Hyper(), level=0)
    for p in ps:
        p.grad = randn(p.shape, gen)
    opt.step()
    opt.state[ps[1]]["exp_avg_scale"] = torch.zeros(3, 2)
    values = [p.detach().clone() for p in ps]
    state = {k: v.clone() for k, v in opt.state[ps[0]].items() if torch.is_tensor(v)}
    with pytest.raises(RuntimeError, match="exp_avg_scale"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(values, ps))
    assert all(torch.equal(v, opt.state[ps[0]][k]) for k, v in state.items())


# ----------------------------------------------------------------------------- checkpoints
def _trained(fmt, dtype=torch.float32, level=2, steps=3, amsgrad=False, seed="ckpt"):
    gen = generator(seed, fmt, str(dtype))
    ps = [nn.Parameter(randn(s, gen, dtype)) for s in [(6, 70), (2, 3, 13), (5,)]]
    opt = quantized_foam(ps, fmt, Hyper(amsgrad=amsgrad), level)
    for _ in range(steps):
        for p in ps:
            p.grad = randn(p.shape, gen, dtype)
        opt.step()
    return ps, opt, gen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-sr"])
def test_checkpoint_is_compact_and_resumes_bit_identically(fmt, dtype):
    ps, opt, gen = _trained(fmt, dtype, amsgrad=True)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    for st in saved["state"].values():
        assert st["foam_format"] == fmt
        assert st["exp_avg"].dtype in (torch.int8, torch.uint8)
        assert st["exp_avg_scale"].dtype == torch.float32
    twins = [nn.Parameter(p.detach().clone()) for p in ps]
    other = FOAM(twins, level=2, **Hyper(amsgrad=True).foam_kwargs())
    other.load_state_dict(saved)
    for p, q in zip(ps, twins):
        for k, v in opt.state[p].items():
            w = other.state[q][k]
            assert (torch.equal(v, w) and v.dtype == w.dtype) if torch.is_tensor(v) else v == w
    for _ in range(3):
        for p, q in zip(ps, twins):
            g = randn(p.shape, gen, dtype)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        other.step()
    for p, q in zip(ps, twins):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            if torch.is_tensor(v):
                assert torch.equal(v, other.state[q][k]), k


def _decoded(st, p, hp_moments=MOMENTS):
    f = format_of(st)
    return {key: f.decode(st, key, kind, p) for key, kind in hp_moments if key in st}


@pytest.mark.parametrize(
    "old, new",
    [
        (("int8", 2), ("int4", 2)),
        (("int8", 2), ("fp32", 2)),
        (("fp32", 2), ("int8", 3)),
        (("int4", 3), ("int8", 1)),
        (("int8", 2), ("int8", 0)),
    ],
    ids=str,
)
def test_relayout_decodes_refolds_and_reencodes(old, new):
    ps, opt, _ = _trained(old[0], level=old[1])
    for p in ps:
        st = opt.state[p]
        before = _decoded(st, p)
        out = relayout(p, st, MOMENTS, level=new[1], fmt=get_format(new[0]))
        fmt = get_format(new[0])
        lv = out["foam_level"]
        assert format_of(out).name == new[0] and lv == (new[1] if p.dim() >= 2 else 0)
        n = p.shape[-1]
        for key, kind in MOMENTS:
            expected = fold(unfold(before[key], st["foam_level"], n), lv)
            want = fmt.encode(expected, p, key, kind)
            for k, v in want.items():
                assert torch.equal(out[k], v), k
        stale = {f"{k}_scale" for k, _ in MOMENTS} - set(
            fmt.keys("exp_avg") + fmt.keys("exp_avg_sq")
        )
        assert not stale & set(out), "the old format's side tensors must go"
        # the optimizer takes the migrated state and steps on
        opt._set_layout(p, level=new[1], state_format=new[0])
        assert format_of(opt.state[p]).name == new[0]
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()


def test_loading_into_another_format_or_level_migrates():
    ps, opt, _ = _trained("int8", level=2)
    sd = opt.state_dict()
    for pid, p in enumerate(ps):
        st = sd["state"][pid]
        moved = to_foam_state(p, st, level=1, moments=MOMENTS, fmt=get_format("int4"), migrate=True)
        assert moved["foam_format"] == "int4" and moved["foam_level"] == (1 if p.dim() >= 2 else 0)
        kept = to_foam_state(p, st, level=1, moments=MOMENTS, fmt=get_format("int4"))
        assert kept["foam_format"] == "int8" and kept["foam_level"] == st["foam_level"]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_export_is_exact_to_the_stored_values(fmt):
    ps, opt, _ = _trained(fmt, amsgrad=True)
    exported = export_adamw_state_dict(opt)
    keys = MOMENTS + [("max_exp_avg_sq", "square")]
    for pid, p in enumerate(ps):
        st = opt.state[p]
        out = exported["state"][pid]
        assert set(out) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        for key, value in _decoded(st, p, keys).items():
            full = unfold(value, st["foam_level"], p.shape[-1]).reshape(p.shape)
            assert torch.equal(out[key], full)
            assert torch.equal(fold(out[key], st["foam_level"]), value)  # re-import is exact


def test_compiled_step_runs_the_quantized_update():
    """torch.compile of the optimizer step traces decode, update and encode (one small graph)."""
    torch._dynamo.reset()
    gen = generator("compile")
    ps = [nn.Parameter(randn((8, 40), gen))]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    eager = quantized_foam(ps, "int8", Hyper(), level=2)
    comp = quantized_foam(qs, "int8", Hyper(), level=2)
    step = torch.compile(comp.step)
    for _ in range(3):
        g = randn((8, 40), gen)
        ps[0].grad, qs[0].grad = g.clone(), g.clone()
        eager.step()
        step()
    # Inductor may round the float32 chain differently: allow one code step, no more
    a = get_format("int8").decode(
        eager.state[ps[0]] | {"foam_level": 2}, "exp_avg", "signed", ps[0]
    )
    b = get_format("int8").decode(comp.state[qs[0]] | {"foam_level": 2}, "exp_avg", "signed", qs[0])
    scale = eager.state[ps[0]]["exp_avg_scale"].repeat_interleave(32, -1)[:, : a.shape[-1]]
    assert ((a - b).abs() <= scale * (2 / 127) + 1e-12).all()
    torch.testing.assert_close(ps[0], qs[0], rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
