"""FOAM under FSDP2 and DDP on 2 CPU processes (gloo), and checkpoints that reshard 2 -> 1, 1 -> 2.

Starting processes and importing torch costs more than every check here, so ONE launch of two
worker processes runs all the distributed scenarios (``SCENARIOS``, in order). Each scenario
records its result, or its error on both ranks, to a file; the tests below compare those with
single-process FOAM run in the pytest process. The model has the awkward shapes on purpose: a
last dim that 4 does not divide (partial blocks), rows that 2 ranks split unevenly (7 = 4 + 3,
which FSDP2 pads), and a one-row weight and bias that leave rank 1 an empty shard.

``FOAM_TEST_FSDP_INDUCTOR=1`` adds the slow checks of the foam backend with Inductor under FSDP2
(their own launch, 2-3 minutes on 2 cores: Inductor compiles on both ranks).
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import foam_compile
from foam_compile import FOAM
from foam_compile.distributed import local

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

WORLD = 2
STEPS = 5
CKPT_STEP = 2  # checkpoints are taken after this many steps, then training continues to STEPS
TOL = 1e-5  # the contract: distributed FOAM equals single-process FOAM within 1e-5
LAUNCH_TIMEOUT_S = 240
FOAM_OPTIONS = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, amsgrad=True, scale=0.5)
ADAMW_OPTIONS = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)

# FOAM's DTensor support needs calls into foam_compile.distributed from optimizer.py,
# functional.py and convert.py (see that module's docstring). Until they are wired these tests
# fail; delete this marker from them when the wiring lands (they then XPASS, strict).
NEEDS_WIRING = pytest.mark.xfail(
    strict=True,
    reason="needs foam_compile.distributed wired into FOAM._new_state/load_state_dict/"
    "set_levels, foam_adam_ and convert (see foam_compile/distributed.py)",
)


# --------------------------------------------------------------------------- model and data
def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    # weight [16, 10]: blocks 4 + 4 + 2 (a partial last block)
    # weight [24, 16]: the one the "shard1" layout shards on its last dim
    # weight [7, 24], bias [7]: uneven rows, 4 + 3
    # weight [1, 7], bias [1]: rank 1's shard is empty
    return nn.Sequential(
        nn.Linear(10, 16),
        nn.Tanh(),
        nn.Linear(16, 24),
        nn.Tanh(),
        nn.Linear(24, 7),
        nn.Tanh(),
        nn.Linear(7, 1),
    )


def make_small_model() -> nn.Sequential:
    """For the compiled step, whose tracing cost grows with the parameter count: a [7, 10] weight
    (uneven rows, a partial block) and a [7] bias."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 7))


def foam_groups(model: nn.Module) -> list[dict]:
    """Two levels: the [24, 16] weight folds in blocks of 8, everything else in blocks of 4."""
    deep = model[2].weight
    return [
        {"params": [p for p in model.parameters() if p is not deep]},
        {"params": [deep], "level": 3},
    ]


def make_foam(model: nn.Module) -> FOAM:
    return FOAM(foam_groups(model), level=2, **FOAM_OPTIONS)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 10, generator=g), torch.randn(8, 1, generator=g)) for _ in range(STEPS)]


def train(model, step_fn, steps: range, rank: int = 0, world: int = 1) -> None:
    """Each rank takes its equal slice of the global batch; the mean of the ranks' mean losses
    (FSDP2's and DDP's gradient average) is the single process's mean loss."""
    data = batches()
    for i in steps:
        x, y = data[i]
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        out = model(x[rows]).sum(-1, keepdim=True)  # a no-op for make_model()'s one output
        nn.functional.mse_loss(out, y[rows]).backward()
        step_fn()
        for p in model.parameters():
            p.grad = None


def single_process(make_opt, steps: range = range(STEPS), model=None, opt=None):
    model = model if model is not None else make_model()
    opt = opt if opt is not None else make_opt(model)
    train(model, opt.step, steps)
    return model, opt


