"""The C++ CPU step on grouped (int8/int4, nearest and stochastic) moments and on bfloat16/float16
weights with correction bits, against the package's plain-torch codecs.

* Encoding: with betas 0 the new moments are exactly ``g`` and ``g * g``, so the kernel's codes
  and scales must equal ``GroupedFormat.write_`` of those, bit for bit (stochastic rounding
  draws ``codec.uniform``'s numbers).
* Decoding and whole steps: on gradients whose block sums are exact (small dyadic values,
  whole blocks), the kernel's moments are the plain-torch backend's float32 operations, so
  codes and scales stay bit-identical over several steps, every level path (B = 1, B <= W,
  B > W), partial groups and odd 4-bit rows; the parameters agree to float32 rounding.
* Correction bits: the kernel's bfloat16/float16 + rho step equals the same kernel's float32
  step of ``join(p, rho)`` followed by ``master_weights.split_``, bit for bit; and at level 0 the
  plain-torch master-weights step, bit for bit.
* The optimizer's quantized steps against the float64 model of quantized FOAM
  (``tests/formats/test_quantized_foam.py``), with a check that the kernel ran them.
"""

import zlib

import pytest
import torch

from foam_compile import backends, master_weights
from foam_compile.backends import cpu as cpu_backend
from foam_compile.backends import plain_torch
from foam_compile.hyper import Hyper
from foam_compile.kernels import cpu as kernel
from foam_compile.reference import effective_level, fold, folded_shape
from foam_compile.state import get_format

FORMATS = ["int8", "int4", "int8-sr", "int4-sr"]
U32 = torch.finfo(torch.float32).eps / 2


def generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def new_state(p: torch.Tensor, level: int, fmt: str, amsgrad: bool, corr: str | None = None):
    level = effective_level(p.shape, level)
    f = get_format(fmt)
    st = {"step": torch.tensor(0.0), "foam_level": level}
    if fmt != "fp32":
        st["foam_format"] = fmt
    keys = [("exp_avg", "signed"), ("exp_avg_sq", "square")]
    keys += [("max_exp_avg_sq", "square")] if amsgrad else []
    for key, kind in keys:
        st.update(f.zeros(p, level, key, kind))
    if corr is not None:
        st[master_weights.RHO_KEY] = torch.zeros(p.shape, dtype=master_weights.OPTIONS[corr][0])
    return st


def clone_state(st: dict) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}


def dyadic(shape, gen, scale=1.0, dtype=torch.float32):
    """Small multiples of 2**-6: sums of a few thousand are exact in float32 (and bfloat16)."""
    return (torch.randint(-64, 65, shape, generator=gen).float() * (scale / 64)).to(dtype)


def assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if torch.is_tensor(a[k]):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (what, k)
            if k == "step":
                same = float(a[k]) == float(b[k])
            else:  # bit for bit, a NaN equal to a NaN (a non-finite group's scale)
                differ = a[k] != b[k]
                if a[k].is_floating_point():
                    differ &= ~(a[k].isnan() & b[k].isnan())
                same = not differ.any()
            if not same:
                diff = differ.view(-1).nonzero()[:5].flatten().tolist()
                raise AssertionError(f"{what}: {k} differs at flat {diff}")


def cpu_step(params, grads, states, hp: Hyper) -> None:
    for p, g, st in zip(params, grads, states):
        fmt = get_format(st.get("foam_format", "fp32"))
        chosen = backends.select(p, g, st["foam_level"], fmt, hp)
        assert chosen is cpu_backend, "the C++ kernel must take this parameter"
    cpu_backend.step_(params, grads, states, hp)


_SQRT = torch.sqrt


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """A correctly rounded float32 sqrt (float64's, rounded once: exact for float32 inputs)."""
    return _SQRT(x.double()).to(x.dtype) if x.dtype == torch.float32 else _SQRT(x)


def plain_step(params, grads, states, hp: Hyper, monkeypatch) -> None:
    """The plain-torch backend, its codec's ``torch.sqrt`` correctly rounded as the formats'
    contract (formats/int8.py) says: torch 2.13's CPU float32 ``sqrt`` is not (about 1 value
    in 5 of ``torch.rand`` is 1 ulp off), which moves a square moment's scale by an ulp."""
    for st in states:
        st["step"] += 1
    with monkeypatch.context() as mp:
        mp.setattr(torch, "sqrt", sqrt_rn)
        plain_torch.step_(params, grads, states, hp)


