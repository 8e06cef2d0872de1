"""Quantized FOAM state and master-weight corrections under FSDP2, on 2 CPU processes (gloo).

bfloat16 weights with ``master_weights="int8"``, moments in ``int8`` (and ``int4`` for one
weight). The gradients are made, not back-propagated: every rank gets its shard of the same
full gradient, so the optimizer step, which needs no communication (groups of a moment run along
the last dim, FSDP2 shards dim 0), must give on each rank exactly its shard of the
single-process result: the codes, the scales, the corrections and the weights are compared
bitwise. DCP checkpoints reshard 2 -> 1 and 1 -> 2 bitwise too. One launch runs the scenarios
(see ``test_fsdp_ddp.py`` for the launcher).

Shapes on purpose: rows that 2 ranks split unevenly (7 = 4 + 3), folded rows of 68 = 32 + 32 + 4
(a partial group), and a 1-d bias that FSDP2 shards on its only (last) dim: 64 = 32 + 32 splits
into whole groups; 7 = 4 + 3 would split a group, so that bias stays ``fp32`` (and the
``quant_refuse`` scenario checks that ``int8`` is refused for it, by name).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from foam_compile import FOAM, export_adamw_state_dict
from foam_compile.master_weights import RHO_KEY, full_precision_state_dict

from .test_fsdp_ddp import Runs, launch

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

STEPS = 4
CKPT_STEP = 2
OPTIONS = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, amsgrad=True, master_weights="int8")


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    # 0.weight [64, 136] level 1: folded rows of 68; 0.bias [64]: 1-d, 2 whole groups per rank
    # 1.weight [7, 64] level 2, int4; 1.bias [7]: a shard would split its group -> fp32
    return nn.Sequential(nn.Linear(136, 64), nn.Linear(64, 7)).to(torch.bfloat16)


def make_foam(model: nn.Module, bias_format: str = "fp32", **options) -> FOAM:
    options = {**OPTIONS, **options}
    opt = FOAM([{"params": list(model.parameters()), "state_format": "int8"}], **options)
    opt._set_layout(model[0].weight, level=1)
    opt._set_layout(model[0].bias, level=0)
    opt._set_layout(model[1].weight, level=2, state_format="int4")
    opt._set_layout(model[1].bias, level=0, state_format=bias_format)
    return opt


def gradient(step: int, index: int, p: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + index)
    return torch.randn(tuple(p.shape), generator=g).to(p.dtype)


def train(model: nn.Module, opt: FOAM, steps: range) -> None:
    """Set each parameter's gradient (its shard of it, for a DTensor) and step."""
    for i in steps:
        for j, p in enumerate(model.parameters()):
            g = gradient(i, j, p)
            if hasattr(p, "placements"):
                from torch.distributed.tensor import distribute_tensor

                g = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)


def single_process(steps: range = range(STEPS)):
    model = make_model()
    opt = make_foam(model)
    train(model, opt, steps)
    return model, opt


# ----------------------------------------------------------------- worker (2 processes)
def _fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model:
        fully_shard(m)
    return fully_shard(model)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def exports(model: nn.Module, opt: FOAM) -> dict:
    """The stock AdamW state dict and the float32 weights (corrections applied), gathered."""
    adamw = export_adamw_state_dict(opt)["state"]
    return {
        "adamw": {
            pid: {k: _full(v) for k, v in st.items() if k != "step"} for pid, st in adamw.items()
        },
        "float32": {k: _full(v) for k, v in full_precision_state_dict(model, opt).items()},
    }


def _record(out: Path, name: str, rank: int, model: nn.Module, opt: FOAM) -> None:
    exported = exports(model, opt)
    params = [_full(p) for p in model.parameters()]
    states, placements = [], []
    for p in model.parameters():
        st = opt.state[p]
        states.append(
            {k: _full(v) if torch.is_tensor(v) else v for k, v in st.items() if k != "step"}
        )
        states[-1]["step"] = float(st["step"])
        placements.append(
            {k: str(getattr(v, "placements", "plain")) for k, v in st.items() if k != "step"}
        )
        placements[-1]["param"] = str(p.placements)
    if rank == 0:
        torch.save(
            dict(params=params, state=states, placements=placements, exports=exported),
            out / f"{name}.pt",
        )


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

    sd = _state_dicts(model, opt)  # initialises FOAM's state (one lr=0 step)
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def scenario_quant_fsdp(out, rank):
    """FSDP2 + int8/int4 state + int8 corrections; a 2-rank checkpoint at CKPT_STEP."""
    model = _fsdp(make_model())
    opt = make_foam(model)
    train(model, opt, range(CKPT_STEP))
    _save(model, opt, out / "ckpt_2ranks")
    train(model, opt, range(CKPT_STEP, STEPS))
    _record(out, "quant_fsdp", rank, model, opt)


