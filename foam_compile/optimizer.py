"""``FOAM``: AdamW with moments folded into block means (docs/algorithm.md), as a torch optimizer.

The optimizer owns the folded state: ``state[p]`` holds ``step``, ``exp_avg`` and ``exp_avg_sq``
(and ``max_exp_avg_sq`` with amsgrad) in the folded shape ``[..., ceil(n / 2**level)]``, stored
in a state format (:mod:`foam_compile.state`; float32 by default), plus ``foam_level``, the level
``p`` runs at. Nothing full-size is kept between steps. As in torch.optim, a parameter's state is
created on its first real gradient: frozen parameters never get any.

Which level a parameter gets is chosen when it enters the optimizer (the folding policy of
:mod:`foam_compile.policy`, ``levels=``), kept per parameter in its param group
(:mod:`foam_compile.layout`) and honoured when its state is created.

The class is also the mixin that :func:`foam_compile.convert` puts in front of a stock optimizer
of a known family (:mod:`foam_compile.families`): every method here reads its hyperparameters
from the param groups through the family, with FOAM's defaults for the keys a stock optimizer
lacks, and steps with the family's update.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from . import backends, checkpoint, distributed, layout, master_weights
from .families import Family, family_of
from .hyper import GROUP_DEFAULTS, Hyper, check_level
from .layout import LAYOUT_KEY
from .policy import KEEP_UNFOLDED, nearest_variant, overrides, stochastic_variant
from .reference import folded_shape
from .state import DEFAULT_FORMAT, format_of, get_format

__all__ = [
    "FOAM",
    "FOAM_AUTOTUNE",
    "check_autotune",
    "check_autotune_options",
    "check_params",
    "decide_layouts",
]

log = logging.getLogger("foam_compile")

FOAM_AUTOTUNE = {
    "budget": None,
    "max_error": None,
    "formats": None,
    "steps": 8,
    "model": None,
    "keep_unfolded": None,
}
# Attributes FOAM adds to an optimizer; deepcopy and pickle keep them (``__getstate__``).
_FOAM_ATTRS = ("autotune", "foam_policy", "foam_plan", "_foam_tuner", "_foam_calibrating")


def check_params(groups: Iterable[dict]) -> None:
    """FOAM folds real floating-point tensors. Integer tensors never get a gradient: accepted
    and never stepped, as torch.optim does. Anything not a tensor is left to torch's check."""
    for gi, group in enumerate(groups):
        for pi, p in enumerate(group["params"]):
            if isinstance(p, tuple) and len(p) == 2:  # (name, tensor): torch's named parameters
                p = p[1]
            if isinstance(p, Tensor) and p.is_complex():
                raise ValueError(
                    f"FOAM: {checkpoint.describe(p, gi, pi)} is complex; FOAM folds real tensors "
                    "only. Pass torch.view_as_real(p) as the parameter instead, or keep it in an "
                    "AdamW param group."
                )


def check_levels(levels: Mapping | None, where: str) -> dict | None:
    """``levels=`` (``{name or tensor: level}``) checked where it is given."""
    if levels is None:
        return None
    if not isinstance(levels, Mapping):
        raise TypeError(f"{where}: levels must be a dict {{name or tensor: level}}, got {levels!r}")
    for key, level in levels.items():
        if not isinstance(key, (str, Tensor)):
            raise TypeError(f"{where}: levels keys must be parameter names or tensors, got {key!r}")
        what = key if isinstance(key, str) else f"the tensor of shape {list(key.shape)}"
        check_level(level, f"{where}: levels[{what!r}]", auto=False)
    return dict(levels)


def check_state_formats(formats: Mapping | None, where: str) -> dict | None:
    """``state_formats=`` (``{name or tensor: format}``) checked where it is given."""
    if formats is None:
        return None
    if not isinstance(formats, Mapping):
        raise TypeError(
            f"{where}: state_formats must be a dict {{name or tensor: format}}, got {formats!r}"
        )
    for key, name in formats.items():
        if not isinstance(key, (str, Tensor)):
            raise TypeError(
                f"{where}: state_formats keys must be parameter names or tensors, got {key!r}"
            )
        what = key if isinstance(key, str) else f"the tensor of shape {list(key.shape)}"
        get_format(name, f"{where}: state_formats[{what!r}]")
    return dict(formats)


