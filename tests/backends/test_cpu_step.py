"""The CPU step backend (``foam::cpu_step_``): registry, op contract, compiled training, cache.

The kernel's arithmetic is tested in ``tests/kernels/test_cpu_kernel.py``; here: that FOAM
dispatches CPU parameters to it, that the op's fake and declared mutations are what Inductor
and AOTAutograd need (``opcheck``, ``aot_eager`` with ``fullgraph``), that a compiled training
step calls it as an extern kernel without recompiling or copying, and that the build cache
compiles once per source.
"""

import importlib.util
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from foam_compile import FOAM, backends
from foam_compile.backends import cpu as cpu_backend
from foam_compile.hyper import Hyper
from foam_compile.kernels.cpu import build as kernel_build
from foam_compile.reference import folded_shape, reference_step
from foam_compile.state import StateFormat, get_format


def generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def op_args(shapes_levels, dtype=torch.float32, amsgrad=True, gen=None):
    """Arguments of ``foam::cpu_step_`` for parameters of these (shape, level)s."""
    gen = gen or generator("op", dtype)
    params, grads, ms, vs, vmaxs, steps, levels = [], [], [], [], [], [], []
    for shape, level in shapes_levels:
        level = level if len(shape) >= 2 else 0
        fshape = (*shape[:-1], -(-shape[-1] // (1 << level))) if level else shape
        params.append(torch.randn(shape, generator=gen).to(dtype))
        grads.append(torch.randn(shape, generator=gen).to(dtype))
        ms.append(torch.randn(fshape, generator=gen) * 1e-2)
        vs.append(torch.rand(fshape, generator=gen) * 1e-3)
        vmaxs.append(vs[-1] + 1e-4)
        steps.append(torch.tensor(2.0))
        levels.append(level)
    args = (params, grads, ms, vs, vmaxs if amsgrad else [], steps, levels, [], [], [], [], [], [])
    return args, scalars(torch.tensor(1e-2), amsgrad)


def scalars(lr_tensor, amsgrad, lr=0.0, weight_decay=0.1):
    """The op's keyword arguments (hyper.OP_SCHEMA_KWARGS)."""
    return dict(lr=lr, lr_tensor=lr_tensor, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=weight_decay, decoupled_weight_decay=True, amsgrad=amsgrad,
                maximize=True, scale=0.25, res_scale=2.0)  # fmt: skip


def clone_args(args):
    args, kwargs = args
    return tuple([t.clone() for t in a] if isinstance(a, list) and a and isinstance(a[0],
                 torch.Tensor) else a for a in args), kwargs  # fmt: skip


SHAPES = [((6, 37), 2), ((5, 3, 20), 3), ((33,), 2), ((4, 9), 0), ((2, 700), 7)]


def test_cpu_parameters_take_the_kernel():
    p = torch.zeros(4, 8)
    hp = Hyper(lr=1e-3)
    assert backends.select(p, p, 2, get_format("fp32"), hp) is cpu_backend
    assert backends.registered()[-1] == "torch"
    assert "inductor-cpu" not in backends.registered()


def test_supports_says_why_not():
    class Int8(StateFormat):
        name = "int8"

    hp = Hyper(lr=1e-3)
    p = torch.zeros(4, 8)
    assert "state_format='int8'" in cpu_backend.supports(p, p, 2, Int8(), hp)  # not grouped
    assert cpu_backend.supports(p, p, 2, get_format("int4-sr"), hp) is None
    assert "float64" in cpu_backend.supports(p.double(), p.double(), 2, get_format("int8"), hp)
    assert "contiguous" in cpu_backend.supports(p.t(), p.t(), 2, get_format("fp32"), hp)
    assert "int32" in cpu_backend.supports(p.int(), p.int(), 2, get_format("fp32"), hp)
    assert cpu_backend.supports(p.double(), p.double(), 2, get_format("fp32"), hp) is None


def test_opcheck():
    """Schema (mutations declared exactly), fake tensor, AOT dispatch: torch's own op checks."""
    assert [a.name for a in torch.ops.foam.cpu_step_.default._schema.arguments if a.is_write] == [
        "params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "exp_avg_scales",
        "exp_avg_sq_scales", "max_exp_avg_sq_scales", "corrections"
    ]  # fmt: skip
    args, kwargs = op_args(SHAPES[:3])
    torch.library.opcheck(
        torch.ops.foam.cpu_step_.default,
        args,
        kwargs,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


def test_op_under_aot_eager_fullgraph_mutates_its_inputs():
    eager, compiled = op_args(SHAPES), None
    compiled = clone_args(eager)
    torch.ops.foam.cpu_step_(*eager[0], **eager[1])

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(*args, **kwargs):
        torch.ops.foam.cpu_step_(*args, **kwargs)

    step(*compiled[0], **compiled[1])
    for a, b in zip(eager[0][:5], compiled[0][:5]):  # params, grads, moments: bitwise the same
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_a_moment_the_kernel_cannot_read_takes_plain_torch_inside_the_op():
    """A non-contiguous moment (e.g. loaded oddly): the op steps that parameter with the plain
    update, the others with the kernel, all against the reference."""
    gen = generator("fallback")
    p = [torch.randn(4, 12, generator=gen), torch.randn(3, 8, generator=gen)]
    g = [torch.randn_like(x) for x in p]
    m = [torch.zeros(4, 3), torch.zeros(2, 3).t()]  # the second: [3, 2], not contiguous
    v = [torch.zeros(4, 3), torch.zeros(3, 2)]
    ref_p = [x.clone() for x in p]
    steps = [torch.tensor(0.0), torch.tensor(0.0)]  # the op increments them
    torch.ops.foam.cpu_step_(p, g, m, v, [], steps, [2, 2], [], [], [], [], [], [], lr=1e-2,
                             lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                             decoupled_weight_decay=True, amsgrad=False, maximize=False,
                             scale=1.0, res_scale=1.0)  # fmt: skip
    u = torch.finfo(torch.float32).eps
    for i in range(2):
        st = {}
        reference_step(ref_p[i], g[i], st, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                       weight_decay=0.0, level=2)  # fmt: skip
        torch.testing.assert_close(p[i], ref_p[i], rtol=0, atol=16 * u)
        torch.testing.assert_close(m[i], st["exp_avg"], rtol=0, atol=16 * u)
        assert float(steps[i]) == 1.0


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(24, 37)
        self.norm = torch.nn.LayerNorm(37)
        self.b = torch.nn.Linear(37, 5)

    def forward(self, x):
        return self.b(torch.relu(self.norm(self.a(x))))


def make(model):
    folded = [model.a.weight, model.b.weight]
    rest = [p for p in model.parameters() if all(p is not q for q in folded)]
    opt = FOAM(
        [{"params": folded, "level": 2, "scale": 0.5}, {"params": rest, "level": 0}],
        lr=torch.tensor(1e-2),
        weight_decay=0.01,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return opt, sched


def test_compiled_training_step_calls_the_op_without_recompiles(fresh_dynamo):
    torch.manual_seed(0)
    eager_model = Tiny()
    compiled_model = Tiny()
    compiled_model.load_state_dict(eager_model.state_dict())
    eager_opt, eager_sched = make(eager_model)
    opt, sched = make(compiled_model)
    step = torch.compile(opt.step)
    data = torch.randn(6, 8, 24, generator=generator("data"))
    codes = []
    for i, x in enumerate(data):
        for model in (eager_model, compiled_model):
            model.zero_grad()
            model(x).square().mean().backward()
        eager_opt.step()
        if i == 0:
            step()  # first step: state creation, then the compile below
        elif i == 1:
            torch._dynamo.config.error_on_recompile = False
            _, codes = run_and_get_code(step)
            torch._dynamo.config.error_on_recompile = True  # the lr changes; steps count up
        else:
            step()
        eager_sched.step()
        sched.step()
    for a, b in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same kernel on the same inputs
    for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[p][key], eager_opt.state[q][key], rtol=0, atol=0)
    code = "\n".join(codes)
    call = code.split("def call")[1]
    assert call.count("torch.ops.foam.cpu_step_.default(") == 2  # one per param group
    assert "empty_strided" not in call  # nothing allocated: the op writes its inputs in place
    assert ".clone()" not in call and "copy_" not in call
    assert "cpp_fused" not in code  # no Inductor kernel at all: the op increments the steps too


# ------------------------------------------------------------------------------ the cache
TINY = 'extern "C" __attribute__((visibility("default"))) int foam_cpu_abi(void) { return %d; }\n'


def test_the_cache_builds_once_per_source(tmp_path):
    path, built = kernel_build.build(TINY % 1, cache_dir=tmp_path)
    assert built and path.exists()
    again, built_again = kernel_build.build(TINY % 1, cache_dir=tmp_path)
    assert again == path and not built_again
    other, built_other = kernel_build.build(TINY % 2, cache_dir=tmp_path)
    assert built_other and other != path


def test_concurrent_builds_do_not_race(tmp_path):
    """Two processes build the same source at once: one compiles, the other waits and loads."""
    spec = importlib.util.find_spec("foam_compile.kernels.cpu.build")
    script = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("build", {spec.origin!r})
        build = importlib.util.module_from_spec(spec); spec.loader.exec_module(build)
        path, built = build.build({TINY % 3!r}, cache_dir={str(tmp_path)!r})
        import ctypes; assert ctypes.CDLL(str(path)).foam_cpu_abi() == 3
        print(int(built))
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert sorted(outs) == ["0", "1"]


def test_the_kernel_library_is_cached_across_processes():
    """The library this process loaded is found again without compiling."""
    _, built = kernel_build.build()
    assert not built


@pytest.mark.parametrize("bad", ["int foam_cpu_abi( {"])
def test_a_failed_build_says_what_the_compiler_said(tmp_path, bad):
    with pytest.raises(RuntimeError, match="building the CPU step kernel failed"):
        kernel_build.build(bad, cache_dir=tmp_path)


def test_opcheck_grouped_moments_and_corrections():
    """The op's schema with int8/int4-sr moments (codes and scales written) and bfloat16
    weights with int16 corrections (written): torch's op checks."""
    from foam_compile import master_weights

    gen = generator("op-grouped")
    params, grads, ms, vs, vmaxs, steps, scales, rhos = [], [], [], [], [], [], [[], [], []], []
    formats = ["int8", "int4-sr"]
    for (shape, level), fmt in zip([((6, 37), 2), ((5, 3, 70), 0)], formats):
        p = torch.randn(shape, generator=gen).to(torch.bfloat16)
        params.append(p)
        grads.append(torch.randn(shape, generator=gen).to(torch.bfloat16))
        f = get_format(fmt)
        st = {}
        for (key, kind), out in zip(
            [("exp_avg", "signed"), ("exp_avg_sq", "square"), ("max_exp_avg_sq", "square")],
            (ms, vs, vmaxs),
        ):
            value = torch.rand(folded_shape(shape, level), generator=gen)
            st.update(f.encode(value if kind == "square" else value - 0.5, p, key, kind))
            out.append(st[key])
        for i, key in enumerate(("exp_avg", "exp_avg_sq", "max_exp_avg_sq")):
            scales[i].append(st[f"{key}_scale"])
        steps.append(torch.tensor(2.0))
        rho = torch.randint(-9, 9, shape, generator=gen)
        rhos.append(rho.to(master_weights.OPTIONS["int16"][0]))
    args = (params, grads, ms, vs, vmaxs, steps, [2, 0], formats, *scales, [True, True], rhos)
    torch.library.opcheck(
        torch.ops.foam.cpu_step_.default,
        args,
        scalars(torch.tensor(1e-2), True),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )
