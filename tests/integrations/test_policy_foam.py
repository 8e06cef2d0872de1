"""The folding policy for bare tensors (``FOAM``, also known as ``PolicyFOAM``) and the
folded-state guard on their own (no trainer needed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import foam_compile
from foam_compile import discovery
from foam_compile.integrations import PolicyFOAM

from .common import check_levels
from .tiny_lm import batches, lm_loss, make_model


def step(model, opt, tokens):
    lm_loss(model(tokens), tokens).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("given", ["names from the live module", "model="])
def test_bare_tensors_get_the_policy(given):
    model = make_model()
    kw = {"model": model} if given == "model=" else {}
    opt = PolicyFOAM(list(model.parameters()), lr=1e-2, level=3, **kw)
    step(model, opt, batches(1)[0])
    levels = check_levels(opt.state.__getitem__, model.named_parameters(), level=3)
    assert levels["tok_embeddings.weight"] == levels["output.weight"] == 0


def test_state_before_the_closure_runs():
    """Lightning's closure computes the gradients inside step(): no parameter has one before."""
    model = make_model()
    opt = PolicyFOAM(model.parameters(), lr=1e-2)
    tokens = batches(1)[0]

    def closure():
        loss = lm_loss(model(tokens), tokens)
        loss.backward()
        return loss

    opt.step(closure)
    check_levels(opt.state.__getitem__, model.named_parameters())
    assert all(float(st["step"]) == 1 for st in opt.state.values())


def test_one_heap_scan_for_one_optimizer_per_parameter(monkeypatch):
    """torchtune's optimizer_in_bwd: the owner found for the first parameter serves the rest."""
    calls = []
    find = discovery._find_roots
    monkeypatch.setattr(discovery, "_find_roots", lambda ps: calls.append(len(ps)) or find(ps))
    model = make_model()
    opts = {p: PolicyFOAM([p], lr=1e-2) for p in model.parameters()}
    lm_loss(model(batches(1)[0]), batches(1)[0]).backward()
    for opt in opts.values():
        opt.step()
    assert calls == [1]
    check_levels(lambda p: opts[p].state[p], model.named_parameters())


def test_names_read_through_a_data_parallel_wrapper():
    model = make_model()
    wrapped = nn.DataParallel(model)  # a root whose names would start with "module."
    opt = PolicyFOAM(wrapped.parameters(), lr=1e-2)
    step(model, opt, batches(1)[0])
    assert opt.state[model.output.weight]["foam_level"] == 0  # "^output\." matched as in model
    del wrapped


def test_guard_names_the_fix_for_a_stock_adamw_on_folded_state():
    model = make_model()
    foam = foam_compile.convert(torch.optim.AdamW(model.parameters(), lr=1e-2))
    step(model, foam, batches(1)[0])
    stock = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stock.load_state_dict(foam.state_dict())
    lm_loss(model(batches(1)[0]), batches(1)[0]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"foam_compile\.convert\(optimizer\)"):
        stock.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # nothing written
    foam_compile.convert(stock).step()  # the named fix
    assert isinstance(stock, foam_compile.FOAM)
