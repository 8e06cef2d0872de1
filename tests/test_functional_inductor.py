"""What Inductor makes of the compiled FOAM step on CPU (issue 16).

The generated code of a compiled ``FOAM.step`` is pinned: the update of a whole param group is
one extern call of ``foam::cpu_step_`` (the C++ kernel, built once per machine, which also
increments the step counts), Inductor generates no kernel at all, and nothing is allocated per
call. A second test compiles a step over parameters of every kind
(partial last blocks, 3-d, levels 0/1/2/3, amsgrad, maximize, coupled decay, bf16) and holds it
to the float64 model (``float64_model``) with the tolerances the eager tests use.
"""

from __future__ import annotations

import re
import zlib

import pytest
import torch
from float64_model import (
    F64,
    Hyper,
    ParamModel,
    assert_param_matches,
    assert_state_matches,
)
from torch._inductor.utils import run_and_get_code

from foam_compile import FOAM


def generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(shape, gen, dtype=torch.float32, std=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=F64) * std).to(dtype)


def kernels(code: str) -> list[str]:
    """The C++ sources of the Inductor kernels in a compiled module's code."""
    return [part.split("'''")[0] for part in code.split('extern "C"')[1:]]


def allocations(code: str) -> list[str]:
    """The buffers the compiled module allocates per call (their shapes)."""
    return re.findall(r"empty_strided_cpu\(\((.*?)\), \(", code)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_step_is_one_extern_call_per_group_without_temporaries(dtype, fresh_dynamo):
    rows, n = 64, 128
    gen = generator("structure", dtype)
    folded = [torch.nn.Parameter(randn((rows, n), gen, dtype)) for _ in range(3)]
    plain = [torch.nn.Parameter(randn((n,), gen, dtype))]
    for p in folded + plain:
        p.grad = randn(p.shape, gen, dtype)
    opt = FOAM(
        [{"params": folded, "level": 2}, {"params": plain, "level": 0}], lr=torch.tensor(1e-3)
    )
    opt.step()  # state exists; the compiled step below is a steady-state step

    _, codes = run_and_get_code(torch.compile(opt.step))
    code = "\n".join(codes)
    call = code.split("def call")[1]
    # One op call per param group, whatever the number of parameters in it.
    assert call.count("torch.ops.foam.cpu_step_.default(") == 2
    # No Inductor kernel at all (the op increments the step counts too): nothing per shape.
    assert kernels(code) == [], kernels(code)
    # p and the moments are written in place by the op: nothing is allocated per call.
    assert allocations(code) == []


HYPERS = {
    "adamw": Hyper(lr=1e-2),
    "everything": Hyper(
        lr=3e-2,
        betas=(0.8, 0.95),
        weight_decay=0.05,
        amsgrad=True,
        maximize=True,
        scale=0.25,
        res_scale=2.0,
    ),
    "coupled": Hyper(lr=1e-2, decoupled_weight_decay=False, weight_decay=0.1),
}
# (shape, level, option, dtype): whole blocks, partial last blocks (37 = 9*4 + 1, 3 < one block),
# 3-d, levels 0..3 through foam::cpu_step_, bf16 parameters with float32 state.
CASES = [
    ((64, 128), 2, "adamw", torch.float32),
    ((16, 37), 2, "adamw", torch.float32),
    ((6, 3), 2, "adamw", torch.float32),
    ((3, 5, 20), 2, "everything", torch.float32),
    ((6, 13), 2, "coupled", torch.float32),
    ((4, 24), 3, "everything", torch.float32),
    ((5, 12), 1, "adamw", torch.float32),
    ((7, 9), 0, "everything", torch.float32),
    ((8, 40), 2, "adamw", torch.bfloat16),
    ((3, 7, 37), 2, "coupled", torch.float32),
    ((4, 40), 1, "everything", torch.float32),
    ((9, 3), 3, "coupled", torch.float32),
    ((6, 44), 3, "everything", torch.bfloat16),
]
GRAD_SCALES = (4.0, 1.0, 0.25)  # shrinking: amsgrad's running max differs from v


