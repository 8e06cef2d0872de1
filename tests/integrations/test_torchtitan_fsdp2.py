"""FOAM under FSDP2 as torchtitan uses it, on 2 CPU ranks (gloo).

``fully_shard`` on each block, then on the root; the optimizer is built after sharding from
``model.parameters()`` (torchtitan's ``build_optimizers``); checkpoints go through the
``torch.distributed.checkpoint`` state-dict APIs: sharded (``flatten_optimizer_state_dict``, as
torchtitan's ``OptimizersContainer`` saves, written with ``dcp.save``) and full
(``full_state_dict`` + ``cpu_offload`` on rank 0, loaded with ``broadcast_from_rank0``).

Each resumed run rebuilds model, sharding and optimizer on the same 2 ranks and must take steps
3 and 4 exactly as the uninterrupted run: the same reductions run in the same order, so the
losses and the weights are bitwise equal. All scenarios run in one launch of two processes
(``tests/distributed/test_fsdp_ddp.py``'s launcher), which costs more than the checks.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from foam_compile.integrations import PolicyFOAM

from ..distributed.test_fsdp_ddp import WORLD, Runs, launch
from .common import check_levels, folded
from .tiny_lm import batches, lm_loss, make_model

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

STEPS, SAVE = 4, 2
OPTIONS = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, level=2, scale=0.5)


# ------------------------------------------------------------------- worker side (2 processes)
def build():
    """torchtitan's order: shard each block, then the root; the optimizer after sharding."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for block in model.layers.values():
        fully_shard(block)
    fully_shard(model)
    return model, PolicyFOAM(model.parameters(), **OPTIONS)


def train(model, opt, steps: range, rank: int) -> dict[int, float]:
    """Each rank takes its half of the global batch; returns the global mean loss per step."""
    data = batches(STEPS)
    losses = {}
    for i in steps:
        tokens = data[i][rank * 2 : (rank + 1) * 2]
        loss = lm_loss(model(tokens), tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses[i + 1] = (total / WORLD).item()
    return losses


def _full(t):
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def record(model, opt, losses: dict, rank: int, out, name: str, **extra) -> None:
    """Gather weights and each parameter's state summary (collectives); rank 0 writes them."""
    params = {n: _full(p) for n, p in model.named_parameters()}
    state = {}
    for n, p in model.named_parameters():
        st = opt.state[p]
        state[n] = {
            "foam_level": st["foam_level"],
            "step": float(st["step"]),
            "shapes": {k: tuple(st[k].shape) for k in ("exp_avg", "exp_avg_sq")},
            "placement": str(getattr(st["exp_avg"], "placements", "plain")),
            "param_shape": tuple(p.shape),
            "exp_avg": _full(st["exp_avg"]),
        }
    if rank == 0:
        torch.save(dict(params=params, state=state, losses=losses, **extra), out / f"{name}.pt")


def scenario_titan_uninterrupted(out, rank):
    """4 steps, with both kinds of checkpoint taken after step 2."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    model, opt = build()
    losses = train(model, opt, range(SAVE), rank)
    # Sharded, the way torchtitan's OptimizersContainer.state_dict() does it.
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    sharded = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, opt, options=flat),
    }
    dcp.save(sharded, checkpoint_id=str(out / "titan_sharded"))
    # Full, gathered to rank 0 on CPU.
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_sd = {
        "model": get_model_state_dict(model, options=full),
        "optim": get_optimizer_state_dict(model, opt, options=full),
    }
    if rank == 0:
        torch.save(full_sd, out / "titan_full.pt")
    losses.update(train(model, opt, range(SAVE, STEPS), rank))
    flat_keys = (
        sorted(k for k in sharded["optim"] if k.endswith(".foam_level")) if rank == 0 else []
    )
    record(model, opt, losses, rank, out, "titan_uninterrupted", flat_foam_level_keys=flat_keys)


def scenario_titan_resume_sharded(out, rank):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model, opt = build()
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    # get_optimizer_state_dict first initialises the state (an lr=0 step) in the folded shapes
    # that dcp.load then fills in place.
    sd = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, opt, options=flat),
    }
    dcp.load(sd, checkpoint_id=str(out / "titan_sharded"))
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"], options=flat)
    losses = train(model, opt, range(SAVE, STEPS), rank)
    record(model, opt, losses, rank, out, "titan_resume_sharded")


def scenario_titan_resume_full(out, rank):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model, opt = build()
    full = (
        torch.load(out / "titan_full.pt", weights_only=True)
        if rank == 0
        else {"model": {}, "optim": {}}
    )
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full["model"], options=options)
    set_optimizer_state_dict(model, opt, full["optim"], options=options)
    losses = train(model, opt, range(SAVE, STEPS), rank)
    record(model, opt, losses, rank, out, "titan_resume_full")


def scenario_accelerate_swap(out, rank):
    """accelerate's FSDP2 path (the HF Trainer's under FSDP) builds the optimizer on the whole
    model, shards it, then swaps the optimizer's parameters for the shards."""
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    opt = PolicyFOAM(model.parameters(), **OPTIONS)
    before = {p.data_ptr: None for p in model.parameters()}  # accelerate keys by p.data_ptr
    for block in model.layers.values():
        fully_shard(block)
    fully_shard(model)
    fsdp2_switch_optimizer_parameters(opt, dict(zip(before, model.parameters())))
    losses = train(model, opt, range(SAVE), rank)
    record(model, opt, losses, rank, out, "accelerate_swap")


