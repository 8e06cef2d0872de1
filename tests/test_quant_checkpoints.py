"""Checkpoints of quantized FOAM state together with master-weight corrections (one process).

What a checkpoint holds is counted from first principles here (one byte a code at 8 bits, two
codes a byte at 4 bits, one float32 scale per group of 32 along the stored last dim, one
correction per weight element), so a moment saved in float (e.g. cast by torch's loader) fails
the count. Round trips go through ``torch.save`` / ``torch.load(weights_only=True)`` and resume
bit for bit; a bad checkpoint is refused by name and leaves the optimizer's state untouched;
``export_adamw_state_dict`` is exact to the stored (decoded) values, also for bfloat16 weights
with corrections; a stock AdamW checkpoint loads into a quantized layout as its folded,
encoded moments. The sharded cases are in ``tests/distributed/test_quant_fsdp.py``.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from foam_compile import FOAM, export_adamw_state_dict
from foam_compile.master_weights import RHO_KEY, full_precision_state_dict, join
from foam_compile.reference import fold, unfold
from foam_compile.state import format_of, get_format

GROUP = 32  # the group of int8/int4 (formats/int8.py, formats/int4.py)
MOMENTS = [("exp_avg", "signed"), ("exp_avg_sq", "square"), ("max_exp_avg_sq", "square")]
# weight [6, 70] at level 2: stored rows of 18 (a partial block, one partial group);
# [2, 3, 130] at level 1: rows of 65 (groups 32 + 32 + 1); [5] and [] run at level 0
SHAPES = [(6, 70), (2, 3, 130), (5,), ()]
CASES = [  # (state format, weight dtype, master_weights)
    ("int8", torch.bfloat16, "int8"),
    ("int4", torch.float16, "int16"),
    ("int8-sr", torch.bfloat16, "int16"),
    ("int4", torch.float32, None),
]


def make(dtype, fmt: str, master, ps=None):
    gen = torch.Generator().manual_seed(0)
    ps = ps or [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    opt = FOAM(ps, lr=1e-2, weight_decay=0.1, amsgrad=True, master_weights=master)
    opt._set_layout(ps[0], level=2, state_format=fmt)
    opt._set_layout(ps[1], level=1, state_format=fmt)
    for p in ps[2:]:
        opt._set_layout(p, state_format=fmt)
    return ps, opt


def steps(ps, opt, first: int, last: int) -> None:
    for i in range(first, last):
        gen = torch.Generator().manual_seed(100 + i)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def saved(opt) -> dict:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


def expected_bytes(p, level: int, bits: int, master) -> int:
    """Bytes of p's saved state: 3 moments of codes + scales, the correction, the step."""
    rows = math.prod(p.shape[:-1]) if p.dim() else 1
    n = math.ceil(p.shape[-1] / 2**level) if p.dim() else 1
    codes = rows * (n if bits == 8 else math.ceil(n / 2))
    scales = rows * math.ceil(n / GROUP) * 4
    rho = p.numel() * {"int8": 1, "int16": 2, None: 0}[master if p.dtype != torch.float32 else None]
    return 3 * (codes + scales) + rho + 4


@pytest.mark.parametrize("fmt, dtype, master", CASES, ids=str)
def test_checkpoint_is_compact_keeps_dtypes_and_resumes_bitwise(fmt, dtype, master):
    ps, opt = make(dtype, fmt, master)
    steps(ps, opt, 0, 2)
    sd = saved(opt)
    bits = get_format(fmt).bits
    for p, st in zip(ps, sd["state"].values()):
        assert st["foam_format"] == fmt
        got = sum(v.nbytes for v in st.values() if torch.is_tensor(v))
        assert got == expected_bytes(p, st["foam_level"], bits, master), (p.shape, st.keys())
    twins = [nn.Parameter(p.detach().clone()) for p in ps]
    _, other = make(dtype, "fp32", master, twins)  # the checkpoint's formats win
    other.load_state_dict(sd)
    for p, q in zip(ps, twins):
        mine, theirs = opt.state[p], other.state[q]
        assert mine.keys() == theirs.keys()
        for k, v in mine.items():
            if torch.is_tensor(v):
                assert v.dtype == theirs[k].dtype and torch.equal(v, theirs[k]), k
            else:
                assert v == theirs[k], k
    steps(ps, opt, 2, 4)
    steps(twins, other, 2, 4)
    for p, q in zip(ps, twins):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            if torch.is_tensor(v):
                assert torch.equal(v, other.state[q][k]), k


