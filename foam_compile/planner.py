"""Choosing a fold level per parameter: a multiple-choice knapsack over measured errors.

Each parameter picks exactly one level; a level costs optimizer-state bytes
(:mod:`foam_compile.cost_model`) and loses the gradient energy inside its blocks
(:class:`~foam_compile.cost_model.ErrorMeter`). :func:`plan` minimises the total error under a
memory budget, or the memory under an error bound. The solver is a dynamic programme over a byte
axis; see :func:`_solve` for what it guarantees.

The total error is the element-weighted mean of the per-parameter residual shares,
``sum_p numel_p * e_p(level_p) / sum_p numel_p`` over the planned parameters (each tensor once):
Adam normalises per element, so every element's moment quality counts alike, however large the
layer's gradients.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from .cost_model import ErrorMeter, cost, max_useful_level, white_noise_error

__all__ = [
    "DEFAULT_LEVELS", "KEEP_UNFOLDED", "keeps_module", "Plan", "PlanEntry", "plan",
    "plan_params", "calibrate_meter", "AutoTuner",
]

DEFAULT_LEVELS = range(0, 9)
# Name patterns kept at level 0 (re.search on every name of the tensor); the same list as
# policy.KEEP_UNFOLDED, the paper's recipe: embeddings, the output head, norms.
KEEP_UNFOLDED = (
    r"embed", r"\bwte\b", r"\bwpe\b", r"lm_head", r"(^|\.)head(\.|$)", r"(^|\.)output(\.|$)",
    r"norm",
)


def keeps_module(module: nn.Module) -> bool:
    """Default module rule: embeddings and norms (any class named ``*Norm*``) stay at level 0."""
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or "norm" in type(module).__name__.lower()


# ------------------------------------------------------------------------------------ plan
@dataclass
class PlanEntry:
    """One tensor of the plan (tied names share one entry)."""

    name: str
    aliases: tuple[str, ...]  # every name of this tensor, ``name`` first
    shape: tuple[int, ...]
    numel: int
    level: int
    state_bytes: int
    adamw_state_bytes: int
    step_bytes: int
    adamw_step_bytes: int
    error: float  # residual share at ``level`` (measured, or the white-noise prior)
    why: str  # "planned", "measured" ..., or why the level was not planned
    param: Tensor = field(repr=False)


@dataclass
class Plan:
    """The chosen levels, their costs, and how close to optimal the solver is guaranteed to be."""

    entries: list[PlanEntry]
    budget: float | None
    max_error: float | None
    calibration_steps: int
    exact: bool  # True: optimal; False: within ``slack_bytes`` (see _solve)
    slack_bytes: int

    @property
    def levels(self) -> dict[str, int]:
        """Parameter name -> level, every name of a tied tensor included."""
        return {a: e.level for e in self.entries for a in e.aliases}

    def levels_by_param(self) -> dict[Tensor, int]:
        """Tensor -> level, one key per tensor: what ``FOAM.set_levels`` takes."""
        return {e.param: e.level for e in self.entries}

    def apply(self, optimizer) -> None:
        """``optimizer.set_levels(levels_by_param())`` for the tensors the optimizer holds."""
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        optimizer.set_levels({p: lv for p, lv in self.levels_by_param().items() if id(p) in held})

    @property
    def state_bytes(self) -> int:
        return sum(e.state_bytes for e in self.entries)

    @property
    def adamw_state_bytes(self) -> int:
        return sum(e.adamw_state_bytes for e in self.entries)

    @property
    def state_fraction(self) -> float:
        """FOAM's state over AdamW's (same state dtype) for the planned tensors."""
        return self.state_bytes / max(self.adamw_state_bytes, 1)

    @property
    def error(self) -> float:
        """Element-weighted mean residual share over the planned tensors."""
        total = sum(e.numel for e in self.entries)
        return sum(e.numel * e.error for e in self.entries) / max(total, 1)

    def report(self) -> str:
        """A table: name, shape, level, state bytes, AdamW's, error, why; then the totals."""
        head = ("name", "shape", "level", "state B", "AdamW B", "error", "why")
        rows = [
            (" | ".join(e.aliases), "x".join(map(str, e.shape)) or "scalar", str(e.level),
             f"{e.state_bytes:,}", f"{e.adamw_state_bytes:,}", f"{e.error:.4f}", e.why)
            for e in self.entries
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        line = lambda r: "  ".join(  # noqa: E731
            c.ljust(w) if i in (0, 1, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )
        mib = 2.0**20
        step, adamw_step = (sum(getattr(e, k) for e in self.entries) for k in ("step_bytes", "adamw_step_bytes"))
        limits = []
        if self.budget is not None:
            limits.append(f"budget {self.budget:.1%}")
        if self.max_error is not None:
            limits.append(f"max_error {self.max_error:.4f}")
        solver = "exact" if self.exact else f"within {self.slack_bytes:,} B of optimal"
        calib = f"{self.calibration_steps} calibration steps" if self.calibration_steps else "no calibration (white-noise prior)"
        return "\n".join([
            line(head),
            line(["-" * w for w in widths]),
            *map(line, rows),
            "",
            f"state: {self.state_bytes / mib:.3f} MiB vs AdamW {self.adamw_state_bytes / mib:.3f} MiB "
            f"({self.state_fraction:.1%}); {', '.join(limits)}",
            f"error: {self.error:.4f} (element-weighted mean residual share); {calib}",
            f"bytes moved per fused step: {step / mib:.3f} MiB vs AdamW {adamw_step / mib:.3f} MiB",
            f"solver: {solver}",
        ])


# --------------------------------------------------------------------------------- solver
def _solve(
    options: Sequence[Sequence[tuple[int, float]]],
    capacity: int | None,
    max_error: float | None,
    resolution: int,
) -> tuple[list[int], bool, int]:
    """Pick one ``(bytes, error)`` option per item; returns ``(indices, exact, unit)``.

    Multiple-choice knapsack by dynamic programming over a byte axis of cells of ``unit`` bytes:
    ``f[k]`` = least total error with rounded bytes <= ``k`` cells. Bytes round *up*, so a plan
    the table accepts never exceeds ``capacity``.

    Guarantee. ``unit`` is the gcd of all option bytes when that makes at most ``resolution``
    cells: rounding is then exact and the answer is optimal (``exact=True``). Otherwise ``unit =
    ceil(max total / resolution)`` and, with ``P`` items: under a budget, the error is at most the
    optimum for a budget ``P * unit`` bytes smaller; under an error bound, the bytes are at most
    the optimum plus ``P * unit``. ``unit`` does not depend on the budget, so the error is
    monotone non-increasing in the budget. Among plans of equal error the fewest bytes win.
    Cost: ``O(P * levels * cells)``, vectorised over cells.
    """
    if not options:
        return [], True, 1
    top = sum(max(b for b, _ in opts) for opts in options)
    unit = math.gcd(*(b for opts in options for b, _ in opts)) or 1
    exact = top // unit <= resolution
    if not exact:
        unit = -(-top // resolution)
    cells = [[-(-b // unit) for b, _ in opts] for opts in options]
    size = sum(max(c) for c in cells) + 1
    f = np.zeros(size)
    choice = np.zeros((len(options), size), dtype=np.int16)
    for i, opts in enumerate(options):
        new = np.full(size, np.inf)
        # cheapest first, so that ties (strict <) keep the option with fewer bytes
        for j in sorted(range(len(opts)), key=lambda j: cells[i][j]):
            w, e = cells[i][j], opts[j][1]
            cand = np.full(size, np.inf)
            cand[w:] = f[: size - w] + e
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
        f = new
    limit = size - 1 if capacity is None else min(capacity // unit, size - 1)
    if capacity is not None and capacity < 0 or not np.isfinite(f[limit]):
        raise _Infeasible(float("inf"))
    if max_error is None:
        target = f[limit]
    elif f[limit] <= max_error:
        target = max_error
    else:
        raise _Infeasible(float(f[limit]))
    k = int(np.argmax(f <= target))  # f is non-increasing: the fewest cells reaching target
    picked = [0] * len(options)
    for i in reversed(range(len(options))):
        picked[i] = int(choice[i, k])
        k -= cells[i][picked[i]]
    return picked, exact, unit


class _Infeasible(Exception):
    def __init__(self, best_error: float):
        self.best_error = best_error


# ----------------------------------------------------------------------------------- plan
def plan_params(
    named_params: Iterable[tuple[str, Tensor]],
    errors: ErrorMeter | Mapping[str, Sequence[float]] | None = None,
    *,
    budget: float | None = None,
    max_error: float | None = None,
    levels: Iterable[int] = DEFAULT_LEVELS,
    keep_unfolded: Iterable[str] = KEEP_UNFOLDED,
    fold_anyway: Iterable[str] = (),
    keep: Iterable[Tensor] = (),
    fixed: Mapping[str, int] | None = None,
    amsgrad: bool = False,
    resolution: int = 1 << 16,
    calibration_steps: int = 0,
) -> Plan:
    """Plan levels for ``(name, param)`` pairs from already-measured errors.

    The same tensor may appear under several names (tied weights; or one name ``"a|b"``): it is
    planned once, counted once and gets one level. ``errors`` maps a name to the residual share
    per level ``0..L`` (an :class:`ErrorMeter`, or a plain mapping); tensors with no entry use
    :func:`~foam_compile.cost_model.white_noise_error`. Rules, strongest first:

    - ``fixed`` (name -> level) pins a tensor;
    - 0-d/1-d tensors, tensors in ``keep``, and names matching ``keep_unfolded`` run at level 0,
      unless a name matches ``fold_anyway``;
    - everything else chooses from ``levels``, each capped at ``ceil(log2 n)``.

    ``budget``: FOAM's state as a fraction of AdamW's (same float32 state dtype) over all the
    tensors given, kept ones included. ``max_error``: bound on the element-weighted mean share.
    With a budget, the error is minimised; with ``max_error`` (and possibly a budget too), the
    bytes are. Raises ``ValueError`` if neither is given or no plan meets them.
    """
    if budget is None and max_error is None:
        raise ValueError("plan: give budget= (fraction of AdamW's state) and/or max_error=")
    levels = sorted({int(lv) for lv in levels})
    if not levels or levels[0] < 0:
        raise ValueError(f"plan: levels must be non-negative ints, got {levels}")
    keep_ids = {id(t) for t in keep}
    keep_re = [re.compile(p) for p in keep_unfolded]
    fold_re = [re.compile(p) for p in fold_anyway]
    fixed = dict(fixed or {})

    tensors: dict[int, tuple[list[str], Tensor]] = {}
    for name, p in named_params:
        names = tensors.setdefault(id(p), ([], p))[0]
        names += [a for a in name.split("|") if a not in names]

    entries, free, options = [], [], []
    for names, p in tensors.values():
        shape = tuple(p.shape)
        shares = _errors_for(errors, names, shape, levels[-1])
        pinned = next((fixed[a] for a in names if a in fixed), None)
        forced = any(r.search(a) for r in fold_re for a in names)
        if pinned is not None:
            cands, why = [int(pinned)], "fixed"
        elif len(shape) < 2:
            cands, why = [0], f"{len(shape)}-d"
        elif not forced and id(p) in keep_ids:
            cands, why = [0], "kept: module"
        elif not forced and any(r.search(a) for r in keep_re for a in names):
            cands, why = [0], "kept: name"
        else:
            cands = sorted({min(lv, max_useful_level(shape)) for lv in levels})
            why = "planned" if shares[1] else "planned (prior)"
        entry = _entry(names, p, cands[0], shares[0], why, amsgrad)
        entries.append(entry)
        if len(cands) > 1:
            free.append((entry, cands, shares[0]))
            options.append([
                (cost(shape, lv, param_dtype=p.dtype, amsgrad=amsgrad).state_bytes,
                 p.numel() * shares[0][lv])
                for lv in cands
            ])

    adamw = sum(e.adamw_state_bytes for e in entries)
    total = max(sum(e.numel for e in entries), 1)
    fixed_bytes = sum(e.state_bytes for e in entries) - sum(e.state_bytes for e, _, _ in free)
    fixed_error = sum(e.numel * e.error for e in entries) - sum(e.numel * e.error for e, _, _ in free)
    capacity = None if budget is None else math.floor(budget * adamw) - fixed_bytes
    bound = None if max_error is None else max_error * total - fixed_error
    try:
        picked, exact, unit = _solve(options, capacity, bound, resolution)
    except _Infeasible as err:
        lowest = min(b for b, _ in opts) if False else None  # noqa: F841  (kept simple below)
        least = fixed_bytes + sum(min(b for b, _ in opts) for opts in options)
        raise ValueError(
            f"plan: no plan meets budget={budget} and max_error={max_error}: the least state "
            f"possible is {least / max(adamw, 1):.1%} of AdamW's, and the least error within the "
            f"budget is {(fixed_error + err.best_error) / total:.4f}"
        ) from None
    for (entry, cands, shares), j in zip(free, picked):
        i = entries.index(entry)
        entries[i] = _entry(list(entry.aliases), entry.param, cands[j], shares, entry.why, amsgrad)
    return Plan(entries, budget, max_error, calibration_steps, exact, len(free) * unit * (not exact))


def _errors_for(errors, names, shape, max_level) -> tuple[list[float], bool]:
    """``(shares per level 0..max_level, measured?)`` for one tensor."""
    found = None
    if errors is not None:
        found = next((errors.errors(a) if isinstance(errors, ErrorMeter) else errors[a]
                      for a in names if a in errors), None)
    if found is None:
        return [white_noise_error(shape, lv) for lv in range(max_level + 1)], False
    found = list(found)
    if len(shape) >= 2 and len(found) <= min(max_level, max_useful_level(shape)):
        raise ValueError(f"plan: errors for {names[0]} stop at level {len(found) - 1}, "
                         f"levels up to {max_level} were asked for")
    return found + [found[-1]] * (max_level + 1 - len(found)), True


def _entry(names, p, level, shares, why, amsgrad) -> PlanEntry:
    c = cost(p.shape, level, param_dtype=p.dtype, amsgrad=amsgrad)
    return PlanEntry(
        name=names[0], aliases=tuple(names), shape=tuple(p.shape), numel=p.numel(), level=c.level,
        state_bytes=c.state_bytes, adamw_state_bytes=c.adamw_state_bytes, step_bytes=c.step_bytes,
        adamw_step_bytes=c.adamw_step_bytes, error=float(shares[c.level]) if len(shares) > c.level else float(shares[-1]),
        why=why, param=p,
    )