def scenario_quant_load_1to2(out, rank):
    """The single-process checkpoint (after CKPT_STEP steps) resumed on 2 FSDP2 ranks."""
    model = _fsdp(make_model())
    opt = make_foam(model)
    _load(model, opt, out / "ckpt_1rank")
    train(model, opt, range(CKPT_STEP, STEPS))
    _record(out, "quant_load_1to2", rank, model, opt)


def scenario_quant_refuse(out, rank):
    """int8 for the [7] bias, whose 4 + 3 shards would split its group of 32: refused."""
    model = _fsdp(make_model())
    opt = make_foam(model, bias_format="int8")
    before = [_full(p) for p in model.parameters()]
    try:
        train(model, opt, range(1))
    except ValueError as e:
        error = str(e)
    else:
        error = None
    unchanged = all(torch.equal(a, _full(p)) for a, p in zip(before, model.parameters()))
    steps = [float(st["step"]) for st in opt.state.values() if "step" in st]
    # the same split groups in a full (1-process) checkpoint loaded into the sharded optimizer
    model = _fsdp(make_model())
    opt = make_foam(model)
    try:
        opt.load_state_dict(torch.load(out / "int8_bias.pt", weights_only=True))
    except ValueError as e:
        load_error = str(e)
    else:
        load_error = None
    if rank == 0:
        torch.save(
            {"error": error, "unchanged": unchanged, "steps": steps, "load_error": load_error},
            out / "quant_refuse.pt",
        )


def amsgrad_switched_on(model: nn.Module, opt: FOAM) -> None:
    """Two steps without amsgrad, then amsgrad on: the max moment is made from the stored v."""
    train(model, opt, range(2))
    for group in opt.param_groups:
        group["amsgrad"] = True
    train(model, opt, range(2, 3))


def scenario_quant_amsgrad_on(out, rank):
    """amsgrad switched on mid-run decodes and re-encodes each rank's shard of v."""
    model = _fsdp(make_model())
    opt = make_foam(model, amsgrad=False)
    amsgrad_switched_on(model, opt)
    _record(out, "quant_amsgrad_on", rank, model, opt)


