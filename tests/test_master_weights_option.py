"""``master_weights=`` on ``convert`` and the "foam" backend (FOAM's own option is tested in
tests/test_master_weights.py): validated where given, honoured from the first step after the
conversion, equal to FOAM built with the option, and kept by checkpoints."""

import copy

import pytest
import torch
from torch import nn

import foam_compile
from foam_compile import FOAM
from foam_compile.master_weights import RHO_KEY


def bf16_model(seed: int = 0) -> nn.Module:
    """bf16 weights (last dim 10: a partial block at level 2) and a float32 head."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 10))
    model[0].to(torch.bfloat16)
    return model


def backward(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 10, generator=g)
    model.zero_grad(set_to_none=True)
    h = model[0](x.to(torch.bfloat16)).float()
    model[2](model[1](h)).square().mean().backward()


@pytest.mark.parametrize("bad", ["int4", "fp32", 8, True])
def test_bad_value_is_refused_on_convert_and_backend(bad):
    opt = torch.optim.AdamW(bf16_model().parameters())
    fix = r"use None .*'int8' .*'int16'"
    with pytest.raises(ValueError, match=f"foam_compile.convert: invalid master_weights=.*{fix}"):
        foam_compile.convert(opt, master_weights=bad)
    assert type(opt) is torch.optim.AdamW and "master_weights" not in opt.param_groups[0]
    with pytest.raises(ValueError, match=f"foam_compile.backend: invalid master_weights=.*{fix}"):
        foam_compile.backend(master_weights=bad)


@pytest.mark.parametrize("width", ["int8", "int16"])
def test_convert_creates_the_correction_on_the_first_step_and_equals_foam(width):
    """A stock AdamW with moments converted with master_weights equals FOAM built with it and
    loaded with the same stock moments: bit for bit, corrections included."""
    model = bf16_model()
    stock = torch.optim.AdamW(model.parameters(), lr=1e-2)
    backward(model, 0)
    stock.step()
    twin = copy.deepcopy(model)
    built = FOAM(twin.parameters(), lr=1e-2, master_weights=width)
    built.load_state_dict(copy.deepcopy(stock.state_dict()))
    built.param_groups[0]["master_weights"] = width  # the stock groups had no such key

    opt = foam_compile.convert(stock, master_weights=width)
    assert opt.param_groups[0]["master_weights"] == width
    assert all(RHO_KEY not in st for st in opt.state.values())  # created on the first step
    for seed in range(1, 4):
        for m, o in ((model, opt), (twin, built)):
            backward(m, seed)
            o.step()
    dtype = {"int8": torch.int8, "int16": torch.int16}[width]
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        st = opt.state[p]
        if p.dtype == torch.bfloat16:
            assert st[RHO_KEY].dtype == dtype and st[RHO_KEY].shape == p.shape
            assert torch.equal(st[RHO_KEY], built.state[q][RHO_KEY])
        else:
            assert RHO_KEY not in st  # float32 parameters need none


def test_correction_survives_a_checkpoint_with_int8_state():
    model = bf16_model()
    opt = foam_compile.convert(
        torch.optim.AdamW(model.parameters(), lr=1e-2), master_weights="int8", state_format="int8"
    )
    for seed in range(2):
        backward(model, seed)
        opt.step()
    twin = copy.deepcopy(model)
    loaded = foam_compile.convert(
        torch.optim.AdamW(twin.parameters(), lr=1e-2), master_weights="int8", state_format="int8"
    )
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    for seed in range(2, 4):
        for m, o in ((model, opt), (twin, loaded)):
            backward(m, seed)
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p].get("foam_format") == "int8"
        if p.dtype == torch.bfloat16:
            assert torch.equal(opt.state[p][RHO_KEY], loaded.state[q][RHO_KEY])


def test_backend_hands_master_weights_to_convert():
    backend = foam_compile.backend(master_weights="int16", state_format="int4")
    assert backend.convert_options["master_weights"] == "int16"
    assert backend.convert_options["state_format"] == "int4"


def test_backend_train_step_with_master_weights_equals_foam(fresh_dynamo):
    """A stock AdamW step compiled with ``backend(master_weights=...)``: the first call
    runs the rewritten graph (not ``FOAM.step``), which must give the bf16 weight its correction
    too (it raised "has correction None" before); every step then equals FOAM built with the
    option, bit for bit."""
    model, twin = bf16_model(), bf16_model()
    stock = torch.optim.AdamW(model.parameters(), lr=1e-2)
    built = FOAM(twin.parameters(), lr=1e-2, master_weights="int8", level=2, scale=0.25)

    def step():  # gradients outside: an Inductor-compiled backward may round differently
        stock.step()

    compiled = torch.compile(
        step, backend=foam_compile.backend(master_weights="int8", level=2, scale=0.25)
    )
    for seed in range(3):
        for m in (model, twin):
            backward(m, seed)
        compiled()
        built.step()
    opt = stock  # converted in place by the backend
    assert isinstance(opt, FOAM)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        if p.dtype == torch.bfloat16:
            assert torch.equal(opt.state[p][RHO_KEY], built.state[q][RHO_KEY])
