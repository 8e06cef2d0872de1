"""Choosing a fold level and a state format per parameter: a multiple-choice knapsack.

Each parameter picks exactly one ``(level, format)``; it costs optimizer-state bytes (the sympy
formulas of :mod:`foam_compile.cost_model`, the formats' scales included) and an error: the
gradient energy inside its blocks (:class:`~foam_compile.cost_model.ErrorMeter`) plus the share
of Adam's direction that storing the folded moments in the format changes
(:func:`~foam_compile.cost_model.quantization_errors`; the two are orthogonal, so their shares
add). :func:`plan` minimises the total error under a memory budget, or the memory under an error
bound. The solver is a dynamic programme over a byte axis; see :func:`_solve` for what it
guarantees. By default only ``"fp32"`` is offered (``formats=`` widens the choice).

The total error is the element-weighted mean of the per-parameter shares,
``sum_p numel_p * e_p(level_p, format_p) / sum_p numel_p`` over the planned parameters (each
tensor once): Adam normalises per element, so every element's moment quality counts alike,
however large the layer's gradients.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor, nn

from .cost_model import (
    QUANT_ERROR_PRIOR,
    ErrorMeter,
    GradFeed,
    MomentMeter,
    cost,
    max_useful_level,
    white_noise_error,
)
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
    error: float  # fold_error + quant_error
    why: str  # "planned", "measured" ..., or why the level was not planned
    state_format: str
    fold_error: float  # residual share at ``level`` (measured, or the white-noise prior)
    quant_error: float  # direction share the format changes (measured, or the format's prior)
    quant_measured: bool  # False: quant_error is cost_model.QUANT_ERROR_PRIOR's
    tradeoff: str  # how the chosen option compares with this tensor's neighbouring options
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

    @property
    def formats(self) -> dict[str, str]:
        """Parameter name -> state format, every name of a tied tensor included."""
        return {a: e.state_format for e in self.entries for a in e.aliases}

    def levels_by_param(self) -> dict[Tensor, int]:
        """Tensor -> level, one key per tensor: what ``FOAM.set_levels`` takes."""
        return {e.param: e.level for e in self.entries}

    def layouts_by_param(self) -> dict[Tensor, tuple[int, str]]:
        """Tensor -> ``(level, state format)``, one key per tensor."""
        return {e.param: (e.level, e.state_format) for e in self.entries}

    def apply(self, optimizer) -> None:
        """Move the tensors the optimizer holds to their planned levels (and formats)."""
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if all(e.state_format == "fp32" for e in self.entries):
            levels = self.levels_by_param().items()
            optimizer.set_levels({p: lv for p, lv in levels if id(p) in held})
            return
        for p, (level, fmt) in self.layouts_by_param().items():  # internal until phase 2
            if id(p) in held:
                optimizer._set_layout(p, level=level, state_format=fmt)

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
        """Element-weighted mean error share (folding + quantization) over the planned tensors."""
        total = sum(e.numel for e in self.entries)
        return sum(e.numel * e.error for e in self.entries) / max(total, 1)

    def report(self) -> str:
        """A table: name, shape, level, format, state bytes, AdamW's, the errors, and why that
        ``(level, format)``; then the totals."""
        head = ("name", "shape", "level", "format", "state B", "AdamW B", "fold err")
        head += ("quant err", "why")
        rows = [
            (
                " | ".join(e.aliases),
                "x".join(map(str, e.shape)) or "scalar",
                str(e.level),
                e.state_format,
                f"{e.state_bytes:,}",
                f"{e.adamw_state_bytes:,}",
                f"{e.fold_error:.4f}",
                f"{e.quant_error:.4f}",
                f"{e.why}; {e.tradeoff}" if e.tradeoff else e.why,
            )
            for e in self.entries
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

        def line(cells):  # text columns left-aligned, numbers right-aligned
            return "  ".join(
                c.ljust(w) if i in (0, 1, 3, 8) else c.rjust(w)
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
        qprior = sum(not e.quant_measured for e in self.entries)
        if qprior:
            calib += f"; {qprior} quantization errors from the formats' priors"
        return "\n".join(
            [
                line(head),
                line(["-" * w for w in widths]),
                *map(line, rows),
                "",
                f"state: {_human(self.state_bytes)} vs AdamW {_human(self.adamw_state_bytes)} "
                f"({self.state_fraction:.1%}); {', '.join(limits)}",
                f"error: {self.error:.4f} (element-weighted mean of the folding residual share "
                f"plus the quantization share); {calib}",
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
    choice = np.zeros((len(options), size), dtype=np.int16)
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
    formats: Iterable[str] = ("fp32",),
    quant_errors: MomentMeter | Mapping[str, Mapping[tuple[int, str], float]] | None = None,
    fixed_formats: Mapping[str, str] | None = None,
) -> Plan:
    """Plan levels (and state formats) for ``(name, param)`` pairs from measured errors.

    The same tensor may appear under several names (tied weights; or one name ``"a|b"``): it is
    planned once, counted once and gets one level. ``errors`` maps a name to the residual share
    per level ``0..L`` (an :class:`ErrorMeter`, or a plain mapping); tensors with no entry use
    :func:`~foam_compile.cost_model.white_noise_error`. Rules, strongest first:

    - ``fixed`` (name -> level) pins a tensor's level;
    - 0-d/1-d tensors, tensors in ``keep``, and names matching ``keep_unfolded`` run at level 0,
      unless a name matches ``fold_anyway``;
    - everything else chooses from ``levels``, each capped at ``ceil(log2 n)``.

    Each tensor of 2 dims or more also chooses its state format from ``formats`` (registered
    names, e.g. ``("fp32", "int8", "int4")``); 0-d/1-d tensors stay ``"fp32"`` (they are tiny,
    and FSDP2 shards their only dim, which would split a format's groups). ``fixed_formats``
    (name -> format) pins a tensor's format, whatever its dims: the one it will be stored in
    when the plan chooses only levels. A format's error is
    ``quant_errors[name][(level, format)]`` (a :class:`~foam_compile.cost_model.MomentMeter` or a
    mapping), else :data:`~foam_compile.cost_model.QUANT_ERROR_PRIOR`; it adds to the residual
    share (see :func:`~foam_compile.cost_model.quantization_errors` for why they add).

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
    formats = _check_formats(formats)
    fixed_formats = dict(fixed_formats or {})
    if fixed_formats:
        _check_formats(fixed_formats.values())
    rules = _Rules(keep, keep_unfolded, fold_anyway, fixed, formats, fixed_formats)

    tensors: dict[int, tuple[list[str], Tensor]] = {}
    for name, p in named_params:
        names = tensors.setdefault(id(p), ([], p))[0]
        names += [a for a in name.split("|") if a not in names]
    top = max([levels[-1], *rules.fixed.values()])

    entries, free = [], []  # free: (index in entries, options [(level, fmt)], (bytes, error))
    for names, p in tensors.values():
        shape = tuple(p.shape)
        shares, measured = _errors_for(errors, names, shape, top)
        cands, fmts, why = rules.candidates(names, p, levels, measured)
        quant = _quant_for(quant_errors, names, p, cands, fmts)
        options = [(lv, f) for lv in cands for f in fmts]
        entries.append(_entry(names, p, options[0], shares, quant, why, amsgrad))
        if len(options) > 1:
            costs = [
                cost(shape, lv, param_dtype=p.dtype, amsgrad=amsgrad, state_format=f)
                for lv, f in options
            ]
            opts = [
                (c.state_bytes, p.numel() * (shares[lv] + quant[(c.level, f)]))
                for c, (lv, f) in zip(costs, options)
            ]
            free.append((len(entries) - 1, options, opts, shares, quant))

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
    for (i, layouts, opts, shares, quant), j in zip(free, picked):
        e = entries[i]
        trade = _tradeoff(layouts, opts, j, e.numel)
        entries[i] = _entry(list(e.aliases), e.param, layouts[j], shares, quant, e.why, amsgrad)
        entries[i].tradeoff = trade
    slack = 0 if exact else len(free) * unit
    return Plan(entries, budget, max_error, calibration_steps, exact, slack)


def _check_formats(formats: Iterable[str]) -> list[str]:
    from .state import get_format

    formats = list(dict.fromkeys(formats))
    if not formats:
        raise ValueError("plan: formats must name at least one state format, e.g. ('fp32',)")
    for name in formats:
        get_format(name, "plan")
        if name not in QUANT_ERROR_PRIOR:
            raise ValueError(
                f"plan: no error prior for state_format={name!r}; add it to "
                "cost_model.QUANT_ERROR_PRIOR (measured as benchmarks/quant_codecs.py does)"
            )
    return formats


class _Rules:
    """Which levels and formats a tensor may take, and why (``plan_params``' rules)."""

    def __init__(self, keep, keep_unfolded, fold_anyway, fixed, formats, fixed_formats):
        self.formats = formats
        self.fixed_formats = fixed_formats
        self.keep_ids = {id(t) for t in keep}
        self.keep_re = [re.compile(p) for p in keep_unfolded]
        self.fold_re = [re.compile(p) for p in fold_anyway]
        self.fixed = dict(fixed or {})

    def candidates(self, names, p, levels, measured) -> tuple[list[int], list[str], str]:
        shape = tuple(p.shape)
        pinned = next((self.fixed[a] for a in names if a in self.fixed), None)
        forced = any(r.search(a) for r in self.fold_re for a in names)
        fmt = next((self.fixed_formats[a] for a in names if a in self.fixed_formats), None)
        fmts = self.formats if fmt is None else [fmt]
        if pinned is not None:
            return [int(pinned)], fmts, "fixed"
        if len(shape) < 2:
            return [0], ["fp32"] if fmt is None else fmts, f"{len(shape)}-d"
        if not forced and id(p) in self.keep_ids:
            return [0], fmts, "kept: module"
        if not forced and any(r.search(a) for r in self.keep_re for a in names):
            return [0], fmts, "kept: name"
        cands = sorted({min(lv, max_useful_level(shape)) for lv in levels})
        return cands, fmts, "planned" if measured else "planned (prior)"


def _quant_for(quant_errors, names, p, cands, fmts) -> dict:
    """``(level, format) -> quantization share`` for one tensor: measured, else the prior (the
    key ``"measured"`` says which)."""
    shape = tuple(p.shape)
    found = None
    if quant_errors is not None:
        key = next((a for a in names if a in quant_errors), None)
        if key is not None:
            if isinstance(quant_errors, MomentMeter):
                found = quant_errors.errors(key, cands, fmts)
            else:
                found = quant_errors[key]
    out = {"measured": found is not None}
    for lv in cands:
        level = lv if len(shape) >= 2 else 0
        for f in fmts:
            measured = None if found is None else found.get((level, f))
            out[(level, f)] = QUANT_ERROR_PRIOR[f] if measured is None else float(measured)
    return out


def _tradeoff(layouts, opts, j, numel) -> str:
    """Why option ``j`` and not its neighbours: the best cheaper one and the cheapest better one."""
    b, e = opts[j]
    cheaper = [(e2, i) for i, (b2, e2) in enumerate(opts) if b2 < b]
    better = [(b2, i) for i, (b2, e2) in enumerate(opts) if e2 < e]
    said = []
    if cheaper:
        i = min(cheaper)[1]
        more = (opts[i][1] - e) / numel
        said.append(f"{_layout(layouts[i])} saves {_human(b - opts[i][0])} for +{more:.4f}")
    if better:
        i = min(better)[1]
        less = (e - opts[i][1]) / numel
        said.append(f"{_layout(layouts[i])} costs {_human(opts[i][0] - b)} for -{less:.4f}")
    return "; ".join(said) if said else "cheapest and best"


def _layout(layout: tuple[int, str]) -> str:
    return f"L{layout[0]}/{layout[1]}"


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


def _entry(names, p, layout, shares, quant, why, amsgrad) -> PlanEntry:
    level, fmt = layout
    c = cost(p.shape, level, param_dtype=p.dtype, amsgrad=amsgrad, state_format=fmt)
    fold_error = shares[min(c.level, len(shares) - 1)]
    quant_error = quant.get((c.level, fmt), 0.0)
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
        error=fold_error + quant_error,
        why=why,
        state_format=fmt,
        fold_error=fold_error,
        quant_error=quant_error,
        quant_measured=quant["measured"] or fmt == "fp32",
        tradeoff="",
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
    moments: MomentMeter | None = None,
) -> ErrorMeter:
    """Measure residual shares from ``model``'s gradients.

    ``calibrate`` is either a callable, run exactly ``steps`` times as ``calibrate(model)`` (one
    forward and backward each; every ``.grad`` is cleared before each call and the user's grads
    are put back afterwards; no optimizer step runs, so all steps see the current weights), or
    an iterable of ``{name: grad}`` mappings, each fed once (``steps`` is ignored). ``moments``,
    if given, is fed the same gradients (for the formats' quantization errors).
    """
    meter = ErrorMeter(max_level) if meter is None else meter
    if moments is not None:
        meter = _Both(meter, moments)
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
    return meter.errors_meter if isinstance(meter, _Both) else meter


