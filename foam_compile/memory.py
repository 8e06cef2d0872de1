"""``memory_report``: bytes per parameter of a training run, counted from the live tensors.

The optimizer state is only part of what training holds per parameter: the weights, a master
copy (or correction bits), the gradients and the optimizer state all count. This module counts
what exists (each storage once; a ``DTensor`` by its local shard, so the figures are this rank's)
and puts beside it what ``torch.optim.AdamW`` in the usual mixed-precision recipe would hold for
the same parameters (:data:`ADAMW_ASSUMES`).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .distributed import local
from .master_weights import LOW_PRECISION, RHO_KEY

__all__ = ["ADAMW_ASSUMES", "ROWS", "MemoryReport", "memory_report"]

ROWS = ("weights", "master weights", "gradients", "optimizer state")
ADAMW_ASSUMES = (
    "AdamW column: torch.optim.AdamW (no amsgrad, no gradient release) in the usual "
    "mixed-precision recipe: the model's weights in their dtype, a float32 master copy of each "
    "bfloat16/float16 weight, gradients in the weights' dtype, exp_avg and exp_avg_sq in float32 "
    "(the master's dtype; float64 for float64 weights), a 4-byte step per tensor; every "
    "parameter that requires grad is trained."
)


@dataclass
class MemoryReport:
    """Bytes per row (:data:`ROWS`) for this optimizer and for AdamW; ``str()`` is a table."""

    params: int
    bytes: dict[str, int]
    adamw_bytes: dict[str, int]
    details: dict[str, str] = field(default_factory=dict)
    transient_gradient_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    @property
    def adamw_total(self) -> int:
        return sum(self.adamw_bytes.values())

    def per_param(self, nbytes: int) -> float:
        return nbytes / self.params if self.params else 0.0

    def as_dict(self) -> dict:
        """Everything in the table, JSON-ready."""
        rows = {
            name: {
                "bytes": self.bytes[name],
                "bytes_per_param": self.per_param(self.bytes[name]),
                "adamw_bytes": self.adamw_bytes[name],
                "adamw_bytes_per_param": self.per_param(self.adamw_bytes[name]),
                "detail": self.details.get(name, ""),
            }
            for name in ROWS
        }
        return {
            "parameters": self.params,
            "rows": rows,
            "total_bytes": self.total,
            "total_bytes_per_param": self.per_param(self.total),
            "adamw_total_bytes": self.adamw_total,
            "adamw_total_bytes_per_param": self.per_param(self.adamw_total),
            "transient_gradient_bytes": self.transient_gradient_bytes,
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        mib = 2.0**20
        head = f"{'':<17}{'MiB':>10}{'B/param':>9}  {'AdamW MiB':>10}{'B/param':>9}  detail"
        lines = [f"memory of {self.params:,} parameters (this rank)", head]
        rows = [(name, self.bytes[name], self.adamw_bytes[name]) for name in ROWS]
        rows.append(("total", self.total, self.adamw_total))
        for name, mine, adamw in rows:
            lines.append(
                f"{name:<17}{mine / mib:>10.1f}{self.per_param(mine):>9.2f}  "
                f"{adamw / mib:>10.1f}{self.per_param(adamw):>9.2f}  {self.details.get(name, '')}"
            )
        notes = [
            textwrap.fill(note, 100, initial_indent="- ", subsequent_indent="  ")
            for note in self.notes
        ]
        return "\n".join(lines + notes)


class _Counter:
    """Bytes of tensors, each storage counted once across every row."""

    def __init__(self):
        self.seen: set = set()

    def __call__(self, t: Tensor) -> int:
        t = local(t)
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr()) if storage.data_ptr() else ("id", id(t))
        if key in self.seen:
            return 0
        self.seen.add(key)
        return storage.nbytes() if storage.data_ptr() else t.numel() * t.element_size()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def unique(tensors: Iterable[Tensor]) -> list[Tensor]:
    """``tensors`` in order, each once (a tied weight is one tensor)."""
    return list({id(t): t for t in tensors}.values())


def params_of(model) -> list[Tensor]:
    """The distinct parameters of a module, or of an iterable of tensors."""
    return unique(model.parameters() if hasattr(model, "parameters") else model)


def _adamw_bytes(params: list[Tensor]) -> dict[str, int]:
    out = dict.fromkeys(ROWS, 0)
    for p in params:
        n, size = local(p).numel(), p.element_size()
        out["weights"] += n * size
        if not p.requires_grad:
            continue
        low = p.dtype in LOW_PRECISION
        out["master weights"] += 4 * n if low else 0
        out["gradients"] += n * size
        out["optimizer state"] += 2 * n * (4 if low else max(size, 4)) + 4
    return out


def _gradient_bytes(params, released, count: _Counter) -> tuple[int, int, str]:
    """(bytes, transient bytes, detail) of the model's gradients: live ones as they are;
    released parameters none (plus the largest as a transient); other trainable parameters a
    gradient of their dtype (it exists at the peak of a step)."""
    total = assumed = transient = 0
    for p in params:
        n = local(p).numel() * p.element_size()
        if p.grad is not None:
            total += count(p.grad)
        elif id(p) in released:
            transient = max(transient, n)
        elif p.requires_grad:
            total += n
            assumed += n
    parts = []
    if released:
        parts.append(f"released during backward (at most one, {transient / 2**20:.1f} MiB, alive)")
    if assumed:
        parts.append(f"{assumed / 2**20:.1f} MiB assumed: parameters with grad None")
    return total, transient, "; ".join(parts)


def memory_report(model, optimizer) -> MemoryReport:
    """Bytes per parameter of ``model`` trained by ``optimizer``, beside AdamW's (this rank).

    ``model`` is a module or an iterable of parameters; ``optimizer`` a torch optimizer or the
    object :func:`foam_compile.release_gradients` returns. Rows:

    - weights: the model's parameters;
    - master weights: correction bits (``master_rho``, :mod:`foam_compile.master_weights`) and
      any tensor the optimizer steps that is not a model parameter (a float32 master copy);
    - gradients: live ``.grad`` tensors; a trainable parameter whose gradient is ``None`` counts
      one of its dtype (it exists at the peak of a step), unless its gradient is released;
    - optimizer state: every other tensor in ``optimizer.state`` (moments, steps, scales).

    ``str()`` of the result is a table, ``.as_dict()`` the same for JSON.
    """
    release = optimizer if hasattr(optimizer, "_on_grad") else None
    opt = release.optimizer if release is not None else optimizer
    params = params_of(model)
    in_model = {id(p) for p in params}
    count = _Counter()
    out = dict.fromkeys(ROWS, 0)
    details = {}
    for p in params:
        out["weights"] += count(p)
    dtypes = sorted({_name(p.dtype) for p in params})
    details["weights"] = ", ".join(dtypes)

    opt_params = unique(p for g in opt.param_groups for p in g["params"])
    copies = [p for p in opt_params if id(p) not in in_model]
    rho = [st[RHO_KEY] for st in opt.state.values() if RHO_KEY in st]
    out["master weights"] = sum(count(t) for t in rho) + sum(count(p) for p in copies)
    kinds = sorted({_name(t.dtype) for t in rho})
    details["master weights"] = "; ".join(
        ([f"{'/'.join(kinds)} correction bits"] if rho else [])
        + ([f"{len(copies)} tensors stepped outside the model"] if copies else [])
    )

    released = {id(p) for p in release.params} if release is not None else set()
    grads, transient, details["gradients"] = _gradient_bytes(params, released, count)
    grads += sum(count(p.grad) for p in copies if p.grad is not None)
    out["gradients"] = grads

    for st in opt.state.values():
        for key, value in st.items():
            if key != RHO_KEY and isinstance(value, Tensor):
                out["optimizer state"] += count(value)
    details["optimizer state"] = type(opt).__name__
    n = sum(local(p).numel() for p in params)
    return MemoryReport(
        params=n,
        bytes=out,
        adamw_bytes=_adamw_bytes(params),
        details=details,
        transient_gradient_bytes=transient,
        notes=[ADAMW_ASSUMES, "Each storage is counted once; DTensors by their local shard."],
    )