SCENARIOS = ["quant_fsdp", "quant_load_1to2", "quant_refuse", "quant_amsgrad_on"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("foam_quant_distributed")
    model, opt = single_process(range(CKPT_STEP))
    _save(model, opt, root / "ckpt_1rank")  # no process group here: a 1-rank checkpoint
    model = make_model()
    opt = make_foam(model, bias_format="int8")  # fine in one process
    train(model, opt, range(1))
    torch.save(opt.state_dict(), root / "int8_bias.pt")
    start = time.perf_counter()
    launch(root, SCENARIOS, module=__name__)
    print(f"2-process launch: {time.perf_counter() - start:.1f}s")
    return Runs(root)


@pytest.fixture(scope="module")
def reference():
    return single_process()


def assert_bitwise(record: dict, model: nn.Module, opt: FOAM) -> None:
    """Weights, and every state tensor (codes, scales, corrections), equal bit for bit."""
    for i, (got, p) in enumerate(zip(record["params"], model.parameters())):
        assert got.dtype == p.dtype == torch.bfloat16
        assert torch.equal(got, p.detach()), f"parameter {i} differs"
    for i, (got, p) in enumerate(zip(record["state"], model.parameters())):
        want = opt.state[p]
        assert set(got) == set(want), (i, sorted(got), sorted(want))
        assert got["step"] == float(want["step"])
        for key, value in want.items():
            if key == "step":
                continue
            if not torch.is_tensor(value):
                assert got[key] == value, (i, key)
                continue
            assert got[key].dtype == value.dtype, (i, key, got[key].dtype, value.dtype)
            assert torch.equal(got[key], value), f"parameter {i}: {key!r} differs"


def _formats(opt: FOAM, model: nn.Module) -> list[str]:
    return [opt.state[p].get("foam_format", "fp32") for p in model.parameters()]


def test_reference_has_the_layouts_under_test(reference):
    """The single-process run holds what the scenarios are meant to shard."""
    model, opt = reference
    assert _formats(opt, model) == ["int8", "int8", "int4", "fp32"]
    assert [opt.state[p]["foam_level"] for p in model.parameters()] == [1, 0, 2, 0]
    for p in model.parameters():
        assert opt.state[p][RHO_KEY].dtype == torch.int8
    assert opt.state[model[0].weight]["exp_avg_scale"].shape == (64, 3)  # 68 = 32 + 32 + 4


def test_fsdp2_quantized_state_equals_single_process_bitwise(runs, reference):
    record = runs["quant_fsdp"]
    assert_bitwise(record, *reference)
    for pl in record["placements"]:  # codes, scales and corrections sharded like the parameter
        tensors = {k: v for k, v in pl.items() if v != "plain" and k != "param"}
        assert RHO_KEY in tensors and "exp_avg" in tensors, pl
        assert set(tensors.values()) == {pl["param"]} == {"(Shard(dim=0),)"}, pl


def test_dcp_checkpoint_2_ranks_to_1_bitwise(runs, reference):
    """The 2-rank checkpoint loaded in one plain process, then on to STEPS: bitwise the run
    that never stopped, with the integer codes and corrections kept in their dtypes."""
    runs["quant_fsdp"]  # the scenario that wrote the checkpoint ran
    model = make_model()
    opt = make_foam(model)
    _load(model, opt, runs.root / "ckpt_2ranks")
    st = opt.state[model[0].weight]
    assert float(st["step"]) == CKPT_STEP
    assert st["exp_avg"].dtype == torch.int8 and st["exp_avg_scale"].dtype == torch.float32
    assert st[RHO_KEY].dtype == torch.int8
    train(model, opt, range(CKPT_STEP, STEPS))
    assert_bitwise(
        {
            "params": [p.detach() for p in model.parameters()],
            "state": [
                {**opt.state[p], "step": float(opt.state[p]["step"])} for p in model.parameters()
            ],
        },
        *reference,
    )


def test_dcp_checkpoint_1_rank_to_2_bitwise(runs, reference):
    assert_bitwise(runs["quant_load_1to2"], *reference)


def test_fsdp2_refuses_groups_across_ranks(runs):
    record = runs["quant_refuse"]
    error = record["error"]
    assert error is not None, "an int8 group split across ranks was not refused"
    assert "'1.bias'" in error and "state_format='fp32'" in error, error
    assert record["unchanged"] and not any(record["steps"]), record  # nothing stepped
    load_error = record["load_error"]
    assert load_error is not None, "a checkpoint with groups split across ranks was loaded"
    assert "parameter 3 of param group 0" in load_error and "'exp_avg_scale'" in load_error


def test_exports_under_fsdp2_equal_single_process_bitwise(runs, reference):
    """export_adamw_state_dict (decoded, unfolded moments) and full_precision_state_dict
    (bfloat16 weights + int8 corrections as float32) of sharded parameters."""
    got = runs["quant_fsdp"]["exports"]
    want = exports(*reference)
    assert (
        got["float32"].keys()
        == want["float32"].keys()
        == {"0.weight", "0.bias", "1.weight", "1.bias"}
    )
    for name, value in want["float32"].items():
        assert value.dtype == got["float32"][name].dtype == torch.float32
        assert torch.equal(got["float32"][name], value), name
    assert got["adamw"].keys() == want["adamw"].keys()
    for pid, st in want["adamw"].items():
        assert set(st) == set(got["adamw"][pid]) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        for key, value in st.items():
            assert torch.equal(got["adamw"][pid][key], value), (pid, key)


def test_amsgrad_switched_on_mid_run_sharded_equals_single_process(runs):
    model = make_model()
    opt = make_foam(model, amsgrad=False)
    amsgrad_switched_on(model, opt)
    assert all("max_exp_avg_sq" in opt.state[p] for p in model.parameters())
    assert_bitwise(runs["quant_amsgrad_on"], model, opt)