class _Both(GradFeed):
    """Feeds an :class:`ErrorMeter` and a :class:`MomentMeter` the same gradients."""

    def __init__(self, errors_meter: ErrorMeter, moments: MomentMeter):
        self.errors_meter, self.moments = errors_meter, moments

    def update(self, key, grad) -> None:
        self.errors_meter.update(key, grad)
        self.moments.update(key, grad)


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
    formats: Iterable[str] = ("fp32",),
    betas: tuple[float, float] = (0.9, 0.999),
) -> Plan:
    """Choose a fold level (and a state format) for every trainable parameter of ``model``.

    ``budget``: FOAM's optimizer state as a fraction of AdamW's float32 state over these
    parameters (kept ones included); the plan minimises the error within it. ``max_error``:
    bound on the element-weighted mean residual share; the plan minimises the state within it
    (and within ``budget`` if given too). ``calibrate``: a callable run ``steps`` times (default
    8 forward+backward passes, see :func:`calibrate_meter`), precomputed ``{name: grad}``
    mappings, or a filled :class:`ErrorMeter`; ``None`` plans on the white-noise prior, which
    only knows sizes. Embeddings and norms (``keep_modules``) and names matching
    ``keep_unfolded`` stay at level 0 unless they match ``fold_anyway``; ``fixed`` pins levels
    by name; tied weights get one level and count once. ``formats``: the state formats to
    choose from; with any but ``"fp32"``, a callable or mapping ``calibrate`` also accumulates
    Adam's moments (``betas``; two float32 tensors per parameter while planning) to measure
    each format's quantization error, else the formats' priors are used. Other arguments:
    :func:`plan_params`.
    """
    levels = list(levels)
    named, keep = _model_params(model, keep_modules)
    measure = not isinstance(calibrate, ErrorMeter) and calibrate is not None
    moments = MomentMeter(*betas) if measure and set(formats) - {"fp32"} else None
    meter = (
        calibrate_meter(model, calibrate, steps=steps, max_level=max(levels), moments=moments)
        if measure
        else calibrate
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
        formats=formats,
        quant_errors=moments,
    )