# ------------------------------------------------------------------- worker (2 processes)
def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _record(out: Path, name: str, rank: int, model: nn.Module, opt, **extra) -> None:
    """Gather the full parameters and moments (a collective) and let rank 0 write them."""
    params = [_full(p) for p in model.parameters()]
    state, placements, local_bytes = [], [], 0
    for p in model.parameters():
        st = opt.state.get(p, {})
        state.append({k: _full(v) for k, v in st.items() if torch.is_tensor(v) and k != "step"})
        state[-1].update({k: v for k, v in st.items() if not torch.is_tensor(v)})
        state[-1]["step"] = float(st["step"]) if "step" in st else None
        placements.append(
            {k: str(getattr(v, "placements", "plain")) for k, v in st.items() if torch.is_tensor(v)}
        )
        placements[-1]["param"] = str(getattr(p, "placements", "plain"))
        local_bytes += sum(
            local(v).nbytes
            for k, v in st.items()
            if k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        )
    all_bytes = [None] * WORLD
    dist.all_gather_object(all_bytes, local_bytes)
    if rank == 0:
        torch.save(
            dict(
                params=params,
                state=state,
                placements=placements,
                local_state_bytes=all_bytes,
                opt_class=type(opt).__name__,
                **extra,
            ),
            out / f"{name}.pt",
        )


def _fsdp(model: nn.Module, shard_dim1: nn.Parameter | None = None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    def placement(p):
        return Shard(1) if p is shard_dim1 else None  # None: FSDP2's default Shard(0)

    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, shard_placement_fn=placement)
    return fully_shard(model, shard_placement_fn=placement)


