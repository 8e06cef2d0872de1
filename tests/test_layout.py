"""Per-parameter layout choices (``foam_compile/layout.py``): a level or a state format chosen
when a parameter enters, honoured when its state is created, kept through checkpoints, copies
and a parameter swap. A test-only format (float32 under another name) stands in for the
formats of issue 12."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import foam_compile
from foam_compile import FOAM, layout
from foam_compile.state import FORMATS, Fp32Format, register


class Twin(Fp32Format):
    name = "fp32-twin"


@pytest.fixture
def twin_format():
    register(Twin())
    yield "fp32-twin"
    FORMATS.pop("fp32-twin", None)


def params():
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(shape, generator=g)) for shape in [(3, 10), (4, 6), (5,)]]


def step(opt, ps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g)
    opt.step()


def test_a_recorded_choice_shapes_the_state_created_later(twin_format):
    ps = params()
    ps[0].requires_grad_(False)
    opt = FOAM(ps, lr=1e-2, level=2)
    group = opt.param_groups[0]
    layout.record(group, 0, level=3, format=twin_format)
    layout.record(group, 1, format=twin_format)
    step(opt, ps)
    assert not opt.state.get(ps[0])  # frozen: no state, the choice waits
    assert opt.state[ps[1]]["foam_format"] == twin_format and opt.state[ps[1]]["foam_level"] == 2
    ps[0].requires_grad_(True)
    step(opt, ps, 1)
    st = opt.state[ps[0]]
    assert st["foam_level"] == 3 and st["foam_format"] == twin_format
    assert st["exp_avg"].shape == (3, 2)


def test_choices_survive_state_dict_copies_and_pickle(twin_format):
    ps = params()
    ps[0].requires_grad_(False)
    opt = FOAM(ps, lr=1e-2, level=2)
    layout.record(opt.param_groups[0], 0, level=1, format=twin_format)
    step(opt, ps)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = FOAM(params(), lr=1e-2, level=2)
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    for other in (loaded, copy.deepcopy(opt)):
        assert layout.choice(other.param_groups[0], 0) == {"level": 1, "format": twin_format}
        q = other.param_groups[0]["params"]
        for p in q:
            p.requires_grad_(True)
        step(other, q, 1)
        assert other.state[q[0]]["foam_level"] == 1
        assert other.state[q[0]]["foam_format"] == twin_format


def test_choices_are_kept_by_position_through_a_parameter_swap():
    """accelerate's FSDP2 path replaces the tensors in group['params'] after construction."""
    model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 12), nn.Linear(12, 30))
    opt = FOAM(model.parameters(), lr=1e-2, model=model, levels={"1.weight": 3})
    swapped = [nn.Parameter(p.detach().clone()) for p in opt.param_groups[0]["params"]]
    opt.param_groups[0]["params"] = swapped
    step(opt, swapped)
    levels = [opt.state[p]["foam_level"] for p in swapped]
    assert levels == [0, 3, 0, 2, 0]  # embedding, 1.weight (levels=), bias, 2.weight, bias


def test_a_stock_checkpoint_is_folded_in_the_recorded_format(twin_format):
    ps = params()
    stock = torch.optim.AdamW([nn.Parameter(p.detach().clone()) for p in ps], lr=1e-2)
    step(stock, stock.param_groups[0]["params"])
    opt = FOAM(ps, lr=1e-2, level=2)
    layout.record(opt.param_groups[0], 0, format=twin_format)
    opt.load_state_dict(copy.deepcopy(stock.state_dict()))
    assert opt.state[ps[0]]["foam_format"] == twin_format
    assert "foam_format" not in opt.state[ps[1]]  # fp32, the default, is not written


def test_unknown_choices_and_bad_levels_are_refused():
    group = FOAM(params(), lr=1e-2).param_groups[0]
    with pytest.raises(TypeError, match="unknown choice"):
        layout.record(group, 0, dtype="bf16")
    with pytest.raises(ValueError, match="invalid level=17"):
        layout.record(group, 0, level=17)


def test_layouts_store_only_choices():
    """Equal optimizers have equal state dicts (torch's contract), whenever the policy ran."""
    model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 30))
    opt = foam_compile.convert(torch.optim.AdamW(model.parameters(), lr=1e-2))
    # the embedding: level 0, and stochastic rounding should the state format be quantized
    assert opt.param_groups[0]["foam_layout"] == {0: {"level": 0, "stochastic": True}}