# ------------------------------------------------------------------------------- encoding
SHAPES = [((3, 70), 0), ((5, 33), 0), ((2, 131), 0), ((37,), 0), ((), 0), ((4, 3, 65), 0)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_encoding_equals_the_codec_bit_for_bit(fmt):
    """betas 0: m = g, v = max_v = g * g exactly; codes and scales are the codec's of those."""
    gen = generator("encode", fmt)
    hp = Hyper(lr=1e-3, beta1=0.0, beta2=0.0, weight_decay=0.0, amsgrad=True)
    f = get_format(fmt)
    for shape, level in SHAPES:
        p = torch.randn(shape, generator=gen)
        st = new_state(p, level, fmt, True)
        for t in range(3):  # nonzero old moments from t = 1: betas 0 must ignore them
            g = torch.randn(shape, generator=gen) * 10.0 ** (t - 1)
            g.view(-1)[:3] = 0.0  # zero groups' elements next to others
            lv = st["foam_level"]
            old_max = f.decode(st, "max_exp_avg_sq", "square", p)
            cpu_step([p.clone()], [g], [st], hp)
            want = {"step": st["step"].clone(), "foam_level": lv, "foam_format": fmt}
            for key, kind in [("exp_avg", "signed"), ("exp_avg_sq", "square"),
                              ("max_exp_avg_sq", "square")]:  # fmt: skip
                want.update(f.zeros(p, lv, key, kind))
                value = g if kind == "signed" else g * g
                if key == "max_exp_avg_sq":  # amsgrad: the running max of the decoded v's
                    value = torch.maximum(old_max.reshape(g.shape), value)
                f.write_(want, key, kind, value.reshape(folded_shape(p.shape, lv)))
            assert_same_state(st, want, f"{fmt} {shape} step {t}")


def test_all_zero_and_non_finite_groups():
    """A zero group codes to zero with scale 0; a NaN makes its group (only) decode to NaN."""
    for fmt in ("int8", "int4-sr"):
        p = torch.zeros(2, 64)
        st = new_state(p, 0, fmt, False)
        g = torch.zeros(2, 64)
        g[1, 40] = float("nan")
        cpu_step([p], [g], [st], Hyper(lr=1e-3, weight_decay=0.0))
        assert torch.equal(st["exp_avg_scale"][0], torch.zeros(2))
        m = get_format(fmt).decode(st, "exp_avg", "signed", p)
        assert torch.equal(m[0], torch.zeros(64)) and torch.equal(m[1, :32], torch.zeros(32))
        assert m[1, 32:].isnan().all()
        # this step used the moments before encoding: only the NaN's own element is NaN
        assert p.isnan().nonzero().tolist() == [[1, 40]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_finite_among_random_values_equal_the_codec(fmt):
    """The kernel takes each group's scale from the maxima the update gathers, blind to NaN, and
    rescans a group whose codes meet NaN: with random values around a NaN, a +inf and a -inf
    (their own groups, full and partial, every level path B <= W), scales and codes are still
    the codec's, bit for bit. Betas 0 and dyadic whole blocks: the moments are exact block means."""
    f = get_format(fmt)
    hp = Hyper(lr=1e-3, beta1=0.0, beta2=0.0, weight_decay=0.0, amsgrad=True)
    for shape, level in [((3, 70), 0), ((3, 37 * 4), 2), ((3, 37 * 8), 3), ((3, 37 * 16), 4)]:
        gen = generator("non-finite", fmt, shape)
        p = torch.randn(shape, generator=gen)
        st = new_state(p, level, fmt, True)
        lv = st["foam_level"]
        g = dyadic(shape, gen)
        n, block = shape[-1], 2**lv
        picks = torch.randint(0, n, (3,), generator=gen).tolist()
        g[0, picks[0]] = float("nan")
        g[1, picks[1]] = float("inf")
        g[2, picks[2]] = -float("inf")
        # another NaN: the group before the -inf's (the row's last group if that is the first)
        g[2, (picks[2] // (32 * block)) * 32 * block - 1] = float("nan")
        cpu_step([p], [g], [st], hp)
        want = {"step": st["step"].clone(), "foam_level": lv, "foam_format": fmt}
        moments = {"signed": fold(g, lv), "square": fold(g * g, lv)}
        for key, kind in [("exp_avg", "signed"), ("exp_avg_sq", "square"),
                          ("max_exp_avg_sq", "square")]:  # fmt: skip
            want.update(f.zeros(p, lv, key, kind))
            f.write_(want, key, kind, moments[kind])
        assert_same_state(st, want, f"{fmt} {shape} level {lv}")
        assert st["exp_avg_scale"].isnan().any() and st["exp_avg_scale"].isinf().any()


# ----------------------------------------------------------------------- whole steps
HYPERS = {
    "adamw": Hyper(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1),
    "everything": Hyper(
        lr=3e-2,
        beta1=0.8,
        beta2=0.95,
        weight_decay=0.05,
        amsgrad=True,
        maximize=True,
        scale=0.25,
        res_scale=2.0,
    ),  # fmt: skip
}
# (rows, blocks per row, level): 37 blocks = a whole group and a short odd one; level 5 is B > W
STEP_SHAPES = [((3, 70), 0), ((2, 37 * 4), 2), ((3, 37 * 8), 3), ((2, 37 * 32), 5), ((67,), 2)]


@pytest.mark.parametrize("option", list(HYPERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_steps_equal_the_plain_torch_backend(fmt, dtype, option, monkeypatch):
    hp = HYPERS[option]
    gen = generator("steps", fmt, str(dtype), option)
    params = [torch.randn(s, generator=gen).to(dtype) for s, _ in STEP_SHAPES]
    states = [new_state(p, lv, fmt, hp.amsgrad) for p, (_, lv) in zip(params, STEP_SHAPES)]
    ref_params = [p.clone() for p in params]
    ref_states = [clone_state(st) for st in states]
    for t, scale in enumerate((4.0, 1.0, 0.25, 0.5)):
        grads = [dyadic(p.shape, gen, scale, dtype) for p in params]
        cpu_step(params, grads, states, hp)
        plain_step(ref_params, grads, ref_states, hp, monkeypatch)
        for i in range(len(params)):
            assert_same_state(states[i], ref_states[i], f"param {i} step {t}")
            tol = 16 * U32 * float(ref_params[i].float().abs().max()) + 16 * U32 * hp.lr
            if dtype == torch.bfloat16:  # a float32 ulp may round the other way in bfloat16
                tol = 2.0**-7 * float(ref_params[i].float().abs().max())
            torch.testing.assert_close(params[i].float(), ref_params[i].float(), rtol=0, atol=tol)
            if dtype == torch.bfloat16:  # and does so rarely
                assert (params[i] != ref_params[i]).float().mean() < 0.01


def test_threads_give_identical_codes():
    """Threads split the work at group boundaries: one thread and several write the same bits."""
    gen = generator("threads")
    hp = HYPERS["everything"]
    # 180k elements: the kernel starts a thread per 32k (min(threads, elements / 2**15))
    shapes = [((256, 4 * 37), 2), ((30000,), 0), ((200, 8 * 70), 3)]
    params = [torch.randn(s, generator=gen) for s, _ in shapes]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    results = []
    for threads in (1, 2, 5):
        ps = [p.clone() for p in params]
        sts = [new_state(p, lv, "int4-sr", True) for p, (_, lv) in zip(ps, shapes)]
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for _ in range(2):
                cpu_step(ps, grads, sts, hp)
        finally:
            torch.set_num_threads(saved)
        results.append((ps, sts))
    for ps, sts in results[1:]:
        for a, b in zip(ps, results[0][0]):
            assert torch.equal(a, b)
        for a, b in zip(sts, results[0][1]):
            assert_same_state(a, b, "threads")


# ---------------------------------------------------------------------- correction bits
MW_SHAPES = [((3, 70), 0), ((2, 37 * 4 + 3), 2), ((2, 3, 45), 3), ((2, 300), 6), ((37,), 2)]
MW_HYPERS = {**HYPERS, "coupled": Hyper(lr=1e-2, decoupled_weight_decay=False, weight_decay=0.1)}


def corrected_param(shape, gen, dtype, width):
    """A mid-training bfloat16/float16 weight: random values (zeros and tiny ones among them)
    and random corrections in [-Q, Q]."""
    p = torch.randn(shape, generator=gen)
    flat = p.view(-1)
    flat[::7] = 0.0
    flat[1::11] *= 1e-30 if dtype == torch.bfloat16 else 1e-6  # subnormal 16-bit values
    q = master_weights.OPTIONS[width][1]
    rho = torch.randint(-q, q + 1, shape, generator=gen).to(master_weights.OPTIONS[width][0])
    return p.to(dtype), rho


@pytest.mark.parametrize("option", list(MW_HYPERS))
@pytest.mark.parametrize("width", ["int8", "int16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_corrections_equal_join_float32_step_split(fmt, dtype, width, option):
    """The kernel's 16-bit + correction step is its float32 step of join(p, rho), then split_:
    bit for bit, every level path, partial blocks and vectors, subnormal 16-bit values."""
    if not kernel.supports_dtype(dtype):
        pytest.skip(f"this CPU's build does not take {dtype}")
    hp = MW_HYPERS[option]
    hp = Hyper(**{**hp.__dict__, "master_weights": width})
    gen = generator("mw", fmt, str(dtype), width, option)
    params, rhos, states = [], [], []
    for shape, lv in MW_SHAPES:
        p, rho = corrected_param(shape, gen, dtype, width)
        params.append(p)
        rhos.append(rho)
        states.append(new_state(p, lv, fmt, hp.amsgrad, width))
        states[-1][master_weights.RHO_KEY].copy_(rho)
    ref_states = [clone_state(st) for st in states]
    for st in ref_states:
        del st[master_weights.RHO_KEY]
    hp32 = Hyper(**{**hp.__dict__, "master_weights": None})
    for t in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
        rhos = [st[master_weights.RHO_KEY] for st in states]
        thetas = [master_weights.join(p, rho) for p, rho in zip(params, rhos)]
        cpu_step(params, grads, states, hp)
        cpu_step(thetas, [g.float() for g in grads], ref_states, hp32)
        for i, (p, st) in enumerate(zip(params, states)):
            p16, rho = torch.empty_like(p), torch.empty_like(st[master_weights.RHO_KEY])
            master_weights.split_(thetas[i], p16, rho)
            assert torch.equal(p.view(torch.int16), p16.view(torch.int16)), (i, t)
            assert torch.equal(st[master_weights.RHO_KEY], rho), (i, t)
            st = {k: v for k, v in st.items() if k != master_weights.RHO_KEY}
            assert_same_state(st, ref_states[i], f"param {i} step {t}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_level0_corrections_equal_the_plain_torch_step(dtype, monkeypatch):
    """At level 0 the update's float32 operations are the plain-torch ones (sqrt correctly
    rounded in both: see plain_step): parameters, corrections and moments bit for bit."""
    if not kernel.supports_dtype(dtype):
        pytest.skip(f"this CPU's build does not take {dtype}")
    monkeypatch.setattr(torch.Tensor, "sqrt", sqrt_rn)
    gen = generator("mw0", str(dtype))
    hp = Hyper(lr=1e-2, weight_decay=0.1, master_weights="int8")
    shapes = [(3, 70), (37,), ()]
    params, states = [], []
    for shape in shapes:
        p, rho = corrected_param(shape, gen, dtype, "int8")
        params.append(p)
        states.append(new_state(p, 0, "fp32", False, "int8"))
        states[-1][master_weights.RHO_KEY].copy_(rho)
    ref_params = [p.clone() for p in params]
    ref_states = [clone_state(st) for st in states]
    for t in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
        cpu_step(params, grads, states, hp)
        plain_step(ref_params, grads, ref_states, hp, monkeypatch)
        for i in range(len(params)):
            assert torch.equal(params[i].view(torch.int16), ref_params[i].view(torch.int16))
            assert_same_state(states[i], ref_states[i], f"param {i} step {t}")


# ------------------------------------------------------------------ the optimizer, end to end
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_quantized_model_comparisons_run_the_kernel(fmt, dtype, monkeypatch):
    """tests/formats' comparison of FOAM with the float64 model of quantized FOAM, every case,
    with a spy on the kernel's launcher: each step ran in C++ on grouped codes."""
    from tests.formats import test_quantized_foam as qf

    seen = []
    launch = kernel.run

    def spy(descs, **kw):
        seen.extend(descs[i * kernel.FIELDS + 12] for i in range(len(descs) // kernel.FIELDS))
        return launch(descs, **kw)

    monkeypatch.setattr(kernel, "run", spy)
    bits = get_format(fmt).bits
    for shape, level in qf.CASES:
        for option in qf.OPTIONS:
            seen.clear()
            qf.test_each_step_equals_the_quantized_model(fmt, shape, level, dtype, option)
            assert len(seen) == len(qf.GRAD_SCALES) and set(seen) == {bits}, (shape, option)
