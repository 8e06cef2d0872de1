"""Whole-training memory per parameter on LLaMA shapes: ``foam_compile.memory_report`` per setup.

The parameters are the LLaMA configs' weight shapes (``step_bench.llama_shapes``) in bfloat16,
built directly (no forward pass). Each setup creates its optimizer state with one step on zero
gradients, drops the gradients, and reports the live tensors (a gradient of the weight's dtype
is counted for every trainable parameter whose gradient is ``None``, except under gradient
release, where at most one exists at a time: the largest is shown as the transient).

Setups (``--policy paper``: FOAM level 2 on block weights, level 0 on the embedding, lm_head and
norms, as in the FOAM paper; ``--policy all``: every 2-d weight at level 2):

* ``AdamW fp32 master``: ``torch.optim.AdamW`` over float32 copies of the bf16 weights;
* ``FOAM fp32 state``: FOAM on the bf16 weights, no correction;
* ``... + int8 corr`` (and int16): ``master_weights="int8"``;
* ``... + release``: the same under ``release_gradients``;
* ``FOAM int8 state ...`` / ``int4``: every parameter's moments in that state format (the param
  groups' ``state_format`` key, read by ``foam_compile.layout.format_for``).

Below the table, ``explain()``'s state bytes against AdamW's (moments and their scales only) for
each quantized setup: issue 12's measure.

    python benchmarks/memory_bench.py                    # 60m, paper policy
    python benchmarks/memory_bench.py --policy all --out table.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import os
import platform
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from step_bench import CONFIGS, LEVEL, llama_shapes  # noqa: E402

from foam_compile import FOAM, explain, memory_report, release_gradients  # noqa: E402

INT8 = {"state_format": "int8"}  # issue 12's quantized state (a param group key)
INT4 = {"state_format": "int4"}
CORR8 = {"master_weights": "int8"}
GROUP_KEYS = ("state_format",)  # options that go into every param group, not FOAM(...)
# (label, optimizer kind, FOAM options, gradient release)
SETUPS = [
    ("AdamW fp32 master", "adamw", {}, False),
    ("FOAM fp32 state", "foam", {}, False),
    ("FOAM fp32 state + int8 corr", "foam", CORR8, False),
    ("FOAM fp32 state + int16 corr", "foam", {"master_weights": "int16"}, False),
    ("FOAM fp32 state + int8 corr + release", "foam", CORR8, True),
    ("FOAM int8 state", "foam", INT8, False),
    ("FOAM int8 state + int8 corr", "foam", {**INT8, **CORR8}, False),
    ("FOAM int8 state + int8 corr + release", "foam", {**INT8, **CORR8}, True),
    ("FOAM int4 state + int8 corr", "foam", {**INT4, **CORR8}, False),
    ("FOAM int4 state + int8 corr + release", "foam", {**INT4, **CORR8}, True),
]
COLUMNS = ("weights", "master weights", "gradients", "optimizer state")


class Llama(nn.Module):
    """The parameters only: ``blocks`` fold under the paper's policy, ``others`` never do."""

    def __init__(self, cfg: dict, dtype: torch.dtype):
        super().__init__()
        shapes = llama_shapes(cfg)
        make = lambda s: nn.Parameter(torch.randn(s, dtype=torch.float32).to(dtype) * 0.02)  # noqa: E731
        self.blocks = nn.ParameterList([make(s) for s, block in shapes if block])
        self.others = nn.ParameterList([make(s) for s, block in shapes if not block])


def param_groups(model: Llama, policy: str, extra: dict | None = None) -> list[dict]:
    extra = extra or {}
    if policy == "all":
        two_d = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        return [{"params": two_d, "level": LEVEL, **extra}, {"params": rest, "level": 0, **extra}]
    return [
        {"params": list(model.blocks), "level": LEVEL, **extra},
        {"params": list(model.others), "level": 0, **extra},
    ]


def foam_accepts(options: dict) -> str | None:
    """Why FOAM cannot build this setup yet (an option it does not take), or None."""
    known = inspect.signature(FOAM).parameters
    missing = [k for k in options if k not in known and k not in GROUP_KEYS]
    return f"FOAM has no {', '.join(missing)} option yet" if missing else None


def zero_step(params, opt) -> None:
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in params:
        p.grad = None


def run_setup(cfg, kind, options, release, policy):
    model = Llama(cfg, torch.bfloat16)
    if kind == "adamw":
        masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
        opt = torch.optim.AdamW(masters, lr=1e-3)
        zero_step(masters, opt)
    else:
        extra = {k: v for k, v in options.items() if k in GROUP_KEYS}
        kwargs = {k: v for k, v in options.items() if k not in GROUP_KEYS}
        opt = FOAM(param_groups(model, policy, extra), lr=1e-3, **kwargs)
        zero_step(list(model.parameters()), opt)
    target = release_gradients(model, opt) if release else opt
    report = memory_report(model, target)
    ratio = None
    if "state_format" in options:
        ex = explain(opt, model)
        ratio = (ex.state_bytes, ex.adamw_bytes)
    return report, ratio


def table(rows, params: int) -> str:
    head = "| setup | " + " | ".join(COLUMNS) + " | total | transient grad MiB |"
    lines = [
        f"bytes per parameter ({params:,} parameters, bfloat16 weights)",
        "",
        head,
        "|---" + "|---:" * (len(COLUMNS) + 2) + "|",
    ]
    for label, report in rows:
        if isinstance(report, str):
            blanks = " | ".join(["n/a"] * (len(COLUMNS) + 1))
            lines.append(f"| {label} | {blanks} | {report} |")
            continue
        cells = [f"{report.per_param(report.bytes[c]):.2f}" for c in COLUMNS]
        cells.append(f"**{report.per_param(report.total):.2f}**")
        transient = report.transient_gradient_bytes / 2**20
        cells.append(f"{transient:.1f}" if transient else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="60m", choices=list(CONFIGS))
    ap.add_argument("--policy", default="paper", choices=["paper", "all"])
    ap.add_argument("--out", help="also write the table (markdown) here")
    ap.add_argument("--json", help="also write every report's as_dict() here")
    args = ap.parse_args()
    cfg = CONFIGS[args.size]
    rows, dicts, params, ratios = [], {}, 0, {}
    for label, kind, options, release in SETUPS:
        why = foam_accepts(options) if kind == "foam" else None
        if why is not None:
            rows.append((label, why))
            continue
        report, ratio = run_setup(cfg, kind, options, release, args.policy)
        params = report.params
        rows.append((label, report))
        dicts[label] = report.as_dict()
        if ratio is not None and not release:
            ratios[options["state_format"]] = ratio
        gc.collect()
    when = datetime.date.today().isoformat()
    text = "\n".join(
        [
            f"LLaMA-{args.size}, policy {args.policy!r}: {when}, torch {torch.__version__}, "
            f"{platform.machine()} ({os.cpu_count()} CPUs)",
            "",
            table(rows, params),
            "",
            "AdamW column of every report (same for all setups): "
            + ", ".join(
                f"{c} {v:.2f}"
                for c, v in (
                    (c, next(iter(dicts.values()))["rows"][c]["adamw_bytes_per_param"])
                    for c in COLUMNS
                )
            ),
            "",
            *(
                f"explain(), {fmt} state: {state:,} B of moments and scales against AdamW's "
                f"{adamw:,} B = {state / adamw:.4f}x"
                for fmt, (state, adamw) in ratios.items()
            ),
        ]
    )
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dicts, f, indent=1)


if __name__ == "__main__":
    main()