class AutoTuner:
    """``level="auto"``: calibrate on the first ``steps`` real steps, then plan once.

    The optimizer calls :meth:`observe` at the start of each ``step()``, while ``.grad`` holds
    this step's gradient. It returns ``None`` until ``steps`` gradients were seen, then the
    :class:`Plan` (once); the optimizer applies it with ``set_levels(plan.levels_by_param())``
    before updating, so that step already runs at the planned levels. Only a few scalars per
    parameter are kept meanwhile, unless ``formats`` offers more than ``"fp32"``: then Adam's
    moments (``betas``) are accumulated too, for the formats' quantization errors, and dropped
    once planned. Planning arguments as :func:`plan_params`; with ``model``, names and the
    module rule come from it.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, Tensor]],
        *,
        steps: int = 8,
        model: nn.Module | None = None,
        keep_modules: Callable[[nn.Module], bool] | None = keeps_module,
        betas: tuple[float, float] = (0.9, 0.999),
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
        quantized = set(self.plan_kw.get("formats", ("fp32",))) - {"fp32"}
        self.moments = MomentMeter(*betas) if quantized else None
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
        feed = self.meter if self.moments is None else _Both(self.meter, self.moments)
        if feed.update_from(named):
            self.seen += 1
        if self.seen < self.steps:
            return None
        self.plan = plan_params(
            self.named_params,
            self.meter,
            calibration_steps=self.seen,
            quant_errors=self.moments,
            **self.plan_kw,
        )
        self.moments = None  # AdamW-sized: drop it once planned
        return self.plan