def decide_layouts(groups: list[dict], policy: Mapping[str, Any], decided, *, lookup: bool) -> int:
    """Run the folding policy for the parameters of ``groups`` not in ``decided`` (a
    ``WeakIdKeyDictionary``), record its choices in their layouts and add them to ``decided``;
    returns how many it decided.

    With ``lookup=False`` only what needs no heap scan is decided (0-d/1-d tensors, explicit
    ``levels`` by tensor, named parameters (torch's ``param_names``), a given ``model``); the
    rest waits until a level is first needed. ``decided`` is bookkeeping only, never saved: a
    parameter the policy leaves to its group has no layout entry either way.
    """
    levels = policy.get("levels") or {}
    formats = policy.get("state_formats") or {}
    model = policy.get("model")
    by_tensor = {id(k) for k in levels if isinstance(k, Tensor)}
    fmt_by_name = any(isinstance(k, str) for k in formats)
    todo, names = [], {}
    for group in groups:
        given = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if not isinstance(p, Tensor) or p in decided:
                continue
            if given is not None and i < len(given):
                names[id(p)] = given[i]
            named_now = id(p) in names
            needs_names = not named_now and (
                (p.dim() >= 2 and id(p) not in by_tensor) or fmt_by_name
            )
            if needs_names and model is None and not lookup:
                continue
            todo.append((group, i, p))
    if not todo:
        return 0
    explicit: set[int] = set()
    chosen_formats: dict[int, str] = {}
    stochastic: set[int] = set()
    pinned = overrides(
        [p for _, _, p in todo],
        names=names,
        model=model,
        levels=levels,
        keep_unfolded=policy.get("keep_unfolded", KEEP_UNFOLDED),
        explicit=explicit,
        formats=formats,
        chosen_formats=chosen_formats,
        stochastic=stochastic,
    )
    for group, i, p in todo:
        # levels=/state_formats= given now win; then a choice already recorded (a
        # checkpoint's, a plan's, set_levels'); then the policy's.
        entry = layout.choice(group, i)
        if pinned[id(p)] is not None and ("level" not in entry or id(p) in explicit):
            layout.record(group, i, level=pinned[id(p)])
        if id(p) in chosen_formats:
            layout.record(group, i, format=chosen_formats[id(p)])
        elif id(p) in stochastic and "stochastic" not in entry:
            layout.record(group, i, stochastic=True)
        decided[p] = True
    return len(todo)


