"""Train the small LLaMA of ``train_llama.py`` with FSDP2 + FOAM on 2 CPU processes (gloo).

    torchrun --nproc_per_node 2 examples/train_fsdp.py
    torchrun --nproc_per_node 2 examples/train_fsdp.py --save out/fsdp_ckpt   # + a DCP checkpoint

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every parameter on dim 0 across the ranks;
FOAM folds the *last* dim into blocks of ``2**level``, so each rank folds its own rows and keeps
the folded moments of its shard only: the optimizer state per rank is FSDP's 1/N times FOAM's
1/2**level. The moments are DTensors sharded like their parameters, so
``torch.distributed.checkpoint`` saves them on N ranks and loads them on M.

The optimizer is a stock ``torch.optim.AdamW`` turned into FOAM by ``foam_compile.convert`` with
the paper's recipe: attention and MLP weights fold at level 2 with step scale 0.25; embeddings,
the output head and norms stay plain Adam (level 0). It trains on the bytes of this repository's
example scripts (no download). Each rank prints its own state bytes; rank 0 prints the loss.
Run without torchrun it trains on one process.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import foam_compile
from foam_compile.distributed import local

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_llama import Llama, causal_lm_loss, random_batch  # noqa: E402  (the demo model)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--level", type=int, default=2)
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--save", type=Path, default=None, help="write a DCP checkpoint here at the end")
    return p.parse_args(argv)


def init_distributed() -> tuple[int, int]:
    """torchrun's environment, or a one-process group when run with plain ``python``."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def corpus() -> torch.Tensor:
    """UTF-8 bytes of the example scripts: byte-level tokens, vocab 256."""
    text = b"".join(f.read_bytes() for f in sorted(Path(__file__).resolve().parent.glob("*.py")))
    return torch.frombuffer(bytearray(text), dtype=torch.uint8)


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """This rank's FOAM moment bytes, and what AdamW's two float32 moments would take here."""
    foam = adamw = 0
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            foam += sum(local(v).nbytes for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))
            adamw += 2 * 4 * local(p).numel()
    return foam, adamw


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world = init_distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)  # the same initial weights on every rank, before sharding
    model = Llama(
        vocab=256, dim=args.dim, n_layers=args.layers, n_heads=args.heads, max_seq_len=args.seq_len
    )
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)

    adamw = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    opt = foam_compile.convert(adamw, model=model, level=args.level, scale=args.scale)

    data = corpus()
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank draws its own batches
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = random_batch(data, args.batch_size, args.seq_len, gen)
        loss = causal_lm_loss(model, x, y)
        loss.backward()  # FSDP2 reduce-scatters: each rank gets its shard of the mean gradient
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0 and (step == 1 or step % 5 == 0):
            print(f"step {step:3d}  loss {mean.item() / world:.4f}", flush=True)
    elapsed = time.perf_counter() - start

    foam, adamw_bytes = state_bytes(opt)
    params = sum(local(p).nbytes for p in model.parameters())
    for r in range(world):  # one rank at a time, in order
        if r == rank:
            print(
                f"rank {rank}/{world}: parameters {params:,} B, FOAM state {foam:,} B, "
                f"AdamW would hold {adamw_bytes:,} B ({foam / adamw_bytes:.1%}); "
                f"{args.steps} steps in {elapsed:.1f}s",
                flush=True,
            )
        dist.barrier()

    if args.save is not None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(args.save))
        if rank == 0:
            print(f"saved a {world}-rank checkpoint to {args.save} (loads on any number of ranks)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