def _state_dicts(model, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def _save(model, opt, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(_state_dicts(model, opt), checkpoint_id=str(path))


def _load(model, opt, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    sd = _state_dicts(model, opt)  # initialises FOAM's state (one lr=0 step), in folded shapes
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def scenario_fsdp(out, rank):
    """FSDP2 (dim-0 shards) + FOAM; a 2-rank checkpoint after CKPT_STEP steps, then on to STEPS."""
    model = _fsdp(make_model())
    opt = make_foam(model)
    train(model, opt.step, range(CKPT_STEP), rank, WORLD)
    _save(model, opt, out / "ckpt_2ranks")
    train(model, opt.step, range(CKPT_STEP, STEPS), rank, WORLD)
    _record(out, "fsdp", rank, model, opt)


def scenario_fsdp_shard1(out, rank):
    """FSDP2 sharding the [24, 16] weight on its last dim: 2 shards of 8 = whole blocks of 8."""
    model = make_model()
    model = _fsdp(model, shard_dim1=model[2].weight)
    opt = make_foam(model)
    train(model, opt.step, range(STEPS), rank, WORLD)
    _record(out, "fsdp_shard1", rank, model, opt)


def scenario_refuse_misaligned(out, rank):
    """The [16, 10] weight sharded on dim 1: shards of 5 columns would split blocks of 4."""
    model = make_model()
    model = _fsdp(model, shard_dim1=model[0].weight)
    opt = make_foam(model)
    try:
        train(model, opt.step, range(1), rank, WORLD)
    except ValueError as e:
        error = str(e)
    else:
        error = None
    # State that is not sharded like its parameter (here: a gathered full moment) is refused
    # before any local view pairs rows of different shards.
    model = _fsdp(make_model())
    opt = make_foam(model)
    train(model, opt.step, range(1), rank, WORLD)
    first = next(iter(model.parameters()))
    opt.state[first]["exp_avg"] = opt.state[first]["exp_avg"].full_tensor()
    try:
        train(model, opt.step, range(1, 2), rank, WORLD)
    except RuntimeError as e:
        state_error = str(e)
    else:
        state_error = None
    dist.barrier()
    if rank == 0:
        torch.save({"error": error, "state_error": state_error}, out / "refuse_misaligned.pt")


def scenario_ddp(out, rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model())
    opt = make_foam(model.module)
    train(model, opt.step, range(STEPS), rank, WORLD)
    _record(out, "ddp", rank, model.module, opt)


def scenario_load_1to2(out, rank):
    """Resume the single-process checkpoint (taken after CKPT_STEP steps) on 2 FSDP2 ranks."""
    model = _fsdp(make_model())
    opt = make_foam(model)
    _load(model, opt, out / "ckpt_1rank")
    train(model, opt.step, range(CKPT_STEP, STEPS), rank, WORLD)
    _record(out, "load_1to2", rank, model, opt)


def scenario_load_full(out, rank):
    """Full (unsharded) single-process state dicts, taken after CKPT_STEP steps, loaded into
    FSDP2 FOAM: each rank keeps its shard of the full folded moments. Two ways: the optimizer's
    own ``load_state_dict`` of a ``torch.save``d ``opt.state_dict()``, and
    ``set_optimizer_state_dict(full_state_dict=True)`` of ``get_optimizer_state_dict``'s."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    for name in ("load_full", "load_full_fqn"):
        # Loaded afresh each time: set_model_state_dict may leave the model's shards sharing
        # storage with the given full tensors, which training then changes.
        saved = torch.load(out / "single.pt", weights_only=False)
        model = _fsdp(make_model())
        set_model_state_dict(model, saved["model"], options=full)
        opt = make_foam(model)
        if name == "load_full":
            opt.load_state_dict(saved["optim"])
        else:
            set_optimizer_state_dict(model, opt, saved["optim_fqn"], options=full)
        train(model, opt.step, range(CKPT_STEP, STEPS), rank, WORLD)
        _record(out, name, rank, model, opt)


def scenario_convert(out, rank):
    """A stock AdamW under FSDP2 steps twice, ``convert`` folds its sharded moments, 3 more."""
    model = _fsdp(make_model())
    opt = torch.optim.AdamW(model.parameters(), **ADAMW_OPTIONS)
    train(model, opt.step, range(CKPT_STEP), rank, WORLD)
    foam_compile.convert(opt, level=2)
    train(model, opt.step, range(CKPT_STEP, STEPS), rank, WORLD)
    _record(out, "convert", rank, model, opt)


def relevel_and_export(model, opt, step_fn, rank=0, world=1):
    """Two steps, refold two weights (deeper and shallower, one of them with last-dim shards in
    the "shard1" layout), three more steps, then export a stock AdamW state dict."""
    train(model, step_fn, range(CKPT_STEP), rank, world)
    opt.set_levels({model[0].weight: 3, model[2].weight: 1})
    train(model, step_fn, range(CKPT_STEP, STEPS), rank, world)
    exported = foam_compile.export_adamw_state_dict(opt)["state"]
    return [
        {k: _full(v) for k, v in st.items() if k != "step"} for _, st in sorted(exported.items())
    ]


def scenario_levels_export(out, rank):
    """``set_levels`` and ``export_adamw_state_dict`` on sharded moments."""
    model = make_model()
    model = _fsdp(model, shard_dim1=model[2].weight)
    opt = make_foam(model)
    exported = relevel_and_export(model, opt, opt.step, rank, WORLD)
    _record(out, "levels_export", rank, model, opt, exported=exported)


def _graph_as_is(gm, example_inputs):
    return gm.forward


def _compiled_run(out, rank, name, make, backend):
    """A stock AdamW under FSDP2 whose step is compiled with ``backend``: the foam backend
    rewrites the traced AdamW update into FOAM's and converts the optimizer."""
    model = _fsdp(make())
    opt = torch.optim.AdamW(model.parameters(), **ADAMW_OPTIONS)

    @torch.compile(backend=backend)
    def step():
        opt.step()

    torch._dynamo.reset()
    train(model, step, range(STEPS), rank, WORLD)
    _record(out, name, rank, model, opt)


def scenario_compiled(out, rank):
    """The rewritten graph runs as captured: the rewrite and conversion under FSDP2 without
    Inductor's compile time (the FOAM_TEST_FSDP_INDUCTOR tests add Inductor)."""
    backend = foam_compile.backend(inner=_graph_as_is)
    _compiled_run(out, rank, "compiled", make_small_model, backend)


# foam_compile.backend() is what backend="foam" looks up (through the package's entry point)
def scenario_inductor_one_layer(out, rank):
    _compiled_run(out, rank, "inductor_one_layer", make_small_model, foam_compile.backend())


def scenario_inductor_mlp(out, rank):
    _compiled_run(out, rank, "inductor_mlp", make_model, foam_compile.backend())


SCENARIOS = [
    "fsdp",
    "fsdp_shard1",
    "refuse_misaligned",
    "ddp",
    "load_1to2",
    "load_full",
    "convert",
    "levels_export",
    "compiled",
]


def _worker(rank: int, port: int, out: str, names: list[str], module: str = __name__) -> None:
    """Run ``scenario_<name>(out, rank)`` of ``module`` (this one by default) for each name."""
    import importlib

    scenarios = importlib.import_module(module)
    out = Path(out)
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=90),
    )
    try:
        for name in names:
            scenario = getattr(scenarios, f"scenario_{name}")
            start = time.perf_counter()
            try:
                scenario(out, rank)
            except Exception:  # recorded for the test that reads this scenario
                (out / f"{name}.rank{rank}.error").write_text(traceback.format_exc())
            (out / f"{name}.rank{rank}.seconds").write_text(f"{time.perf_counter() - start:.2f}")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    out: Path, names: list[str], timeout_s: float = LAUNCH_TIMEOUT_S, module: str = __name__
) -> None:
    """Run the scenarios ``names`` (functions ``scenario_<name>`` of ``module``) on 2 spawned
    processes; kill them (by pid) if they outlive the time limit."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _worker,
        args=(_free_port(), str(out), names, module),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers still running after {timeout_s}s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()


# --------------------------------------------------------------------------------- fixture
class Runs:
    def __init__(self, root: Path):
        self.root = root

    def __getitem__(self, name: str) -> dict:
        """The record ``name``, or the error of the scenario that should have written it."""
        errors = sorted(self.root.glob(f"{name}.rank*.error"))
        if not errors and not (self.root / f"{name}.pt").exists():
            errors = sorted(self.root.glob("*.rank*.error"))
        if errors:
            raise AssertionError(f"{errors[0].name}:\n" + errors[0].read_text())
        return torch.load(self.root / f"{name}.pt", weights_only=False)

    def seconds(self, name: str) -> float:
        return max(float(f.read_text()) for f in self.root.glob(f"{name}.rank*.seconds"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    root = tmp_path_factory.mktemp("foam_distributed")
    model, opt = single_process(make_foam, range(CKPT_STEP))
    _save(model, opt, root / "ckpt_1rank")  # no process group here: a 1-rank checkpoint
    full = StateDictOptions(full_state_dict=True)
    torch.save(
        {
            "model": model.state_dict(),
            "optim": opt.state_dict(),
            "optim_fqn": get_optimizer_state_dict(model, opt, options=full),
        },
        root / "single.pt",
    )
    start = time.perf_counter()
    launch(root, SCENARIOS)
    print(f"2-process launch: {time.perf_counter() - start:.1f}s")
    return Runs(root)


# ---------------------------------------------------------------------------------- checks
def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((x - y).abs().max().item() if x.numel() else 0.0 for x, y in zip(a, b))


def assert_matches(record: dict, model: nn.Module, opt, *, states: bool = True) -> float:
    """Parameters (and folded moments, steps, levels) equal the single-process run's."""
    diff = max_diff(record["params"], [p.detach() for p in model.parameters()])
    assert diff <= TOL, f"max |param diff| {diff:.3g} > {TOL}"
    if states:
        for got, p in zip(record["state"], model.parameters()):
            want = opt.state[p]
            assert got["foam_level"] == want["foam_level"]
            assert got["step"] == float(want["step"])
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in want:
                    assert got[key].shape == want[key].shape, key
                    torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-8)
    return diff