class FOAM(torch.optim.Optimizer):
    """AdamW whose two moments are stored as block means over ``2**level`` elements.

    Args mirror ``torch.optim.AdamW`` (``params`` may be named: ``model.named_parameters()``);
    in addition, per param group:

    - ``level``: fold level ``l``; blocks of ``2**l`` consecutive elements along the last dim
      (0 = AdamW exactly; 0-d and 1-d parameters always run at level 0). Changing a group's
      ``level`` between steps re-folds its moments at the next step.
    - ``scale``: FOAM's alpha, multiplies the step of this group's folded parameters (level 0
      parameters take AdamW's step unscaled, as in the paper's recipe).
    - ``res_scale``: FOAM's rho, weight of the current gradient's residual.
    - ``decoupled_weight_decay``: ``True`` for AdamW's decoupled decay, ``False`` for Adam's
      coupled L2 decay (``g += weight_decay * p``), as in ``torch.optim.Adam``.
    - ``master_weights``: ``None`` (default), ``"int8"`` or ``"int16"``: bfloat16/float16
      parameters get correction bits in their state (``"master_rho"``), so that the optimizer
      steps a 24-bit (int8) or 32-bit (int16) weight while the model holds 16 bits
      (:mod:`foam_compile.master_weights`; float32 parameters need none and get none).
    - ``state_format``: how the moments are stored, one of :mod:`foam_compile.state`'s names:
      ``"fp32"`` (default), ``"int8"``, ``"int4"`` (block-scaled codes, round to nearest) or
      ``"int8-sr"``, ``"int4-sr"`` (stochastic rounding). With a quantized format, embeddings
      and the output head take its stochastic variant (:mod:`foam_compile.policy`).
      ``state_formats={name or tensor: format}`` pins formats per parameter (it wins over that
      default). Changing a group's ``state_format`` between steps re-encodes its moments at the
      next step. ``load_state_dict`` keeps a checkpoint's formats unless the group's
      ``state_format`` was given (even ``"fp32"``): then it re-encodes into that format.

    The folding policy (:mod:`foam_compile.policy`) keeps embeddings, the output head and norms
    at level 0, by name: names come from named parameters, ``model=``, or the live module that
    owns each tensor; ``levels={name or tensor: level}`` pins levels; ``keep_unfolded`` (name
    patterns) replaces the default patterns. A tensor no module owns folds at its group's level.

    State is float32 whatever the parameter dtype (float64 parameters keep float64 state).

    ``level="auto"`` picks a level per parameter from real gradients: the first
    ``calibration_steps`` steps run at level 0 (exactly AdamW) while the residual energy of each
    candidate level is measured, then :func:`foam_compile.plan` chooses levels under ``budget``
    (state as a fraction of AdamW's, in (0, 1)) and/or ``max_error``, the moments are folded,
    and the plan's report is logged once (logger ``foam_compile``; the plan is kept in
    ``optimizer.foam_plan``). ``formats`` (e.g. ``("fp32", "int8")``) lets the plan pick each
    parameter's state format too (default: every parameter keeps its group's format); a plan's
    quantized format on an embedding or the head is rounded stochastically, as above.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        level: int | str = 2,
        scale: float = 1.0,
        res_scale: float = 1.0,
        amsgrad: bool = False,
        maximize: bool = False,
        decoupled_weight_decay: bool = True,
        capturable: bool = False,
        budget: float | None = None,
        max_error: float | None = None,
        calibration_steps: int = 8,
        model: nn.Module | None = None,
        levels: Mapping[str | Tensor, int] | None = None,
        keep_unfolded: Iterable[str] | None = KEEP_UNFOLDED,
        master_weights: str | None = None,
        state_format: str | None = None,
        state_formats: Mapping[str | Tensor, str] | None = None,
        formats: Iterable[str] | None = None,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            level=level,
            scale=scale,
            res_scale=res_scale,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            capturable=capturable,
            master_weights=master_weights,
        )
        if state_format is not None:  # absent means fp32: default state dicts unchanged
            defaults["state_format"] = state_format
        Hyper.from_group(defaults)
        formats = check_autotune_options(
            "FOAM",
            budget=budget,
            max_error=max_error,
            calibration_steps=calibration_steps,
            formats=formats,
        )
        # Set before super().__init__, which adds the param groups through add_param_group.
        self.foam_policy = dict(
            model=model,
            levels=check_levels(levels, "FOAM"),
            keep_unfolded=keep_unfolded,
            state_formats=check_state_formats(state_formats, "FOAM"),
        )
        self.autotune = dict(
            FOAM_AUTOTUNE,
            budget=budget,
            max_error=max_error,
            formats=formats,
            steps=int(calibration_steps),
            model=model,
            keep_unfolded=keep_unfolded,
        )
        super().__init__(params, defaults)
        _check_autotune(self, given=True)

    @property
    def foam_family(self) -> Family:
        """The optimizer family whose update this optimizer runs (AdamW for ``FOAM`` itself)."""
        return family_of(self) or family_of(torch.optim.AdamW)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)  # may be a generator
        param_group["params"] = params
        group = {**getattr(self, "defaults", {}), **param_group}
        check_params([{"params": params}])
        if "lr" in group:
            self.foam_family.hyper(group)
        backends.prepare([p for p in params if isinstance(p, Tensor)])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group[LAYOUT_KEY] = dict(group.get(LAYOUT_KEY) or {})
        decide_layouts([group], self._policy(), self._decided(), lookup=False)

    def _policy(self) -> dict:
        return getattr(self, "foam_policy", None) or {"keep_unfolded": KEEP_UNFOLDED}

    def _decided(self) -> WeakIdKeyDictionary:
        """The parameters the policy has run for (bookkeeping; dropped by copies, which run it
        again for their own tensors)."""
        if "_foam_decided" not in self.__dict__:
            self._foam_decided = WeakIdKeyDictionary()
        return self._foam_decided

    def _decide_all(self) -> None:
        decide_layouts(self.param_groups, self._policy(), self._decided(), lookup=True)

    # ----------------------------------------------------------------------------- state
    def _new_state(self, p: Tensor, group: dict, index: int) -> dict:
        hp = self.foam_family.hyper(group)
        fmt = get_format(layout.format_for(group, index, DEFAULT_FORMAT))
        state = checkpoint.new_state(
            p,
            layout.level_for(group, index, p),
            self.foam_family.moments(hp),
            fmt,
            checkpoint.step_device(p, group),
        )
        master_weights.reconcile_(p, state, hp.master_weights, "a new parameter")
        return state

    def _decide_when_needed(self, group: dict, index: int, p: Tensor) -> None:
        """Run the policy (one heap scan for every undecided parameter) if ``p``'s level
        depends on names it has not been given yet."""
        if p.dim() < 2 or p in self._decided():
            return
        policy = self._policy()
        by_name = [k for key in ("levels", "state_formats") for k in policy.get(key) or {}]
        quantized = group.get("state_format", DEFAULT_FORMAT) != DEFAULT_FORMAT
        if (
            layout.group_level(group) == 0
            and not quantized
            and not any(isinstance(k, str) for k in by_name)
        ):
            return  # nothing the policy says can change a level-0 fp32 group's parameter
        self._decide_all()

    def _init_group(self, group, params, grads, tensors, slots):
        """Collect this group's tensors, creating state on first use.

        Dynamo runs this method eagerly (its ``OptimizerVariable``) and gives a source to each
        tensor appended to the list arguments, so the state comes out flat: ``slots[i]`` is
        ``(level, format name, keys)`` of parameter ``i``, whose state tensors are the next
        ``len(keys)`` entries of ``tensors``. Everything is checked here, before any write.
        """
        gi = next((i for i, g in enumerate(self.param_groups) if g is group), 0)
        hp = self.foam_family.hyper(group)
        moments = self.foam_family.moments(hp)
        self._check_level_change(group, gi)
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            what = checkpoint.describe(p, gi, pi)
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"FOAM: {what} has a sparse gradient; FOAM needs dense gradients (use "
                    "torch.optim.SparseAdam for sparse embeddings)."
                )
            if not p.is_floating_point():
                raise RuntimeError(f"FOAM: {what} has a gradient but is not floating point")
            state = self.state[p]
            self._decide_when_needed(group, pi, p)
            if len(state) == 0:
                state.update(self._new_state(p, group, pi))
            elif "foam_level" not in state:
                raise RuntimeError(
                    f"FOAM: the state of {what} has no 'foam_level'; it was written by another "
                    "optimizer. Load it with load_state_dict(), which folds stock AdamW/Adam "
                    "moments."
                )
            master_weights.reconcile_(p, state, hp.master_weights, what)
            level, fmt = state["foam_level"], format_of(state)
            target_fmt = get_format(layout.format_for(group, pi, DEFAULT_FORMAT), what)
            if hp.amsgrad and "max_exp_avg_sq" not in state:  # amsgrad switched on mid-run
                v = distributed.format_decode(fmt, state, "exp_avg_sq", "square", p).clone()
                state.update(
                    distributed.format_encode(fmt, v, p, level, "max_exp_avg_sq", "square")
                )
            shape = folded_shape(p.shape, level)
            for key, _kind in moments:
                why = fmt.check(state, key, p, shape)
                if why is not None:
                    raise RuntimeError(f"FOAM: {key} of {what} {why} for level {level}")
            target = layout.level_for(group, pi, p)
            if level != target or fmt.name != target_fmt.name:
                # The group's level or state format was changed: re-fold and/or re-encode.
                state_now = checkpoint.relayout(p, state, moments, level=target, fmt=target_fmt)
                log.info(
                    "foam: %s moved from level %d (%s) to %d (%s)",
                    what,
                    level,
                    fmt.name,
                    target,
                    target_fmt.name,
                )
                state.clear()
                state.update(state_now)
                level, fmt = target, target_fmt
            keys = ["step"] + [k for key, _kind in moments for k in fmt.keys(key)]
            if master_weights.RHO_KEY in state:
                keys.append(master_weights.RHO_KEY)
            params.append(p)
            grads.append(p.grad)
            tensors.extend(state[k] for k in keys)
            slots.append((level, fmt.name, tuple(keys)))
        return False

    def _check_level_change(self, group: dict, gi: int) -> None:
        """``level='auto'`` is armed where it is given; set on a group later, nothing would
        calibrate it."""
        if (
            group.get("level") == "auto"
            and not group.get("auto_planned")
            and not getattr(self, "_foam_calibrating", False)
        ):
            raise ValueError(
                f"FOAM: param group {gi} was set to level='auto' after the optimizer was built; "
                "'auto' calibrates from the first steps, so give it to FOAM(...) or "
                "foam_compile.convert(...) (with budget= and/or max_error=), or set an int level."
            )

    @torch.no_grad()
    def step(self, closure=None):
        """One FOAM step. All inputs are checked before any tensor is written."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if getattr(self, "_foam_calibrating", False):
            _calibrate_outside_compile()(self)  # a compiled step breaks its graph here
        batches = []
        for group in self.param_groups:
            hp = self.foam_family.hyper(group)
            params, grads, tensors, slots = [], [], [], []
            self._init_group(group, params, grads, tensors, slots)
            batches.append((hp, params, grads, _states(tensors, slots)))
        for hp, params, grads, states in batches:
            if params:
                self.foam_family.update(params, grads, states, hp=hp)
        return loss

    # ------------------------------------------------------------------------ levels
    def _calibrate(self) -> None:
        """``level='auto'``: feed this step's gradients to the tuner; fold once it has a plan."""
        tuner = getattr(self, "_foam_tuner", None)
        if tuner is None:
            tuner = self._foam_tuner = _make_tuner(self)
        plan = tuner.observe()
        if plan is not None:
            if self.autotune.get("formats"):
                self._apply_layouts(plan.layouts_by_param())
            else:
                self.set_levels(plan.levels_by_param())
            self.foam_plan = plan
            self._foam_calibrating = False
            for group in self.param_groups:  # saved with the checkpoint: resuming won't re-plan
                if group.get("level") == "auto":
                    group["auto_planned"] = True
            log.info("foam: level='auto' plan after %d steps\n%s", tuner.seen, plan.report())

    @torch.no_grad()
    def set_levels(self, levels: dict[Tensor, int]) -> None:
        """Pin parameters to new fold levels, refolding the moments they have.

        Going deeper (``new >= old``) keeps the moments' block means; going shallower unfolds
        them (each element gets its block's mean). A parameter without state yet gets it at its
        new level on its first gradient. Used by the planner's ``level='auto'``.
        """
        index = {p: (g, i) for g in self.param_groups for i, p in enumerate(g["params"])}
        for p, level in levels.items():  # check everything before changing anything
            if p not in index:
                raise ValueError(
                    f"set_levels: a tensor of shape {list(p.shape)} is not in this optimizer"
                )
            if (
                isinstance(level, bool)
                or not isinstance(level, numbers.Integral)
                or not 0 <= level <= 16
            ):
                raise ValueError(
                    f"set_levels: invalid level {level!r} for the parameter of shape "
                    f"{list(p.shape)}; use an int in [0, 16]"
                )
        for p, level in levels.items():
            group, i = index[p]
            layout.record(group, i, level=int(level))
            state = self.state.get(p)
            if state:
                moments = self.foam_family.moments(self.foam_family.hyper(group))
                new = checkpoint.relevel(p, state, layout.level_for(group, i, p), moments)
                state.clear()
                state.update(new)

    def _apply_layouts(self, layouts: dict[Tensor, tuple[int, str]]) -> None:
        """A ``level='auto'`` plan with formats: each parameter's level, and its format where it
        differs from what its group and the policy give (stochastic for embeddings/the head).
        A format pinned by ``state_formats=`` is kept."""
        self._decide_all()
        index = {p: (g, i) for g in self.param_groups for i, p in enumerate(g["params"])}
        for p, (level, fmt) in layouts.items():
            if p not in index:
                continue
            group, i = index[p]
            entry = layout.choice(group, i)
            name = stochastic_variant(fmt) if entry.get("stochastic") else fmt
            same = "format" in entry or name == layout.format_for(group, i, DEFAULT_FORMAT)
            self._set_layout(p, level=level, state_format=None if same else name)

    @torch.no_grad()
    def _set_layout(self, p: Tensor, *, level: int | None = None, state_format=None) -> None:
        """Internal (users give ``state_format=``/``state_formats=``; plans use it): record that
        ``p``'s moments live at ``level`` and in the state format named ``state_format``
        (``None``: keep), and re-encode the state it already has. Without state, the choice is
        honoured when the first gradient creates it."""
        where = next(
            ((g, i) for g in self.param_groups for i, q in enumerate(g["params"]) if q is p), None
        )
        if where is None:
            raise ValueError(
                f"_set_layout: a tensor of shape {list(p.shape)} is not in this optimizer"
            )
        group, index = where
        fmt = None if state_format is None else get_format(state_format, "_set_layout")
        if level is not None:
            level = check_level(level, "_set_layout", auto=False)
        chosen = {"level": level, "format": None if fmt is None else fmt.name}
        layout.record(group, index, **{k: v for k, v in chosen.items() if v is not None})
        state = self.state.get(p)
        if state:
            moments = self.foam_family.moments(self.foam_family.hyper(group))
            new = checkpoint.relayout(p, state, moments, level=level, fmt=fmt)
            state.clear()
            state.update(new)

    # -------------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a FOAM checkpoint, or a stock AdamW/Adam one (its full-size moments are folded
        at each parameter's level under the folding policy).

        torch's order is kept: load_state_dict pre-hooks see (and may replace) the state dict
        before FOAM checks it; post-hooks run once FOAM's state is in place. Everything is
        checked before the optimizer changes; on error the state is untouched.

        The checkpoint's options win, as in torch, except a ``state_format`` this optimizer's
        group was given: moments saved in another format are re-encoded into it (a run resumed
        with ``state_format="int8"`` keeps int8 moments whatever the checkpoint holds; one built
        without the option takes the checkpoint's formats).
        """
        state_dict = state_dict.copy()  # shallow, as torch does
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = _with_group_formats(state_dict, self.param_groups)
        if any("foam_level" not in st for st in dict(state_dict.get("state", {})).values()):
            self._decide_all()  # stock moments are folded at each parameter's level
        family = self.foam_family
        prepared, tensors = checkpoint.prepare_load(
            self,
            state_dict,
            where="FOAM.load_state_dict",
            moments_of_group=lambda g: family.moments(family.hyper(g)),
        )
        kept = [  # state_format is the loading optimizer's already (_with_group_formats)
            {
                **{k: g.get(k, v) for k, v in GROUP_DEFAULTS.items() if k != "state_format"},
                LAYOUT_KEY: g.get(LAYOUT_KEY),
            }
            for g in self.param_groups
        ]
        pre, post = (
            self._optimizer_load_state_dict_pre_hooks,
            self._optimizer_load_state_dict_post_hooks,
        )
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()  # ran above
        self._optimizer_load_state_dict_post_hooks = OrderedDict()  # run below, on FOAM's state
        try:
            super().load_state_dict(prepared)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        for group, keys in zip(self.param_groups, kept):
            for k, v in keys.items():
                if group.get(k) is None and v is not None:
                    group[k] = v
            group[LAYOUT_KEY] = dict(group.get(LAYOUT_KEY) or {})
        # torch casts floating state to the parameter dtype; FOAM keeps its own dtypes.
        from .distributed import like_param

        for p, st in self.state.items():
            for key, value in tensors.get(p, {}).items():
                if isinstance(value, Tensor):
                    value = like_param(value.to(device=p.device), p, st.get("foam_level", 0))
                st[key] = value
        self._pin_loaded_levels()
        self._reencode_loaded_formats()
        self._foam_decided = WeakIdKeyDictionary()  # the loaded layouts are the record now
        if not hasattr(self, "autotune"):
            self.autotune = dict(FOAM_AUTOTUNE)
        _check_autotune(self)
        for hook in list(post.values()):
            hook(self)

    def _pin_loaded_levels(self) -> None:
        """A checkpoint's levels win: pin each loaded state's level where it differs from what
        the layout says (e.g. a checkpoint of an optimizer whose group level was changed)."""
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                st = self.state.get(p)
                if st and "foam_level" in st and st["foam_level"] != layout.level_for(group, i, p):
                    layout.record(group, i, level=st["foam_level"])

    def _reencode_loaded_formats(self) -> None:
        """Moments loaded in another format than their layout now says are re-encoded."""
        family = self.foam_family
        for group in self.param_groups:
            moments = family.moments(family.hyper(group))
            for i, p in enumerate(group["params"]):
                st = self.state.get(p)
                if not st or "foam_level" not in st:
                    continue
                fmt = get_format(layout.format_for(group, i, DEFAULT_FORMAT))
                if fmt.name != format_of(st).name:
                    new = checkpoint.relayout(p, st, moments, fmt=fmt)
                    st.clear()
                    st.update(new)

    # --------------------------------------------------------------------- copy, pickle
    def __getstate__(self) -> dict[str, Any]:
        """torch keeps only defaults, state and param groups; FOAM's own attributes (the
        calibration of ``level='auto'``, the policy) go too. The policy's ``model`` does not:
        copying an optimizer should not copy the network."""
        state = super().__getstate__()
        for key in _FOAM_ATTRS:
            if key in self.__dict__:
                state[key] = self.__dict__[key]
        for key in ("foam_policy", "autotune"):
            if isinstance(state.get(key), dict) and state[key].get("model") is not None:
                state[key] = {**state[key], "model": None}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_foam_calibrating" in state and state["_foam_calibrating"]:
            _calibrate_outside_compile()


def _with_group_formats(state_dict: dict, groups: list[dict]) -> dict:
    """``state_dict`` with each saved param group's ``state_format`` replaced by the loading
    optimizer's where that group was given one (a malformed state dict is returned as it is:
    ``prepare_load`` says why)."""
    saved = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(saved, list) or len(saved) != len(groups):
        return state_dict
    if not all(isinstance(g, dict) for g in saved):
        return state_dict
    new = [
        {**s, "state_format": g["state_format"]} if g.get("state_format") else s
        for s, g in zip(saved, groups)
    ]
    return {**state_dict, "param_groups": new}


def _states(tensors: list[Tensor], slots: list[tuple]) -> list[dict]:
    """The per-parameter state dicts :func:`foam_compile.functional.foam_adam_` takes."""
    states, at = [], 0
    for level, fmt, keys in slots:
        st = dict(zip(keys, tensors[at : at + len(keys)]))
        st["foam_level"] = level
        st["foam_format"] = fmt
        states.append(st)
        at += len(keys)
    return states


# FOAM._calibrate wrapped by torch.compiler.disable, made when a level='auto' group is armed:
# wrapping imports Dynamo, which plain training should not pay for at `import foam_compile`.
_CALIBRATE: list = [None]


def _finite(value) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(float(value))
    )


def check_autotune_options(
    where: str, *, budget=None, max_error=None, calibration_steps=8, formats=None
) -> tuple[str, ...] | None:
    """``level='auto'``'s options, each checked where it is given (FOAM, convert, backend);
    returns ``formats`` as a tuple (``None``: not given)."""
    if budget is not None and not (_finite(budget) and 0 < budget < 1):
        raise ValueError(
            f"{where}: invalid budget={budget!r}; it is FOAM's optimizer state as a fraction of "
            "AdamW's, in (0, 1) (e.g. 0.3); budget >= 1 would keep every parameter at level 0"
        )
    if max_error is not None and not (_finite(max_error) and max_error >= 0):
        raise ValueError(
            f"{where}: invalid max_error={max_error!r}; it bounds the mean share of gradient "
            "energy the fold discards: a finite number >= 0 (e.g. 0.5)"
        )
    if (
        isinstance(calibration_steps, bool)
        or not isinstance(calibration_steps, numbers.Integral)
        or calibration_steps < 1
    ):
        raise ValueError(
            f"{where}: invalid calibration_steps={calibration_steps!r}; use an int >= 1"
        )
    if formats is None:
        return None
    if isinstance(formats, str) or not isinstance(formats, Iterable):
        raise TypeError(
            f"{where}: formats must be a list of state formats for level='auto' to choose "
            f"from, e.g. ('fp32', 'int8'); got {formats!r}"
        )
    formats = tuple(formats)
    if not formats:
        raise ValueError(f"{where}: formats is empty; give e.g. ('fp32', 'int8')")
    for name in formats:
        get_format(name, f"{where}: formats")
    return formats


def check_autotune(
    where: str, *, auto: bool, budget=None, max_error=None, calibration_steps=8, formats=None
) -> None:
    """Check ``level='auto'``'s options and that they go with a ``level='auto'``."""
    check_autotune_options(
        where,
        budget=budget,
        max_error=max_error,
        calibration_steps=calibration_steps,
        formats=formats,
    )
    if not auto:
        if budget is not None or max_error is not None or formats is not None:
            raise ValueError(
                f"{where}: budget=, max_error= and formats= choose the levels (and formats) of "
                "level='auto' only; pass level='auto' with them, or drop them for a fixed level "
                "(state_format= sets a fixed format)"
            )
        return
    if budget is None and max_error is None:
        raise ValueError(
            f"{where}: level='auto' needs budget= (optimizer state as a fraction of AdamW's, "
            "e.g. 0.3) and/or max_error= (e.g. 0.5); or give an int level."
        )


