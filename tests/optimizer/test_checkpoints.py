"""FOAM checkpoints (compact, serialisable, bit-identical on resume) and stock AdamW/Adam
checkpoints folded on load."""

from __future__ import annotations

import io

import pytest
import torch
from float64_model import (
    Hyper,
    ParamModel,
    assert_param_matches,
    assert_state_matches,
    assert_within,
    model_fold,
    model_folded_shape,
    model_level,
)
from torch import nn

from foam_compile import FOAM

from .common import (
    BF16,
    _fold_tolerance,
    generator,
    new_grads,
    param,
    run,
    set_grads,
    state_tensors,
    twin,
)


# ------------------------------------------------------------------- (6) checkpoints
def _checkpoint_params(gen, dtype):
    return [
        param((4, 37), gen, dtype),
        param((2, 3, 13), gen, dtype),
        param((7,), gen, dtype),
        param((), gen, dtype),
    ]


@pytest.mark.parametrize("level", [1, 2, 8])
def test_state_dict_is_compact_and_serialises(level, tmp_path):
    gen = generator("compact", level)
    ps = _checkpoint_params(gen, torch.float32)
    opt = FOAM(ps, level=level, amsgrad=True)
    run(opt, ps, [ParamModel.create(p, level) for p in ps], Hyper(amsgrad=True), 2, gen)
    sd = opt.state_dict()
    for i, p in enumerate(ps):
        st = sd["state"][i]
        lvl = model_level(p.shape, level)
        assert st["foam_level"] == lvl
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert tuple(st[key].shape) == model_folded_shape(p.shape, lvl)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    torch.save(sd, tmp_path / "foam.pt")
    loaded_file = torch.load(tmp_path / "foam.pt", weights_only=True)
    for got in (loaded, loaded_file):
        assert got["param_groups"] == sd["param_groups"]
        for i in sd["state"]:
            assert set(got["state"][i]) == set(sd["state"][i])
            for k, v in sd["state"][i].items():
                assert (
                    torch.equal(got["state"][i][k], v)
                    if isinstance(v, torch.Tensor)
                    else got["state"][i][k] == v
                )


@pytest.mark.parametrize("via", ["bytesio", "file"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
def test_checkpoint_resume_is_bit_identical(dtype, amsgrad, via, tmp_path):
    gen = generator("resume", dtype, amsgrad)
    hp = Hyper(amsgrad=amsgrad, scale=0.5)
    ps = _checkpoint_params(gen, dtype)
    opt = FOAM(ps, level=2, **hp.foam_kwargs())
    for t in range(3):
        set_grads(ps, new_grads(ps, gen, t))
        opt.step()
    if via == "bytesio":
        buf = io.BytesIO()
        torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in ps]}, buf)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
    else:
        torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in ps]}, tmp_path / "c.pt")
        ckpt = torch.load(tmp_path / "c.pt", weights_only=True)

    qs = [nn.Parameter(v.clone()) for v in ckpt["params"]]
    fresh = FOAM(qs, level=3)  # a fresh optimizer with other settings: the checkpoint wins
    fresh.load_state_dict(ckpt["opt"])
    assert fresh.param_groups[0]["level"] == 2 and fresh.param_groups[0]["scale"] == 0.5
    for p, q in zip(ps, qs):
        assert fresh.state[q]["exp_avg"].dtype == torch.float32
        assert fresh.state[q]["foam_level"] == opt.state[p]["foam_level"]
    for t in range(3, 7):
        grads = new_grads(ps, gen, t)
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        fresh.step()
        for i, (p, q) in enumerate(zip(ps, qs)):
            assert torch.equal(p, q), f"step {t + 1}, param {i}"
    a, b = state_tensors(opt), state_tensors(fresh)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# -------------------------------------------------------- (7) stock AdamW/Adam checkpoints
@pytest.mark.parametrize("level", [2, 3, 8])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize(
    "stock_cls", [torch.optim.AdamW, torch.optim.Adam], ids=lambda c: c.__name__
)
def test_load_stock_state_dict_folds_moments(stock_cls, amsgrad, level):
    gen = generator("stock", stock_cls.__name__, amsgrad, level)
    decoupled = stock_cls is torch.optim.AdamW
    hp = Hyper(amsgrad=amsgrad, weight_decay=0.05, decoupled_weight_decay=decoupled)
    ps = [param((4, 37), gen), param((37,), gen), param((), gen)]
    stock = stock_cls(ps, lr=hp.lr, weight_decay=hp.weight_decay, amsgrad=amsgrad)
    for t in range(3):
        set_grads(ps, new_grads(ps, gen, t))
        stock.step()
    buf = io.BytesIO()
    torch.save(stock.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    full = {i: {k: v.clone() for k, v in st.items()} for i, st in sd["state"].items()}

    qs = [twin(p) for p in ps]
    foam = FOAM(qs, level=level)
    foam.load_state_dict(sd)
    group = foam.param_groups[0]
    assert group["level"] == level and group["scale"] == 1.0 and group["res_scale"] == 1.0
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    models = []
    for i, q in enumerate(qs):
        st = foam.state[q]
        lvl = model_level(q.shape, level)
        assert st["foam_level"] == lvl and float(st["step"]) == 3
        for key in keys:
            expected = model_fold(full[i][key], lvl)
            assert st[key].dtype == torch.float32
            assert tuple(st[key].shape) == tuple(expected.shape)
            assert_within(st[key], expected, _fold_tolerance(full[i][key], lvl), f"{key} of {i}")
        m = ParamModel.create(q, level)
        m.load_state(*(st[k] for k in keys), step=3)
        models.append(m)
    run(foam, qs, models, hp, 3, gen)
    for q, m in zip(qs, models):
        assert_param_matches(q, m)
        assert_state_matches(foam.state[q], m, amsgrad=amsgrad)


def test_load_bf16_stock_adamw_state_dict():
    """bf16 AdamW keeps bf16 moments; FOAM folds them into float32 state and steps on."""
    gen = generator("stock-bf16")
    hp = Hyper(weight_decay=0.05)
    ps = [param((4, 37), gen, BF16, std=0.1), param((37,), gen, BF16, std=0.1)]
    stock = torch.optim.AdamW(ps, lr=hp.lr, weight_decay=hp.weight_decay)
    for t in range(3):
        set_grads(ps, new_grads(ps, gen, t))
        stock.step()
    full = [{k: stock.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p in ps]
    assert full[0]["exp_avg"].dtype == BF16
    qs = [twin(p) for p in ps]
    foam = FOAM(qs, level=3)
    foam.load_state_dict(stock.state_dict())
    models = []
    for q, moments in zip(qs, full):
        st, lvl = foam.state[q], model_level(q.shape, 3)
        for key, x in moments.items():
            assert st[key].dtype == torch.float32
            assert_within(st[key], model_fold(x, lvl), _fold_tolerance(x, lvl), key)
        m = ParamModel.create(q, 3)
        m.load_state(st["exp_avg"], st["exp_avg_sq"], step=3)
        models.append(m)
    run(foam, qs, models, hp, 3, gen)
    for q, m in zip(qs, models):
        assert q.dtype == BF16
        assert_param_matches(q, m)