@pytest.fixture(scope="module")
def reference():
    """Single-process FOAM, the same groups, options and batches."""
    return single_process(make_foam)


def test_fsdp2_matches_single_process(runs, reference):
    record = runs["fsdp"]
    diff = assert_matches(record, *reference)
    print(f"FSDP2 vs single process: max |param diff| {diff:.3g}")
    # The moments are DTensors sharded like their parameters, in the folded shape.
    for pl in record["placements"]:
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert pl[key] == pl["param"] == "(Shard(dim=0),)", pl
    # Each rank stores about half the folded state (rows split 8/8, 12/12, 4/3, 1/0).
    model, opt = reference
    total = sum(
        v.nbytes
        for st in opt.state.values()
        for k, v in st.items()
        if k.endswith(("avg", "avg_sq"))
    )
    assert sum(record["local_state_bytes"]) == total
    assert max(record["local_state_bytes"]) < 0.6 * total


def test_fsdp2_last_dim_shards_on_block_boundaries(runs, reference):
    record = runs["fsdp_shard1"]
    diff = assert_matches(record, *reference)
    print(f"FSDP2 Shard(1) vs single process: max |param diff| {diff:.3g}")
    assert record["placements"][2]["exp_avg"] == "(Shard(dim=1),)"
    assert record["state"][2]["exp_avg"].shape == (24, 2)  # 16 columns, blocks of 8


def test_fsdp2_refuses_blocks_across_ranks(runs):
    record = runs["refuse_misaligned"]
    error = record["error"]
    assert error is not None, "a block split across ranks was not refused"
    assert "'0.weight'" in error and "Shard(0)" in error and "multiples of 5" in error, error
    assert "sharded like its parameter" in (record["state_error"] or ""), record["state_error"]


def test_ddp_matches_single_process(runs, reference):
    diff = assert_matches(runs["ddp"], *reference)
    print(f"DDP vs single process: max |param diff| {diff:.3g}")