def _check_autotune(opt, where: str = "FOAM", *, given: bool = False) -> None:
    """Arm the calibration of ``level='auto'`` groups (also used by ``convert``). ``given``:
    the options were just given (construction, convert), so unused ones are an error."""
    auto = any(g.get("level") == "auto" and not g.get("auto_planned") for g in opt.param_groups)
    check_autotune(
        where,
        auto=auto,
        budget=opt.autotune.get("budget") if auto or given else None,
        max_error=opt.autotune.get("max_error") if auto or given else None,
        formats=opt.autotune.get("formats") if auto or given else None,
        calibration_steps=opt.autotune.get("steps", 8),
    )
    if auto and given and opt.autotune.get("budget") is not None:
        _check_budget_reachable(opt, where)
    if auto:
        _calibrate_outside_compile()
    opt._foam_calibrating = auto


def _calibrate_outside_compile():
    """``FOAM._calibrate`` under ``torch.compiler.disable``: Python on the side of a step."""
    if _CALIBRATE[0] is None:
        _CALIBRATE[0] = torch.compiler.disable(FOAM._calibrate)
    return _CALIBRATE[0]


def _auto_params(opt) -> tuple[list[tuple[str, Tensor]], list[Tensor], dict[str, int], dict]:
    """``level='auto'``'s trainable parameters with names, the ones the policy keeps at level 0,
    the ones pinned to another level and each one's stored format (both by first name)."""
    from .discovery import parameter_names

    opt._decide_all()
    items = [
        (g, i, p)
        for g in opt.param_groups
        if g.get("level") == "auto"
        for i, p in enumerate(g["params"])
        if p.requires_grad
    ]
    given = {id(p): g["param_names"][i] for g, i, p in items if g.get("param_names") is not None}
    unnamed = [p for _, _, p in items if id(p) not in given]
    names = {**parameter_names(unnamed, opt.autotune.get("model")), **given} if unnamed else given
    named = [(names.get(id(p)) or f"param{k}", p) for k, (_, _, p) in enumerate(items)]
    keep, fixed, formats = [], {}, {}
    for (name, p), (g, i, _) in zip(named, items):
        first = name.split("|")[0]
        level = layout.choice(g, i).get("level")
        if level == 0:
            keep.append(p)
        elif level is not None:
            fixed[first] = level
        formats[first] = nearest_variant(layout.format_for(g, i, DEFAULT_FORMAT))
    return named, keep, fixed, formats