SCENARIOS = ["titan_uninterrupted", "titan_resume_sharded", "titan_resume_full", "accelerate_swap"]


# ----------------------------------------------------------------------------- test side
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("foam_torchtitan")
    start = time.perf_counter()
    launch(root, SCENARIOS, module=__name__)
    print(f"2-process launch: {time.perf_counter() - start:.1f}s")
    return Runs(root)


def check_recorded_levels(record) -> dict[str, int]:
    model = make_model()  # the recorded names and global shapes, as plain tensors
    assert list(record["state"]) == [n for n, _ in model.named_parameters()]
    recorded = {
        id(p): {"foam_level": st["foam_level"]}
        | {k: torch.empty(shape) for k, shape in st["shapes"].items()}
        for p, st in zip(model.parameters(), record["state"].values())
    }
    return check_levels(lambda p: recorded[id(p)], model.named_parameters())


def test_fsdp2_per_block_then_root_folds_by_policy(runs):
    record = runs["titan_uninterrupted"]
    levels = check_recorded_levels(record)
    assert levels["tok_embeddings.weight"] == levels["output.weight"] == 0
    assert levels["layers.0.attention.wq.weight"] == levels["layers.1.feed_forward.w2.weight"] == 2
    w2 = record["state"]["layers.1.feed_forward.w2.weight"]
    assert w2["shapes"]["exp_avg"] == folded((32, 42), 2) == (32, 11)  # a partial last block
    for name, st in record["state"].items():
        assert st["placement"] == "(Shard(dim=0),)", (name, st["placement"])  # sharded like p
        assert st["step"] == STEPS
    # torchtitan's flattened optimizer state dict carries each parameter's level.
    assert "state.layers.0.attention.wq.weight.foam_level" in record["flat_foam_level_keys"]


def test_full_optimizer_state_dict_is_folded(runs):
    full = torch.load(runs.root / "titan_full.pt", weights_only=True)["optim"]
    wq = full["state"]["layers.0.attention.wq.weight"]
    assert wq["foam_level"] == 2 and tuple(wq["exp_avg"].shape) == (32, 8)
    assert not hasattr(wq["exp_avg"], "placements")  # a plain, gathered tensor
    emb = full["state"]["tok_embeddings.weight"]
    assert emb["foam_level"] == 0 and tuple(emb["exp_avg"].shape) == (64, 32)
    assert float(wq["step"]) == SAVE


def test_policy_survives_accelerates_parameter_swap(runs):
    pytest.importorskip("accelerate", reason="needs the hf extra: pip install 'foam-compile[hf]'")
    record = runs["accelerate_swap"]
    levels = check_recorded_levels(record)
    assert levels["tok_embeddings.weight"] == levels["output.weight"] == 0
    assert all(st["placement"] == "(Shard(dim=0),)" for st in record["state"].values())
    # the same first two steps as the optimizer built after sharding
    assert record["losses"] == {
        k: v for k, v in runs["titan_uninterrupted"]["losses"].items() if k <= SAVE
    }


@pytest.mark.parametrize("how", ["sharded", "full"])
def test_dcp_checkpoint_resumes_identically(runs, how):
    first, resumed = runs["titan_uninterrupted"], runs[f"titan_resume_{how}"]
    for step in range(SAVE + 1, STEPS + 1):
        assert resumed["losses"][step] == first["losses"][step], (
            step,
            first["losses"],
            resumed["losses"],
        )
    for name, p in first["params"].items():
        assert torch.equal(resumed["params"][name], p), name
    for name, st in first["state"].items():
        got = resumed["state"][name]
        assert got["foam_level"] == st["foam_level"] and got["step"] == st["step"], name
        assert torch.equal(got["exp_avg"], st["exp_avg"]), name