def test_checkpoint_2_ranks_to_1(runs, reference):
    """The 2-rank FSDP2 checkpoint resumed in one plain process continues identically."""
    record = runs["fsdp"]  # the scenario that wrote the checkpoint ran
    model = make_model()
    opt = make_foam(model)
    _load(model, opt, runs.root / "ckpt_2ranks")
    assert all(float(st["step"]) == CKPT_STEP for st in opt.state.values())
    train(model, opt.step, range(CKPT_STEP, STEPS))
    diff = assert_matches(record, model, opt)  # == the 2-rank run that went on without stopping
    assert (
        max_diff(
            [p.detach() for p in model.parameters()],
            [p.detach() for p in reference[0].parameters()],
        )
        <= TOL
    )
    print(f"checkpoint 2 -> 1: max |param diff| {diff:.3g}")


def test_checkpoint_1_rank_to_2(runs, reference):
    diff = assert_matches(runs["load_1to2"], *reference)
    print(f"checkpoint 1 -> 2: max |param diff| {diff:.3g}")


@pytest.mark.parametrize("how", ["load_full", "load_full_fqn"])
def test_full_state_dict_into_fsdp2(runs, reference, how):
    """A single-process FOAM state dict loaded on 2 FSDP2 ranks (see scenario_load_full)."""
    record = runs[how]
    diff = assert_matches(record, *reference)
    assert record["placements"][0]["exp_avg"] == "(Shard(dim=0),)"
    print(f"full state dict ({how}) -> 2 ranks: max |param diff| {diff:.3g}")


def test_set_levels_and_export_under_fsdp2(runs):
    record = runs["levels_export"]
    model = make_model()
    opt = make_foam(model)
    exported = relevel_and_export(model, opt, opt.step)
    diff = assert_matches(record, model, opt)
    assert [st["foam_level"] for st in record["state"][:3:2]] == [3, 1]
    for got, want in zip(record["exported"], exported):
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-8)
    print(f"set_levels + export under FSDP2: max |param diff| {diff:.3g}")


def _adamw_then_convert():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), **ADAMW_OPTIONS)
    train(model, opt.step, range(CKPT_STEP))
    foam_compile.convert(opt, level=2)
    train(model, opt.step, range(CKPT_STEP, STEPS))
    return model, opt


def test_convert_under_fsdp2(runs):
    record = runs["convert"]
    assert record["opt_class"] == "FOAMAdamW"
    diff = assert_matches(record, *_adamw_then_convert())
    print(f"convert under FSDP2: max |param diff| {diff:.3g}")


def _compiled_reference(make=None):
    """Eager single-process FOAM as the foam backend sets it up: AdamW converted at level 2."""
    model = (make or make_small_model)()
    opt = foam_compile.convert(torch.optim.AdamW(model.parameters(), **ADAMW_OPTIONS), level=2)
    return single_process(None, model=model, opt=opt)


def test_compiled_foam_backend_under_fsdp2(runs):
    """``torch.compile(step, backend=foam_compile.backend(...))`` of a stock AdamW under FSDP2
    equals eager FOAM."""
    record = runs["compiled"]
    assert record["opt_class"] == "FOAMAdamW"
    diff = assert_matches(record, *_compiled_reference())
    print(
        f"compiled backend='foam' under FSDP2: max |param diff| {diff:.3g} "
        f"({runs.seconds('compiled'):.1f}s with compilation)"
    )


@pytest.fixture(scope="module")
def inductor_runs(tmp_path_factory) -> Runs:
    if not os.environ.get("FOAM_TEST_FSDP_INDUCTOR"):
        pytest.skip("slow (2-process Inductor compiles); set FOAM_TEST_FSDP_INDUCTOR=1 to run")
    root = tmp_path_factory.mktemp("foam_inductor")
    launch(root, ["inductor_one_layer", "inductor_mlp"], timeout_s=900)
    return Runs(root)


def test_foam_backend_with_inductor_under_fsdp2_one_layer(inductor_runs):
    diff = assert_matches(inductor_runs["inductor_one_layer"], *_compiled_reference())
    print(f"backend='foam' + Inductor under FSDP2, one Linear: max |param diff| {diff:.3g}")


# torch 2.13 note: an earlier foam_adam_ (slices for the partial block, unflatten views) made
# AOTAutograd fail here for models with several weight shapes: IndexError in
# ShapeEnv.produce_guards_verbose, a size symbol with no source. This test catches a return.
def test_foam_backend_with_inductor_under_fsdp2_mlp(inductor_runs):
    diff = assert_matches(inductor_runs["inductor_mlp"], *_compiled_reference(make_model))
    print(f"backend='foam' + Inductor under FSDP2, MLP: max |param diff| {diff:.3g}")
