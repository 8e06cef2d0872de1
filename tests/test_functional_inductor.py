"""What Inductor's C++ backend makes of the FOAM step (issue 4, CPU part).

The generated code of a compiled ``FOAM.step`` is pinned for a level-2 parameter: two loop nests
(the block moments; then the elementwise update over the parameter, vectorised, its block sums
from scalar loads that are uniform across a vector), no scalar gathers (``tmpbuf``), nothing
allocated per call but the 0-d step scalars, bias corrections computed once per step. A second
test compiles a step over parameters of every kind (partial last blocks, 3-d, levels 0/1/2/3,
amsgrad, maximize, coupled decay, bf16) and holds it to the float64 model (``float64_model``)
with the tolerances the eager tests use.
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


def parallel_loops(src: str) -> list[str]:
    """The body of every ``#pragma omp for`` loop nest in a C++ kernel, braces matched."""
    bodies = []
    for start in (m.end() for m in re.finditer(r"#pragma omp for\b", src)):
        i = src.index("{", start)
        depth, j = 0, i
        while True:
            depth += {"{": 1, "}": -1}.get(src[j], 0)
            if depth == 0:
                break
            j += 1
        bodies.append(src[start : j + 1])
    return bodies


def allocations(code: str) -> list[int]:
    """Element counts of the (non-scalar) buffers the compiled module allocates per call."""
    sizes = []
    for shape in re.findall(r"empty_strided_cpu\(\((.*?)\), \(", code):
        if not shape.strip():
            continue  # 0-d: the per-step scalars
        numel = 1
        for d in filter(None, (s.strip() for s in shape.split(","))):
            numel *= int(d)
        sizes.append(numel)
    return sizes


def vectorised_cpu() -> bool:
    from torch._inductor import cpu_vec_isa

    return bool(cpu_vec_isa.pick_vec_isa())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_level2_update_is_two_loop_nests_without_gathers_or_temporaries(dtype, fresh_dynamo):
    rows, n = 64, 128  # 2048 blocks of 4
    gen = generator("structure", dtype)
    p = torch.nn.Parameter(randn((rows, n), gen, dtype))
    p.grad = randn((rows, n), gen, dtype)
    opt = FOAM([p], lr=torch.tensor(1e-3), level=2)
    opt.step()  # state exists; the compiled step below is a steady-state step

    _, codes = run_and_get_code(torch.compile(opt.step))
    code = "\n".join(codes)
    (src,) = kernels(code)

    # The step goes through foam::folded_update_ and its lowering, not an extern call.
    assert "folded_update" in code and "torch.ops.foam" not in code.split("def call")[1]
    # No per-lane gathers (tmpbuf), no per-element pow.
    assert "tmpbuf" not in src
    assert "std::pow" not in src
    # Bias corrections (exp of t*log(beta)) are computed once, outside every loop nest.
    loops = parallel_loops(src)
    assert "std::exp" in src and all("std::exp" not in body for body in loops)
    # Two loop nests: the 2048 blocks (new moments), then the parameter's own [64, 128] range.
    assert len(loops) == 2, src
    headers = re.findall(
        r"for\(int64_t (x\d)=\S+; x\d<static_cast<int64_t>\((\d+)L\); "
        r"x\d\+=static_cast<int64_t>\((\d+)L\)",
        src,
    )
    assert [(v, int(size)) for v, size, _ in headers] == [("x0", 2048), ("x0", rows), ("x1", n)]
    if vectorised_cpu():
        assert int(headers[2][2]) > 1, "the element loop is not vectorised"
        element = loops[1]
        assert "::loadu" in element and "blendv" in element
    # p and the moments are written in place: nothing is allocated per call but 0-d scalars.
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
# 3-d, level 0 (plain torch) and levels 1..3 through foam::folded_update_'s lowering (Adam's
# coupled decay reads a copy of the old p), bf16 parameters with float32 state (16 lanes).
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


def test_symbolic_shapes_fall_back_to_the_op(fresh_dynamo):
    """With dynamic shapes the lowering cannot unroll blocks over a symbolic row length: Inductor
    then calls the op itself (its eager code), and the step is still exact."""
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
    assert "torch.ops.foam.folded_update_" in "\n".join(codes)  # called, not lowered
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt_c.state[compiled][k], opt_e.state[eager][k], rtol=0, atol=0)