def test_compiled_step_matches_float64_model(fresh_dynamo):
    gen = generator("compiled-vs-model")
    groups, models, params = [], [], []
    for shape, level, option, dtype in CASES:
        std = 0.1 if dtype == torch.bfloat16 else 1.0
        p = torch.nn.Parameter(randn(shape, gen, dtype, std))
        hp = HYPERS[option]
        kw = hp.foam_kwargs()
        kw["lr"] = torch.tensor(kw["lr"])  # a tensor lr, as a scheduler would use
        groups.append(dict(params=[p], level=level, **kw))
        models.append((ParamModel.create(p, level), hp))
        params.append(p)
    opt = FOAM(groups)
    step = torch.compile(opt.step)
    for scale in GRAD_SCALES:
        grads = [randn(p.shape, gen, p.dtype) * scale for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        step()
        for (model, hp), g in zip(models, grads):
            model.step(g, hp)
    for (shape, level, option, dtype), p, (model, hp) in zip(CASES, params, models):
        what = f"{shape} level {level} {option} {dtype}"
        assert p.dtype == dtype
        assert_param_matches(p, model, what=what)
        assert_state_matches(opt.state[p], model, amsgrad=hp.amsgrad)
    assert fresh_dynamo["stats"]["unique_graphs"] <= 1, "the step should compile to one graph"


def test_eager_and_compiled_agree_to_float32_rounding(fresh_dynamo):
    """The same functional code, eager and compiled, on the same inputs: equal up to the few
    float32 roundings Inductor may reassociate (fused multiply-adds, reordered products)."""
    level = 2
    gen = generator("eager-vs-compiled", level)
    shape = (24, 77)  # a partial last block and a ragged last lane group
    p0 = randn(shape, gen, std=0.1)
    eager, compiled = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    opt_e = FOAM([eager], lr=torch.tensor(1e-2), level=level)
    opt_c = FOAM([compiled], lr=torch.tensor(1e-2), level=level)
    step = torch.compile(opt_c.step)
    for scale in GRAD_SCALES:
        g = randn(shape, gen) * scale
        eager.grad, compiled.grad = g.clone(), g.clone()
        opt_e.step()
        step()
    # A block sum's rounding is relative to its terms, not to the (possibly cancelled) sum:
    # tolerances scale with the largest value, a few float32 ulps per step.
    u = torch.finfo(torch.float32).eps
    for a, b in [(compiled, eager)] + [
        (opt_c.state[compiled][k], opt_e.state[eager][k]) for k in ("exp_avg", "exp_avg_sq")
    ]:
        torch.testing.assert_close(a, b, rtol=0, atol=64 * u * float(b.detach().abs().max()))


def test_dynamic_shapes_call_the_same_op(fresh_dynamo):
    """The kernel is shape-generic: with dynamic shapes the graph calls the same op, exactly."""
    gen = generator("dynamic")
    shape = (6, 20)
    p0 = randn(shape, gen)
    eager, compiled = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    opt_e = FOAM([eager], lr=torch.tensor(1e-2), level=2)
    opt_c = FOAM([compiled], lr=torch.tensor(1e-2), level=2)
    with torch._dynamo.config.patch(force_parameter_static_shapes=False):
        step = torch.compile(lambda: opt_c.step(), dynamic=True)
        codes = []
        for scale in GRAD_SCALES:
            g = randn(shape, gen) * scale
            eager.grad, compiled.grad = g.clone(), g.clone()
            opt_e.step()
            codes += run_and_get_code(step)[1]
    assert "torch.ops.foam.cpu_step_" in "\n".join(codes)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt_c.state[compiled][k], opt_e.state[eager][k], rtol=0, atol=0)
