"""torch.optim's step contracts (``TestOptimRenewed``), for FOAM at levels 0 and 2 and convert.

Each test runs every AdamW/Adam input of torch's ``OptimizerInfo`` (default, lr, weight decay,
maximize, amsgrad, tensor lr, tensor betas) where torch's own test does.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn
from torch.nn import Parameter

from .subjects import Oracle
from .torch_inputs import adam_inputs

INPUTS = adam_inputs("cuda").optim_inputs  # "cuda" adds the tensor lr/betas configs (CPU tensors)
IDS = [i.desc.replace(" ", "-") for i in INPUTS]
STOCKS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}


def gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def weight_bias(contiguous: bool, dtype=torch.float32, g=None):
    g = g or gen("weight_bias", contiguous)
    if contiguous:
        w = Parameter(torch.randn(10, 5, generator=g, dtype=dtype))
        b = Parameter(torch.randn(10, generator=g, dtype=dtype))
    else:  # torch's non-contiguous case: every other element of a wider tensor
        w = Parameter(torch.randn(10, 5, 2, generator=g, dtype=dtype)[..., 0])
        b = Parameter(torch.randn(10, 2, generator=g, dtype=dtype)[..., 0])
    return w, b


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non-contiguous"])
@pytest.mark.parametrize("optim_input", INPUTS, ids=IDS)
def test_goes_right_direction(subject, optim_input, contiguous):
    w, b = weight_bias(contiguous)
    x = torch.randn(5, generator=gen("x"))
    opt = subject.build([w, b], **optim_input.kwargs)

    def closure():
        opt.zero_grad()
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(20):
        opt.step(closure)
    if optim_input.kwargs.get("maximize", False):
        assert closure().item() > initial
    else:
        assert closure().item() < initial


def odd_params(dtype=torch.float32):
    """torch's shapes plus FOAM's awkward ones: 3-d with a partial last block, 0-d, empty."""
    g = gen("odd", dtype)
    shapes = [(10, 5), (10,), (2, 3, 13), (), (0, 5), (3, 0)]
    return [Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]


@pytest.mark.parametrize("stock", list(STOCKS), ids=list(STOCKS))
@pytest.mark.parametrize("optim_input", INPUTS, ids=IDS)
def test_matches_its_oracle(subject, optim_input, stock):
    """Every input of torch's: FOAM level 0 is AdamW/Adam, level 2 the float64 model."""
    params = odd_params()
    kwargs = optim_input.kwargs
    opt = subject.build(params, STOCKS[stock], **kwargs)
    oracle = Oracle(subject, params, kwargs, STOCKS[stock])
    g = gen("grads", optim_input.desc, stock)
    for t in range(5):
        grads = [torch.randn(p.shape, generator=g) * (2.0 if t % 2 else 0.5) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        oracle.step(grads)
    oracle.check(params)
    for p in params:
        if p.numel():
            assert opt.state[p]["foam_level"] == (subject.level if p.dim() >= 2 else 0)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str
)
def test_dtypes(subject, dtype):
    """Parameters keep their dtype; the moments are float32 (float64 for float64 parameters)."""
    params = odd_params(dtype)
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}
    opt = subject.build(params, **kwargs)
    oracle = Oracle(subject, params, kwargs)
    g = gen("dtype", dtype)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        oracle.step(grads)
    if oracle.stock is not None and dtype in (torch.bfloat16, torch.float16):
        oracle.stock = None  # torch keeps low-precision moments; FOAM's are float32 (README)
    oracle.check(params)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for p in params:
        assert p.dtype == dtype
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert opt.state[p][key].dtype == state_dtype


def test_zero_size_params_step_and_keep_empty_state(subject):
    empty = [Parameter(torch.randn(0, 5)), Parameter(torch.randn(3, 0)), Parameter(torch.randn(0))]
    opt = subject.build(empty, lr=1e-2)
    for p in empty:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.step()
    for p in empty:
        assert p.numel() == 0 and float(opt.state[p]["step"]) == 2
        assert opt.state[p]["exp_avg"].numel() == 0


@pytest.mark.parametrize("optim_input", INPUTS, ids=IDS)
def test_step_is_noop_when_params_have_no_grad(subject, optim_input):
    params = [torch.randn(2, 3, requires_grad=False, generator=gen("nograd", i)) for i in range(2)]
    old = [p.clone() for p in params]
    opt = subject.build(params, **optim_input.kwargs)
    opt.step(lambda: torch.tensor([1.0]))
    assert all(torch.equal(a, b) for a, b in zip(old, params))
    assert not any(opt.state.get(p) for p in params)


@pytest.mark.parametrize("optim_input", INPUTS, ids=IDS)
def test_step_is_noop_for_zero_grads(subject, optim_input):
    kwargs = dict(optim_input.kwargs)
    if kwargs.get("weight_decay", 0) != 0:
        pytest.skip("weight decay moves parameters whatever the gradient (as in torch's test)")
    kwargs["weight_decay"] = 0.0  # AdamW's default decay would too
    param = torch.randn(5, 1, requires_grad=True, generator=gen("zero"))
    old = param.detach().clone()
    opt = subject.build([param], **kwargs)
    param.grad = torch.zeros_like(param)
    opt.step(lambda: torch.tensor([1.0]))
    assert torch.equal(old, param.detach())


@pytest.mark.parametrize("optim_input", INPUTS, ids=IDS)
def test_param_groups_weight_decay(subject, optim_input):
    w, b = weight_bias(True)
    x = torch.randn(5, generator=gen("x"))
    bias_kwargs = {**optim_input.kwargs, "weight_decay": 0.0}
    groups = [{"params": [w], **optim_input.kwargs}, {"params": [b], **bias_kwargs}]
    opt = subject.build(groups)
    initial = (w.mv(x) + b).pow(2).sum().item()
    for _ in range(20):
        opt.zero_grad()
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        opt.step()
    if optim_input.kwargs.get("maximize", False):
        assert loss.item() > initial
    else:
        assert loss.item() < initial


@pytest.mark.parametrize("optim_input", INPUTS, ids=IDS)
def test_param_groups_lr(subject, optim_input):
    """A group with its own lr steps; the outer lr (1e-28) leaves the other group as it was."""
    kwargs = dict(optim_input.kwargs)
    if "lr" not in kwargs or kwargs["lr"] == 0:
        kwargs["lr"] = 1e-3
    w, b = weight_bias(True)
    irrelevant = Parameter(torch.randn(2, generator=gen("irrelevant")))
    before = irrelevant.detach().clone()
    x = torch.randn(5, generator=gen("x"))
    opt = subject.build([{"params": [w, b], **kwargs}, {"params": [irrelevant]}], lr=1e-28)
    initial = (w.mv(x) + b).pow(2).sum().item()
    for _ in range(20):
        opt.zero_grad()
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        irrelevant.grad = torch.rand_like(irrelevant)
        opt.step()
    if kwargs.get("maximize", False):
        assert loss.item() > initial
    else:
        assert loss.item() < initial
    assert torch.equal(irrelevant.detach(), before)


def test_closure_is_called_once_with_grad_enabled(subject):
    w, b = weight_bias(True)
    opt = subject.build([w, b], lr=1e-2)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (w.sum() + b.sum()) ** 2
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True] and torch.is_tensor(loss) and loss.requires_grad
    assert opt.step() is None


def test_optimizer_can_be_printed(subject):
    opt = subject.build([Parameter(torch.randn(2, 3)) for _ in range(2)], lr=1e-2)
    text = repr(opt)
    assert "Parameter Group 0" in text and "level" in text


SCHEDULERS = adam_inputs().scheduler_inputs


@pytest.mark.parametrize("schedulers", SCHEDULERS, ids=[str(i) for i in range(len(SCHEDULERS))])
def test_schedulers_drive_the_lr_as_for_adamw(subject, schedulers):
    """torch's scheduler inputs for Adam: the lr each step sees is AdamW's, and training goes
    the right way."""
    w, b = weight_bias(True)
    x = torch.randn(5, generator=gen("x"))
    opt = subject.build([w, b], lr=1e-2)
    ref = torch.optim.AdamW([nn.Parameter(w.detach().clone())], lr=1e-2)
    scheds = [make(opt) for make in schedulers]
    ref_scheds = [make(ref) for make in schedulers]
    initial = (w.mv(x) + b).pow(2).sum().item()
    for _ in range(20):
        opt.zero_grad()
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        opt.step()
        ref.param_groups[0]["params"][0].grad = torch.zeros(10, 5)
        ref.step()
        for s, r in zip(scheds, ref_scheds):
            if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
                s.step(loss.item())
                r.step(loss.item())
            else:
                s.step()
                r.step()
        assert float(opt.param_groups[0]["lr"]) == float(ref.param_groups[0]["lr"])
        assert [float(v) for v in scheds[-1].get_last_lr()] == ref_scheds[-1].get_last_lr()
    assert loss.item() < initial
