"""torch.optim's checkpoint contracts (``TestOptimRenewed``), for FOAM at levels 0 and 2 and
convert: state dicts round-trip and continue bitwise, load older and foreign layouts, copy."""

from __future__ import annotations

import copy
import io
import zlib

import pytest
import torch
from torch import nn
from torch.nn import Parameter

from .torch_inputs import adam_inputs

INPUTS = [i for i in adam_inputs("cuda").optim_inputs]
IDS = [i.desc.replace(" ", "-") for i in INPUTS]


def gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_params(seed=0):
    g = gen("params", seed)
    # weight [4, 7]: a partial last block at level 2; a 3-d tensor; a bias; a 0-d scalar
    return [
        Parameter(torch.randn(4, 7, generator=g)),
        Parameter(torch.randn(2, 3, 5, generator=g)),
        Parameter(torch.randn(4, generator=g)),
        Parameter(torch.randn((), generator=g)),
    ]


def closure_for(opt, params, x):
    def closure():
        opt.zero_grad()
        w, w3, b, s = params
        loss = (w @ x + b).pow(2).sum() + (w3.sum(-1) * s).pow(2).sum()
        loss.backward()
        return loss

    return closure


X = torch.randn(7, generator=gen("x"))


def twin(params):
    with torch.no_grad():
        return [Parameter(p.clone()) for p in params]


@pytest.mark.parametrize("optim_input", INPUTS, ids=IDS)
def test_state_dict_round_trip_continues_bitwise(subject, optim_input):
    params = make_params()
    opt = subject.build(params, **optim_input.kwargs)
    closure = closure_for(opt, params, X)
    for _ in range(5):
        opt.step(closure)
    copies = twin(params)
    opt_c = subject.build(copies, **optim_input.kwargs)
    saved = copy.deepcopy(opt.state_dict())
    opt_c.load_state_dict(saved)
    closure_c = closure_for(opt_c, copies, X)
    for _ in range(5):
        opt.step(closure)
        opt_c.step(closure_c)
        for p, q in zip(params, copies):
            assert torch.equal(p, q)
    torch.testing.assert_close(opt.state_dict(), opt_c.state_dict(), rtol=0, atol=0)
    # Repeated param groups are represented identically (torch #36831).
    opt_c.param_groups.extend(opt_c.param_groups)
    assert opt.state_dict()["param_groups"][-1] == opt_c.state_dict()["param_groups"][-1]


def test_load_state_dict_does_not_modify_its_argument(subject):
    params = make_params()
    opt = subject.build(params, lr=1e-2, amsgrad=True)
    for _ in range(2):
        opt.step(closure_for(opt, params, X))
    sd = copy.deepcopy(opt.state_dict())
    kept = copy.deepcopy(sd)
    subject.build(twin(params), lr=1e-2, amsgrad=True).load_state_dict(sd)
    torch.testing.assert_close(sd, kept, rtol=0, atol=0)


def test_torch_save_and_load_weights_only(subject):
    params = make_params()
    opt = subject.build(params, lr=torch.tensor(1e-2), weight_decay=0.1)
    closure = closure_for(opt, params, X)
    for _ in range(3):
        opt.step(closure)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    copies = twin(params)
    opt_c = subject.build(copies, lr=torch.tensor(1e-2), weight_decay=0.1)
    opt_c.load_state_dict(torch.load(buf, weights_only=True))
    closure_c = closure_for(opt_c, copies, X)
    for _ in range(3):
        opt.step(closure)
        opt_c.step(closure_c)
    assert all(torch.equal(p, q) for p, q in zip(params, copies))


NEW_FLAGS = ["maximize", "foreach", "fused", "differentiable", "capturable"]
FOAM_KEYS = ["level", "scale", "res_scale", "foam_layout", "decoupled_weight_decay"]


@pytest.mark.parametrize("drop", [NEW_FLAGS, FOAM_KEYS], ids=["torch-flags", "foam-keys"])
@pytest.mark.parametrize("optim_input", INPUTS, ids=IDS)
def test_can_load_older_state_dict(subject, optim_input, drop):
    """Param groups saved before a flag existed load (torch's flags, or FOAM's own keys)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 2, 1, stride=2), nn.BatchNorm2d(2))
    x = torch.rand(1, 4, 16, 16)
    opt = subject.build(model.parameters(), **optim_input.kwargs)
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for flag in drop:
            group.pop(flag, None)
    opt.load_state_dict(old)
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    assert all(float(st["step"]) == 4 for st in opt.state.values())


@pytest.mark.parametrize("optim_input", INPUTS, ids=IDS)
def test_load_nontensor_step(subject, optim_input):
    params = [Parameter(torch.randn(2, 3, generator=gen("nontensor", i))) for i in range(2)]
    for p in params:
        p.grad = torch.rand(p.shape, generator=gen("g", p.shape))
    opt = subject.build(params, **optim_input.kwargs)
    for _ in range(3):
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["step"] = st["step"].item()
    opt.load_state_dict(sd)
    opt.step()
    assert all(torch.is_tensor(opt.state[p]["step"]) for p in params)
    assert all(float(opt.state[p]["step"]) == 4 for p in params)


@pytest.mark.parametrize("optim_input", INPUTS, ids=IDS)
def test_deepcopy_copies_all_public_attrs(subject, optim_input):
    params = [Parameter(torch.randn(2, 3, generator=gen("copy", i))) for i in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    opt = subject.build(params, **optim_input.kwargs)
    for _ in range(3):
        opt.step()

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    assert public(opt) == public(copy.deepcopy(opt))


def test_named_parameters_round_trip_with_names(subject):
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = subject.build(model.named_parameters(), lr=1e-2)
    x = torch.randn(4, 7, generator=gen("named"))
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    sd = opt.state_dict()
    names = [n for n, _ in model.named_parameters()]
    assert sd["param_groups"][0]["param_names"] == names
    other = copy.deepcopy(model)
    opt_c = subject.build(other.named_parameters(), lr=1e-2)
    opt_c.load_state_dict(copy.deepcopy(sd))
    assert opt_c.param_groups[0]["param_names"] == names
    for _ in range(2):
        for o, m in ((opt, model), (opt_c, other)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))


def test_named_and_unnamed_groups_do_not_mix(subject):
    """torch's rule: all parameters, and all param groups, with names or all without."""
    a, b = Parameter(torch.randn(2, 2)), Parameter(torch.randn(2, 2))
    with pytest.raises(ValueError, match="all optimizer params should be with/without names"):
        subject.build([("a", a), b])
    opt = subject.build([("a", a)])
    with pytest.raises(ValueError, match="all optimizer param groups should be with/without"):
        opt.add_param_group({"params": [b]})