def _tamper(sd: dict, key: str, value) -> dict:
    state = {**sd["state"], 0: {**sd["state"][0]}}
    if value is None:
        del state[0][key]
    else:
        state[0][key] = value(state[0][key])
    return {**sd, "state": state}


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("exp_avg", lambda v: v.float(), r"int8 \[6, 18\]"),
        ("exp_avg_scale", lambda v: v[:, :0], r"float32 \[6, 1\]"),
        ("exp_avg_sq_scale", None, "not a tensor"),
        (RHO_KEY, lambda v: v.to(torch.int32), "int8 or int16"),
    ],
    ids=["float_codes", "short_scales", "missing_scales", "wide_correction"],
)
def test_a_bad_checkpoint_is_refused_and_state_kept(key, value, match):
    ps, opt = make(torch.bfloat16, "int8", "int8")
    steps(ps, opt, 0, 1)
    bad = _tamper(saved(opt), key, value)
    before = {
        i: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
        for i, p in enumerate(ps)
    }
    with pytest.raises(ValueError, match=match) as info:
        opt.load_state_dict(bad)
    assert "parameter 0 of param group 0" in str(info.value)
    for i, p in enumerate(ps):
        for k, v in before[i].items():
            now = opt.state[p][k]
            assert (
                (now.dtype == v.dtype and torch.equal(now, v)) if torch.is_tensor(v) else now == v
            )


@pytest.mark.parametrize("fmt, dtype, master", CASES, ids=str)
def test_export_is_exact_to_the_decoded_state(fmt, dtype, master):
    ps, opt = make(dtype, fmt, master)
    steps(ps, opt, 0, 3)
    exported = export_adamw_state_dict(opt)["state"]
    for pid, p in enumerate(ps):
        st = opt.state[p]
        out = exported[pid]
        assert set(out) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}  # no codes, no rho
        n, level = (p.shape[-1] if p.dim() else 1), st["foam_level"]
        for key, kind in MOMENTS:
            value = format_of(st).decode(st, key, kind, p)
            assert out[key].dtype == torch.float32 and out[key].shape == p.shape
            assert torch.equal(out[key], unfold(value, level, n).reshape(p.shape)), key
            assert torch.equal(fold(out[key], level), value)  # re-import folds back exactly
    weights = full_precision_state_dict({str(i): p for i, p in enumerate(ps)}, opt)
    for i, p in enumerate(ps):
        want = join(p.detach(), opt.state[p][RHO_KEY]) if RHO_KEY in opt.state[p] else p.float()
        assert torch.equal(weights[str(i)], want)


def test_stock_adamw_checkpoint_loads_folded_and_encoded():
    """A torch.optim.AdamW checkpoint into an int4 layout: each moment folded at the layout's
    level, then encoded; the step is kept and training goes on."""
    gen = torch.Generator().manual_seed(3)
    ps = [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    adamw = torch.optim.AdamW(ps, lr=1e-2, amsgrad=True)
    steps(ps, adamw, 0, 2)
    stock = adamw.state_dict()
    _, opt = make(torch.float32, "int4", None, ps)
    opt.load_state_dict(stock)
    fmt = get_format("int4")
    for pid, p in enumerate(ps):
        st = opt.state[p]
        assert st["foam_format"] == "int4" and float(st["step"]) == 2
        for key, kind in MOMENTS:
            want = fmt.encode(fold(stock["state"][pid][key], st["foam_level"]), p, key, kind)
            for k, v in want.items():
                assert st[k].dtype == v.dtype and torch.equal(st[k], v), (pid, k)
    steps(ps, opt, 2, 3)
    assert all(float(opt.state[p]["step"]) == 3 for p in ps)
