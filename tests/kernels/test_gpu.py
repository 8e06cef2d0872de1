"""GPU-only checks of the Triton path (skipped without CUDA; ``scripts/gpu_check.sh`` runs them).

The CPU suite proves the kernels under Triton's interpreter and compiles them for sm_80/sm_90
ahead of time; these tests need the device: the compiled kernels against the float64 model on
real-size ragged and even tensors, the optimizer under Inductor (the ``triton_op`` and the
grouped custom op), CUDA graphs (``torch.cuda.graph`` around the launcher, and
``torch.compile(mode="reduce-overhead")`` around a FOAM step), no allocation and no
host-to-device copy in steady state (counted by the allocator and the profiler), tuning kept on
disk, and FSDP2 on one device.
"""

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from foam_compile import FOAM  # noqa: E402
from tests.float64_model import (  # noqa: E402
    Hyper,
    ParamModel,
    assert_param_matches,
    assert_state_matches,
)

DEV = "cuda"


def _kernels():
    from foam_compile.kernels import foam_adam

    return foam_adam


def _group(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(DEV, dtype) for s, _ in shapes]
    levels = [lv for _, lv in shapes]

    def folded(s, lv):
        lv = lv if len(s) >= 2 else 0
        return (*s[:-1], -(-s[-1] // (1 << lv))) if lv else s

    ms = [torch.zeros(folded(s, lv), device=DEV) for s, lv in shapes]
    vs = [torch.zeros(folded(s, lv), device=DEV) for s, lv in shapes]
    steps = [torch.zeros((), device=DEV) for _ in shapes]
    return params, ms, vs, steps, levels


# --------------------------------------------------------------------- kernel vs model
@pytest.mark.parametrize("grouped", [False, True], ids=["single", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_ragged_and_even_against_the_model(grouped, dtype):
    """LLaMA-1B-like rows (5461: ragged at level 2), several tiles and segments per row."""
    fa = _kernels()
    hp = Hyper(amsgrad=True, scale=0.25, res_scale=0.8, weight_decay=0.01)
    shapes = [((512, 5461), 2), ((256, 2048), 2), ((300, 1030), 5), ((4097,), 2)]
    params, ms, vs, steps, levels = _group(shapes, dtype)
    vmaxs = [v.clone() for v in vs]
    models = [ParamModel.create(p.cpu(), lv) for p, lv in zip(params, levels)]
    gen = torch.Generator(device="cpu").manual_seed(1)
    kw = dict(
        beta1=hp.betas[0],
        beta2=hp.betas[1],
        eps=hp.eps,
        weight_decay=hp.weight_decay,
        amsgrad=True,
        scale=hp.scale,
        res_scale=hp.res_scale,
    )
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(DEV, dtype) for p in params]
        torch._foreach_add_(steps, 1)
        if grouped:
            fa.foam_adam_grouped_(params, grads, ms, vs, vmaxs, steps, levels, lr=hp.lr, **kw)
        else:
            for i, p in enumerate(params):
                fa.foam_adam_step_(
                    p,
                    grads[i],
                    ms[i],
                    vs[i],
                    vmaxs[i],
                    lr=hp.lr,
                    step=steps[i],
                    level=levels[i],
                    **kw,
                )
        for model, g in zip(models, grads):
            model.step(g.cpu(), hp)
    for i, model in enumerate(models):
        assert_param_matches(params[i].cpu(), model)
        state = dict(exp_avg=ms[i].cpu(), exp_avg_sq=vs[i].cpu(), max_exp_avg_sq=vmaxs[i].cpu())
        assert_state_matches(dict(state, step=steps[i].item()), model, amsgrad=True)


# --------------------------------------------------------------------------- steady state
def test_steady_state_allocates_and_copies_nothing():
    """The grouped launcher after its first step: no allocation (the caching allocator's
    counters) and no host-to-device copy (the profiler's memcpy records)."""
    fa = _kernels()
    params, ms, vs, steps, levels = _group([((256, 5461), 2), ((512, 512), 2), ((777,), 0)])
    grads = [torch.randn_like(p) for p in params]
    lr = torch.tensor(1e-3, device=DEV)

    def step():
        torch._foreach_add_(steps, 1)
        fa.foam_adam_grouped_(params, grads, ms, vs, None, steps, levels, lr=lr)

    for _ in range(3):  # plans, tables, tuning, compilation
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    names = [e.name for e in prof.events()]
    assert not [n for n in names if "HtoD" in n or "Memcpy" in n], names
    assert sum("_foam_adam_multi_kernel" in n for n in names) == 3 * 3  # 3 groups x 3 steps


def test_launcher_in_a_cuda_graph():
    """Capture the grouped step once, replay it with new gradients copied into the captured
    buffers: the same result as eager steps (device step counters read in the kernel)."""
    fa = _kernels()
    shapes = [((128, 5461), 2), ((64, 512), 3), ((100,), 0)]
    p_e, m_e, v_e, s_e, levels = _group(shapes, seed=3)
    p_g, m_g, v_g, s_g, _ = _group(shapes, seed=3)
    g_static = [torch.zeros_like(p) for p in p_g]
    lr = torch.tensor(1e-2, device=DEV)

    def graph_step():
        torch._foreach_add_(s_g, 1)
        fa.foam_adam_grouped_(p_g, g_static, m_g, v_g, None, s_g, levels, lr=lr)

    warm = [p.clone() for p in p_g], [m.clone() for m in m_g], [v.clone() for v in v_g]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph_step()  # the eager step that builds the tables
    torch.cuda.current_stream().wait_stream(stream)
    for dst, src in zip((p_g, m_g, v_g), warm):  # undo the warm-up step
        for d, s in zip(dst, src):
            d.copy_(s)
    torch._foreach_sub_(s_g, 1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_step()
    gen = torch.Generator(device="cpu").manual_seed(9)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen).to(DEV) for p in p_e]
        for g, gs in zip(grads, g_static):
            gs.copy_(g)
        graph.replay()
        torch._foreach_add_(s_e, 1)
        fa.foam_adam_grouped_(p_e, grads, m_e, v_e, None, s_e, levels, lr=lr)
    torch.cuda.synchronize()
    for a, b in zip(p_e + m_e + v_e + s_e, p_g + m_g + v_g + s_g):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(96, 200), torch.nn.GELU(), torch.nn.Linear(200, 90), torch.nn.LayerNorm(90)
    ).to(DEV)


def _train(model, opt, step_fn, n=5, seed=1):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(n):
        x = torch.randn(32, 96, generator=gen).to(DEV)
        model.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        step_fn()


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_foam_step_matches_eager(mode):
    """``torch.compile(opt.step)`` (Inductor; with ``reduce-overhead``, CUDA graphs) against
    eager FOAM: equal parameters, and for ``reduce-overhead`` no cudagraph skip."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_model, model = _model(), _model()
    kw = dict(lr=torch.tensor(1e-2, device=DEV), level=2, scale=0.5, capturable=True)
    eager = FOAM(eager_model.parameters(), **kw)
    opt = FOAM(model.parameters(), **kw)
    compiled = torch.compile(opt.step, mode=mode)
    _train(eager_model, eager, eager.step)
    _train(model, opt, compiled)
    for a, b in zip(eager_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if mode == "reduce-overhead":
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    torch._dynamo.reset()


def test_the_triton_op_under_inductor():
    """``foam::adam_step_`` (the per-tensor ``triton_op``) compiled by Inductor, ragged and even,
    against the eager op."""
    torch._dynamo.reset()
    fa = _kernels()  # noqa: F841 - registers nothing, but imports triton before compiling
    from foam_compile.backends import triton_cuda  # noqa: F401

    shapes = [((256, 5461), 2), ((128, 1024), 3)]
    a = _group(shapes, seed=5)
    b = _group(shapes, seed=5)

    def step(params, ms, vs, steps, grads):
        for i, p in enumerate(params):
            steps[i].add_(1)
            torch.ops.foam.adam_step_(
                p,
                grads[i],
                ms[i],
                vs[i],
                None,
                0.0,
                steps[i],
                shapes[i][1],
                lr=1e-2,
                lr_tensor=None,
                beta1=0.9,
                beta2=0.999,
                eps=1e-8,
                weight_decay=0.01,
                decoupled_weight_decay=True,
                amsgrad=False,
                maximize=False,
                scale=0.5,
                res_scale=1.0,
            )

    compiled = torch.compile(step, fullgraph=True)
    gen = torch.Generator(device="cpu").manual_seed(2)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(DEV) for p in a[0]]
        step(a[0], a[1], a[2], a[3], grads)
        compiled(b[0], b[1], b[2], b[3], grads)
    for x, y in zip(a[0] + a[1] + a[2], b[0] + b[1] + b[2]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


_TUNE_ONCE = """
import torch
from foam_compile.kernels import foam_adam as fa
if NO_TUNING:
    def refuse(*args):
        raise RuntimeError("tuned again")
    fa._tune_multi = refuse
p = [torch.randn(64, 4096, device="cuda")]
m = [torch.zeros(64, 1024, device="cuda")]
v = [torch.zeros_like(m[0])]
steps = [torch.ones((), device="cuda")]
fa.foam_adam_grouped_(p, [torch.randn_like(p[0])], m, v, None, steps, [2], lr=1e-3)
print("TUNED", len(fa._MULTI_TUNED))
"""


def test_tuning_is_kept_on_disk(tmp_path):
    """A second process reads the first one's choice from the disk cache instead of timing."""
    import subprocess
    import sys

    env = dict(os.environ, FOAM_TUNE_CACHE=str(tmp_path / "tune.json"), FOAM_TRITON_AUTOTUNE="1")
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    for no_tuning in ("False", "True"):
        code = _TUNE_ONCE.replace("NO_TUNING", no_tuning)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert "TUNED 1" in out.stdout, out.stderr[-3000:]
        assert (tmp_path / "tune.json").exists()


# --------------------------------------------------------------------------------- FSDP2
def test_fsdp2_on_one_device(tmp_path):
    """FOAM on FSDP2 DTensor parameters (one rank, NCCL): the same steps as plain FOAM."""
    import torch.distributed as dist

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # pragma: no cover
        pytest.skip("torch.distributed.fsdp.fully_shard is not available")
    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        plain, sharded = _model(7), _model(7)
        for layer in sharded:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(sharded)
        kw = dict(lr=1e-2, level=2, scale=0.5)
        opt_plain = FOAM(plain.parameters(), **kw)
        opt_sharded = FOAM(sharded.parameters(), **kw)
        _train(plain, opt_plain, opt_plain.step)
        _train(sharded, opt_sharded, opt_sharded.step)
        for a, b in zip(plain.parameters(), sharded.parameters()):
            torch.testing.assert_close(a, b.full_tensor(), rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
