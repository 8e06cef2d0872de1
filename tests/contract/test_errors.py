"""torch.optim's error contracts: torch's own error inputs for AdamW/Adam raise the same kind of
error from FOAM (with FOAM's message, which names the option and its range), except the few
FOAM does not share by design (README, "Contracts FOAM does not share")."""

from __future__ import annotations

import warnings

import pytest
import torch

from .subjects import IMPL_FLAGS
from .torch_inputs import OptimizerErrorEnum, adam_inputs

ERRORS = adam_inputs().error_inputs
# FOAM reads betas as numbers: a float and a tensor may be mixed (torch refuses, for its
# foreach/capturable kernels, which FOAM does not have).
NOT_SHARED = ("betas must be either both floats or both Tensors",)


def cases():
    for e in ERRORS:
        desc = e.optimizer_error_input.desc
        if desc in NOT_SHARED:
            continue
        yield pytest.param(e, id=desc.replace(" ", "-")[:60])


@pytest.mark.parametrize("error_input", list(cases()))
def test_torchs_error_inputs(subject, error_input):
    optim_input = error_input.optimizer_error_input
    params, kwargs = optim_input.params, dict(optim_input.kwargs)
    if params is None:
        params = [torch.nn.Parameter(torch.randn(2, 3))]
    # convert takes a stock optimizer: torch's own constructor checks its kwargs, flags and all.
    build = lambda: subject.build_fn(params, torch.optim.AdamW, kwargs)  # noqa: E731
    if subject.name != "convert" and set(kwargs) & set(IMPL_FLAGS):
        with pytest.raises(TypeError, match="unexpected keyword"):  # FOAM takes no impl flags
            build()
        return
    assert error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            build()
    else:
        with pytest.raises(error_input.error_type):
            build()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1e-3), r"invalid lr"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), r"lr as a tensor must have one element"),
        (dict(betas=(1.0, 0.0)), r"betas\[0\]=1.0.*\[0, 1\)"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(eps=-1e-8), r"invalid eps"),
        (dict(weight_decay=-1), r"invalid weight_decay=-1"),
    ],
)
def test_bad_hyperparameters_name_the_option(subject, kwargs, match):
    if subject.name == "convert":
        match = None  # torch's AdamW refuses them first, with its own message
    with pytest.raises(ValueError, match=match):
        subject.build([torch.nn.Parameter(torch.randn(2, 3))], **kwargs)


def test_sparse_gradient_fails_the_step_and_changes_nothing(subject):
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = subject.build([p], lr=1e-2)
    p.grad = torch.randn(4, 6).to_sparse()
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state.get(p)


def test_complex_parameters_are_refused_with_the_fix(subject):
    z = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"view_as_real"):
        subject.build([z], lr=1e-2)


def test_duplicate_parameters_warn_as_in_torch(subject):
    p = torch.nn.Parameter(torch.randn(2, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        subject.build([p, p])
    assert any("duplicate parameters" in str(w.message) for w in caught)
