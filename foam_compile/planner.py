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
from torch import Tensor, nn

from .cost_model import ErrorMeter, cost, max_useful_level, white_noise_error
from .policy import KEEP_UNFOLDED  # the paper's recipe: embeddings, the output head, norms

__all__ = [
    "DEFAULT_LEVELS",
    "KEEP_UNFOLDED",
    "keeps_module",
    "Plan",
    "PlanEntry",
    "plan",
    "plan_params",
    "calibrate_meter",
    "AutoTuner",
]

DEFAULT_LEVELS = range(0, 9)


def keeps_module(module: nn.Module) -> bool:
    """Default module rule: embeddings and norms (any class named ``*Norm*``) stay at level 0."""
    return (
        isinstance(module, (nn.Embedding, nn.EmbeddingBag))
        or "norm" in type(module).__name__.lower()
    )


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
            (
                " | ".join(e.aliases),
                "x".join(map(str, e.shape)) or "scalar",
                str(e.level),
                f"{e.state_bytes:,}",
                f"{e.adamw_state_bytes:,}",
                f"{e.error:.4f}",
                e.why,
            )
            for e in self.entries
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

        def line(cells):  # text columns left-aligned, numbers right-aligned
            return "  ".join(
                c.ljust(w) if i in (0, 1, 6) else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        step, adamw_step = (
            sum(getattr(e, k) for e in self.entries) for k in ("step_bytes", "adamw_step_bytes")
        )
        limits = []
        if self.budget is not None:
            limits.append(f"budget {self.budget:.1%}")
        if self.max_error is not None:
            limits.append(f"max_error {self.max_error:.4f}")
        solver = "exact" if self.exact else f"within {self.slack_bytes:,} B of optimal"
        calib = (
            f"{self.calibration_steps} calibration steps"
            if self.calibration_steps
            else "no calibration"
        )
        prior = sum(e.why == "planned (prior)" for e in self.entries)
        if prior:
            calib += f"; {prior} tensors unmeasured (white-noise prior)"
        return "\n".join(
            [
                line(head),
                line(["-" * w for w in widths]),
                *map(line, rows),
                "",
                f"state: {_human(self.state_bytes)} vs AdamW {_human(self.adamw_state_bytes)} "
                f"({self.state_fraction:.1%}); {', '.join(limits)}",
                f"error: {self.error:.4f} (element-weighted mean residual share); {calib}",
                f"bytes moved per fused step: {_human(step)} vs AdamW {_human(adamw_step)}",
                f"solver: {solver}",
            ]
        )


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


# --------------------------------------------------------------------------------- solver
def _solve(
    options: Sequence[Sequence[tuple[int, float]]],
    capacity: int | None,
    max_error: float | None,
    resolution: int,
) -> tuple[list[int], bool, int]:
    """Pick one ``(bytes, error)`` option per item; returns ``(indices, exact, unit)``.

    Multiple-choice knapsack by dynamic programming over a byte axis. Each option is charged
    its bytes *above its item's cheapest option*, rounded up to cells of ``unit`` bytes; ``f[k]``
    is the least total error with at most ``k`` cells. Rounding up means a plan the table
    accepts never exceeds ``capacity``; charging from the cheapest option means a budget that
    fits the all-cheapest plan is never refused.

    Guarantee. ``unit`` is the gcd of those extra bytes when that makes at most ``resolution``
    cells: rounding is then exact and the answer optimal (``exact=True``). Otherwise ``unit =
    ceil(sum of the items' byte ranges / resolution)`` and, with ``P`` items, under a budget the
    error is at most the optimum for a budget ``P * unit`` bytes smaller, and under an error
    bound the bytes are at most the optimum plus ``P * unit``. ``unit`` does not depend on the
    budget, so the error is monotone non-increasing in the budget. Among plans of equal error
    the fewest bytes win. Cost: ``O(P * options * cells)`` numpy work, ``P * cells`` bytes.
    """
    base = [min(b for b, _ in opts) for opts in options]
    extra = [[b - lo for b, _ in opts] for opts, lo in zip(options, base)]
    top = sum(max(x) for x in extra)
    unit = math.gcd(*(x for xs in extra for x in xs)) or 1
    exact = top // unit <= resolution
    if not exact:
        unit = -(-top // resolution)
    cells = [[-(-x // unit) for x in xs] for xs in extra]
    size = sum(max(c) for c in cells) + 1
    f = np.zeros(size)
    choice = np.zeros((len(options), size), dtype=np.int8)
    for i, opts in enumerate(options):
        new = np.full(size, np.inf)
        for j, w in enumerate(cells[i]):
            cand = np.full(size, np.inf)
            cand[w:] = f[: size - w] + opts[j][1]
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
        f = new
    if capacity is not None:
        capacity -= sum(base)
        if capacity < 0:
            raise _Infeasible(math.inf)
    limit = size - 1 if capacity is None else min(capacity // unit, size - 1)
    if max_error is None:
        target = f[limit]
    elif f[limit] <= max_error:
        target = max_error
    else:
        raise _Infeasible(float(f[limit]))
    # f is non-increasing: the fewest cells reaching target. Backtracking from there uses
    # exactly k cells (fewer would contradict the minimality of k), so ties cost fewest bytes.
    k = int(np.argmax(f <= target))
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
    top = max([levels[-1], *fixed.values()])

    entries, free = [], []  # free: (index in entries, candidate levels, options, shares)
    for names, p in tensors.values():
        shape = tuple(p.shape)
        shares, measured = _errors_for(errors, names, shape, top)
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
            why = "planned" if measured else "planned (prior)"
        entries.append(_entry(names, p, cands[0], shares, why, amsgrad))
        if len(cands) > 1:
            costs = [cost(shape, lv, param_dtype=p.dtype, amsgrad=amsgrad) for lv in cands]
            opts = [(c.state_bytes, p.numel() * shares[lv]) for c, lv in zip(costs, cands)]
            free.append((len(entries) - 1, cands, opts, shares))

    adamw = sum(e.adamw_state_bytes for e in entries)
    numel = max(sum(e.numel for e in entries), 1)
    is_free = {f[0] for f in free}
    fixed_bytes = sum(e.state_bytes for i, e in enumerate(entries) if i not in is_free)
    fixed_error = sum(e.numel * e.error for i, e in enumerate(entries) if i not in is_free)
    capacity = None if budget is None else math.floor(budget * adamw) - fixed_bytes
    bound = None if max_error is None else max_error * numel - fixed_error
    options = [f[2] for f in free]
    try:
        picked, exact, unit = _solve(options, capacity, bound, resolution)
    except _Infeasible as err:
        least = fixed_bytes + sum(min(b for b, _ in opts) for opts in options)
        why = (
            f"the least state possible is {least / max(adamw, 1):.1%} of AdamW's"
            if math.isinf(err.best_error)
            else "the least error within the budget is "
            f"{(fixed_error + err.best_error) / numel:.4f}"
        )
        raise ValueError(
            f"plan: no plan meets budget={budget}, max_error={max_error}: {why}"
        ) from None
    for (i, cands, _, shares), j in zip(free, picked):
        e = entries[i]
        entries[i] = _entry(list(e.aliases), e.param, cands[j], shares, e.why, amsgrad)
    slack = 0 if exact else len(free) * unit
    return Plan(entries, budget, max_error, calibration_steps, exact, slack)


def _errors_for(errors, names, shape, top) -> tuple[list[float], bool]:
    """``(share per level 0..top, measured?)`` for one tensor; the prior when unmeasured."""
    found = None
    if errors is not None:
        key = next((a for a in names if a in errors), None)
        if key is not None:
            found = errors.errors(key) if isinstance(errors, ErrorMeter) else errors[key]
    if found is None:
        return [white_noise_error(shape, lv) for lv in range(top + 1)], False
    found = [float(x) for x in found]
    if len(found) <= min(top, max_useful_level(shape)):
        raise ValueError(
            f"plan: errors for {names[0]} stop at level {len(found) - 1}; levels up to {top} "
            "were asked for (build the ErrorMeter with a larger max_level)"
        )
    # past ceil(log2 n) one block spans the row: deeper levels repeat the last useful one
    return found + [found[-1]] * (top + 1 - len(found)), True


def _entry(names, p, level, shares, why, amsgrad) -> PlanEntry:
    c = cost(p.shape, level, param_dtype=p.dtype, amsgrad=amsgrad)
    return PlanEntry(
        name=names[0],
        aliases=tuple(names),
        shape=tuple(p.shape),
        numel=p.numel(),
        level=c.level,
        state_bytes=c.state_bytes,
        adamw_state_bytes=c.adamw_state_bytes,
        step_bytes=c.step_bytes,
        adamw_step_bytes=c.adamw_step_bytes,
        error=shares[min(c.level, len(shares) - 1)],
        why=why,
        param=p,
    )


# ---------------------------------------------------------------------------- calibration
def _model_params(model: nn.Module, keep_modules: Callable[[nn.Module], bool] | None):
    """``(name, param)`` with tied names repeated, and the tensors the module rule keeps."""
    named = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    keep = [
        p
        for m in model.modules()
        if keep_modules is not None and keep_modules(m)
        for p in m.parameters(recurse=False)
    ]
    return named, keep


def _canonical(named_params: Iterable[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """One ``(first name, tensor)`` per tensor: a tied weight's gradient is fed once."""
    seen: dict[int, tuple[str, Tensor]] = {}
    for name, p in named_params:
        seen.setdefault(id(p), (name.split("|")[0], p))
    return list(seen.values())


def calibrate_meter(
    model: nn.Module,
    calibrate: Callable[[nn.Module], object] | Iterable[Mapping[str, Tensor]],
    *,
    steps: int = 8,
    max_level: int = 8,
    meter: ErrorMeter | None = None,
) -> ErrorMeter:
    """Measure residual shares from ``model``'s gradients.

    ``calibrate`` is either a callable, run exactly ``steps`` times as ``calibrate(model)`` (one
    forward and backward each; every ``.grad`` is cleared before each call and the user's grads
    are put back afterwards; no optimizer step runs, so all steps see the current weights), or
    an iterable of ``{name: grad}`` mappings, each fed once (``steps`` is ignored).
    """
    meter = ErrorMeter(max_level) if meter is None else meter
    named = _canonical(_model_params(model, None)[0])
    if not callable(calibrate):
        first = {id(p): c for c, p in named}
        alias = {
            n: first[id(p)]
            for n, p in model.named_parameters(remove_duplicate=False)
            if id(p) in first
        }
        for grads in calibrate:
            for name, g in grads.items():
                meter.update(alias.get(name, name), g)
        return meter
    saved = [(p, p.grad) for _, p in named]
    try:
        for _ in range(steps):
            for _, p in named:
                p.grad = None
            calibrate(model)
            meter.update_from(named)
    finally:
        for p, g in saved:
            p.grad = g
    return meter


def plan(
    model: nn.Module,
    *,
    budget: float | None = None,
    max_error: float | None = None,
    calibrate: Callable[[nn.Module], object]
    | Iterable[Mapping[str, Tensor]]
    | ErrorMeter
    | None = None,
    steps: int = 8,
    levels: Iterable[int] = DEFAULT_LEVELS,
    keep_unfolded: Iterable[str] = KEEP_UNFOLDED,
    keep_modules: Callable[[nn.Module], bool] | None = keeps_module,
    fold_anyway: Iterable[str] = (),
    fixed: Mapping[str, int] | None = None,
    amsgrad: bool = False,
    resolution: int = 1 << 16,
) -> Plan:
    """Choose a fold level for every trainable parameter of ``model``.

    ``budget``: FOAM's optimizer state as a fraction of AdamW's float32 state over these
    parameters (kept ones included); the plan minimises the error within it. ``max_error``:
    bound on the element-weighted mean residual share; the plan minimises the state within it
    (and within ``budget`` if given too). ``calibrate``: a callable run ``steps`` times (default
    8 forward+backward passes, see :func:`calibrate_meter`), precomputed ``{name: grad}``
    mappings, or a filled :class:`ErrorMeter`; ``None`` plans on the white-noise prior, which
    only knows sizes. Embeddings and norms (``keep_modules``) and names matching
    ``keep_unfolded`` stay at level 0 unless they match ``fold_anyway``; ``fixed`` pins levels
    by name; tied weights get one level and count once. Other arguments: :func:`plan_params`.
    """
    levels = list(levels)
    named, keep = _model_params(model, keep_modules)
    meter = (
        calibrate
        if isinstance(calibrate, ErrorMeter) or calibrate is None
        else (calibrate_meter(model, calibrate, steps=steps, max_level=max(levels)))
    )
    done = 0 if meter is None else max((meter.steps(k) for k in meter.keys()), default=0)
    return plan_params(
        named,
        meter,
        budget=budget,
        max_error=max_error,
        levels=levels,
        keep_unfolded=keep_unfolded,
        fold_anyway=fold_anyway,
        keep=keep,
        fixed=fixed,
        amsgrad=amsgrad,
        resolution=resolution,
        calibration_steps=done,
    )


class AutoTuner:
    """``level="auto"``: calibrate on the first ``steps`` real steps, then plan once.

    The optimizer calls :meth:`observe` at the start of each ``step()``, while ``.grad`` holds
    this step's gradient. It returns ``None`` until ``steps`` gradients were seen, then the
    :class:`Plan` (once); the optimizer applies it with ``set_levels(plan.levels_by_param())``
    before updating, so that step already runs at the planned levels. Only a few scalars per
    parameter are kept meanwhile. Planning arguments as :func:`plan_params`; with ``model``,
    names and the module rule come from it.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, Tensor]],
        *,
        steps: int = 8,
        model: nn.Module | None = None,
        keep_modules: Callable[[nn.Module], bool] | None = keeps_module,
        **plan_kw,
    ):
        if steps < 1:
            raise ValueError(f"AutoTuner: steps must be >= 1, got {steps}")
        self.named_params = list(named_params)
        keep = list(plan_kw.pop("keep", ()))
        if model is not None:
            held = {id(p) for _, p in self.named_params}
            named, kept = _model_params(model, keep_modules)
            self.named_params += [(n, p) for n, p in named if id(p) in held]
            keep += kept
        self.plan_kw = dict(plan_kw, keep=keep)
        if self.plan_kw.get("budget") is None and self.plan_kw.get("max_error") is None:
            raise ValueError("AutoTuner: give budget= and/or max_error=")
        self.steps = steps
        self.meter = ErrorMeter(max(self.plan_kw.get("levels", DEFAULT_LEVELS)))
        self.seen = 0
        self.plan: Plan | None = None

    @property
    def done(self) -> bool:
        return self.plan is not None

    def observe(self) -> Plan | None:
        """Feed the current gradients; the Plan on the ``steps``-th call, else ``None``."""
        if self.done:
            return None
        named = _canonical(self.named_params)
        if self.meter.update_from(named):
            self.seen += 1
        if self.seen < self.steps:
            return None
        self.plan = plan_params(
            self.named_params, self.meter, calibration_steps=self.seen, **self.plan_kw
        )
        return self.plan