def _planner_options(opt, keep, fixed, formats) -> dict:
    """The planner's arguments. Without ``formats=`` to choose from, each parameter is priced
    in the format it is stored in (its group's or its own), so a budget holds for the bytes
    the plan leaves, not for float32 ones."""
    kw = {k: opt.autotune[k] for k in ("budget", "max_error") if opt.autotune.get(k) is not None}
    kw["keep"] = keep
    kw["fixed"] = fixed
    kw["keep_unfolded"] = tuple(opt._policy().get("keep_unfolded") or ())
    if opt.autotune.get("formats"):
        kw["formats"] = tuple(opt.autotune["formats"])
    else:
        kw["fixed_formats"] = formats
    return kw


def _check_budget_reachable(opt, where: str) -> None:
    """A ``budget`` below the least state these parameters can have fails now, not at the
    end of calibration (the bytes do not depend on the measured errors)."""
    from .planner import plan_params

    named, keep, fixed, formats = _auto_params(opt)
    if not named:
        return
    kw = _planner_options(opt, keep, fixed, formats)
    kw.pop("max_error", None)
    try:
        plan_params(named, None, **kw)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _make_tuner(opt):
    from .planner import AutoTuner

    named, keep, fixed, formats = _auto_params(opt)
    steps = int(opt.autotune.get("steps", 8))
    kw = _planner_options(opt, keep, fixed, formats)
    return AutoTuner(named, steps=steps, model=opt.autotune.get("model"), **kw)
