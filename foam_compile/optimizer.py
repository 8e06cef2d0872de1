"""``FOAM``: AdamW with moments folded into block means (ALGORITHM.md), as a torch optimizer.

The optimizer owns the folded state: ``state[p]`` holds ``step``, ``exp_avg`` and ``exp_avg_sq``
(and ``max_exp_avg_sq`` with amsgrad) in the folded shape ``[..., ceil(n / 2**level)]``, stored
in a state format (:mod:`foam_compile.state`; float32 by default), plus ``foam_level``, the level
``p`` runs at. Nothing full-size is kept between steps.

The class is also the mixin that :func:`foam_compile.convert` puts in front of a stock optimizer
of a known family (:mod:`foam_compile.families`): every method here reads its hyperparameters
from the param groups through the family, with FOAM's defaults for the keys a stock optimizer
lacks, and steps with the family's update.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import backends, checkpoint, master_weights
from .families import Family, family_of
from .hyper import GROUP_DEFAULTS, Hyper
from .reference import folded_shape
from .state import format_of

__all__ = ["FOAM", "FOAM_AUTOTUNE", "check_autotune", "check_params"]

log = logging.getLogger("foam_compile")

FOAM_AUTOTUNE = {
    "budget": None,
    "max_error": None,
    "steps": 8,
    "model": None,
    "keep_unfolded": None,
}


def check_params(groups: Iterable[dict]) -> None:
    """FOAM works on real floating-point dense parameters."""
    for gi, group in enumerate(groups):
        for pi, p in enumerate(group["params"]):
            if p.is_complex():
                raise ValueError(
                    f"FOAM: {checkpoint.describe(p, gi, pi)} is complex; FOAM folds real tensors "
                    "only. Pass torch.view_as_real(p) as the parameter instead, or keep it in an "
                    "AdamW param group."
                )
            if not p.is_floating_point():
                raise ValueError(f"FOAM: {checkpoint.describe(p, gi, pi)} is not floating point")


class FOAM(torch.optim.Optimizer):
    """AdamW whose two moments are stored as block means over ``2**level`` elements.

    Args mirror ``torch.optim.AdamW``; in addition, per param group:

    - ``level``: fold level ``l``; blocks of ``2**l`` consecutive elements along the last dim
      (0 = AdamW exactly; 0-d and 1-d parameters always run at level 0).
    - ``scale``: FOAM's alpha, multiplies the step of this group's folded parameters (level 0
      parameters take AdamW's step unscaled, as in the paper's recipe).
    - ``res_scale``: FOAM's rho, weight of the current gradient's residual.
    - ``decoupled_weight_decay``: ``True`` for AdamW's decoupled decay, ``False`` for Adam's
      coupled L2 decay (``g += weight_decay * p``), as in ``torch.optim.Adam``.
    - ``master_weights``: ``None`` (default), ``"int8"`` or ``"int16"``: bfloat16/float16
      parameters get correction bits in their state (``"master_rho"``), so that the optimizer
      steps a 24-bit (int8) or 32-bit (int16) weight while the model holds 16 bits
      (:mod:`foam_compile.master_weights`; float32 parameters need none and get none).

    State is float32 whatever the parameter dtype (float64 parameters keep float64 state).

    ``level="auto"`` picks a level per parameter from real gradients: the first
    ``calibration_steps`` steps run at level 0 (exactly AdamW) while the residual energy of each
    candidate level is measured, then :func:`foam_compile.plan` chooses levels under ``budget``
    (state as a fraction of AdamW's) and/or ``max_error``, the moments are folded, and the plan's
    report is logged once (logger ``foam_compile``; the plan is kept in ``optimizer.foam_plan``).
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        level: int = 2,
        scale: float = 1.0,
        res_scale: float = 1.0,
        amsgrad: bool = False,
        maximize: bool = False,
        decoupled_weight_decay: bool = True,
        capturable: bool = False,
        budget: float | None = None,
        max_error: float | None = None,
        calibration_steps: int = 8,
        master_weights: str | None = None,
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
        Hyper.from_group(defaults)
        super().__init__(params, defaults)
        self.autotune = dict(
            FOAM_AUTOTUNE, budget=budget, max_error=max_error, steps=calibration_steps
        )
        _check_autotune(self)

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
        backends.prepare(params)
        super().add_param_group(param_group)

    # ----------------------------------------------------------------------------- state
    def _new_state(self, p: Tensor, group: dict, level: int | None = None) -> dict:
        hp = self.foam_family.hyper(group)
        level = _int_level(hp.level) if level is None else level
        state = checkpoint.new_state(
            p, level, self.foam_family.moments(hp), format_of({}), checkpoint.step_device(p, group)
        )
        master_weights.reconcile_(p, state, hp.master_weights, "a new parameter")
        return state

    def _init_group(self, group, params, grads, tensors, layouts):
        """Collect this group's tensors, creating state on first use.

        Dynamo runs this method eagerly (its ``OptimizerVariable``) and gives a source to each
        tensor appended to the list arguments, so the state comes out flat: ``layouts[i]`` is
        ``(level, format name, keys)`` of parameter ``i``, whose state tensors are the next
        ``len(keys)`` entries of ``tensors``. Everything is checked here, before any write.
        """
        gi = next((i for i, g in enumerate(self.param_groups) if g is group), 0)
        hp = self.foam_family.hyper(group)
        moments = self.foam_family.moments(hp)
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            what = checkpoint.describe(p, gi, pi)
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"FOAM: {what} has a sparse gradient; FOAM needs dense gradients (use "
                    "torch.optim.SparseAdam for sparse embeddings)."
                )
            state = self.state[p]
            if len(state) == 0:
                state.update(self._new_state(p, group))
            elif "foam_level" not in state:
                raise RuntimeError(
                    f"FOAM: the state of {what} has no 'foam_level'; it was written by another "
                    "optimizer. Load it with load_state_dict(), which folds stock AdamW/Adam "
                    "moments."
                )
            master_weights.reconcile_(p, state, hp.master_weights, what)
            level, fmt = state["foam_level"], format_of(state)
            if hp.amsgrad and "max_exp_avg_sq" not in state:  # amsgrad switched on mid-run
                v = fmt.decode(state, "exp_avg_sq", "square", p).clone()
                state.update(fmt.encode(v, p, "max_exp_avg_sq", "square"))
            shape = folded_shape(p.shape, level)
            keys = ["step"]
            for key, _kind in moments:
                why = fmt.check(state, key, p, shape)
                if why is not None:
                    raise RuntimeError(f"FOAM: {key} of {what} {why} for level {level}")
                keys += fmt.keys(key)
            if master_weights.RHO_KEY in state:
                keys.append(master_weights.RHO_KEY)
            params.append(p)
            grads.append(p.grad)
            tensors.extend(state[k] for k in keys)
            layouts.append((level, fmt.name, tuple(keys)))
        return False

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
            params, grads, tensors, layouts = [], [], [], []
            self._init_group(group, params, grads, tensors, layouts)
            batches.append((hp, params, grads, _states(tensors, layouts)))
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
            self.set_levels(plan.levels_by_param())
            self.foam_plan = plan
            self._foam_calibrating = False
            for group in self.param_groups:  # saved with the checkpoint: resuming won't re-plan
                if group.get("level") == "auto":
                    group["auto_planned"] = True
            log.info("foam: level='auto' plan after %d steps\n%s", tuner.seen, plan.report())

    @torch.no_grad()
    def set_levels(self, levels: dict[Tensor, int]) -> None:
        """Move parameters to new fold levels, refolding their moments.

        Going deeper (``new >= old``) keeps the moments' block means; going shallower unfolds
        them (each element gets its block's mean). Used by the planner's ``level='auto'``.
        """
        index = {p: g for g in self.param_groups for p in g["params"]}
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
            group = index[p]
            state = self.state[p]
            if not state:
                state.update(self._new_state(p, group, int(level)))
                continue
            moments = self.foam_family.moments(self.foam_family.hyper(group))
            new = checkpoint.relevel(p, state, int(level), moments)
            state.clear()
            state.update(new)

    # -------------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a FOAM checkpoint, or a stock AdamW/Adam one (its full-size moments are folded).

        Everything is checked before the optimizer changes; on error the state is untouched.
        """
        family = self.foam_family
        prepared, tensors = checkpoint.prepare_load(
            self,
            state_dict,
            where="FOAM.load_state_dict",
            moments_of_group=lambda g: family.moments(family.hyper(g)),
        )
        foam_keys = [{k: g.get(k, v) for k, v in GROUP_DEFAULTS.items()} for g in self.param_groups]
        super().load_state_dict(prepared)
        for group, keys in zip(self.param_groups, foam_keys):
            for k, v in keys.items():
                group.setdefault(k, v)
        # torch casts floating state to the parameter dtype; FOAM keeps its own dtypes.
        from .distributed import like_param

        for p, st in self.state.items():
            for key, value in tensors.get(p, {}).items():
                value = value.to(device=p.device)
                st[key] = like_param(value, p, st.get("foam_level", 0))
        if not hasattr(self, "autotune"):
            self.autotune = dict(FOAM_AUTOTUNE)
        _check_autotune(self)


def _states(tensors: list[Tensor], layouts: list[tuple]) -> list[dict]:
    """The per-parameter state dicts :func:`foam_compile.functional.foam_adam_` takes."""
    states, at = [], 0
    for level, fmt, keys in layouts:
        st = dict(zip(keys, tensors[at : at + len(keys)]))
        st["foam_level"] = level
        st["foam_format"] = fmt
        states.append(st)
        at += len(keys)
    return states


# FOAM._calibrate wrapped by torch.compiler.disable, made when a level='auto' group is armed:
# wrapping imports Dynamo, which plain training should not pay for at `import foam_compile`.
_CALIBRATE: list = [None]


def check_autotune(
    where: str, *, auto: bool, budget=None, max_error=None, calibration_steps=8
) -> None:
    """Check ``level='auto'``'s options where they are given (FOAM, convert, backend)."""
    if not auto:
        return
    if budget is None and max_error is None:
        raise ValueError(
            f"{where}: level='auto' needs budget= (optimizer state as a fraction of AdamW's, "
            "e.g. 0.3) and/or max_error= (e.g. 0.5); or give an int level."
        )
    if int(calibration_steps) < 1:
        raise ValueError(f"{where}: calibration_steps must be >= 1 for level='auto'")


def _check_autotune(opt, where: str = "FOAM") -> None:
    """Arm the calibration of ``level='auto'`` groups (also used by ``convert``)."""
    auto = any(g.get("level") == "auto" and not g.get("auto_planned") for g in opt.param_groups)
    check_autotune(
        where,
        auto=auto,
        budget=opt.autotune.get("budget"),
        max_error=opt.autotune.get("max_error"),
        calibration_steps=opt.autotune.get("steps", 8),
    )
    if auto:
        _calibrate_outside_compile()
    opt._foam_calibrating = auto


def _calibrate_outside_compile():
    """``FOAM._calibrate`` under ``torch.compiler.disable``: Python on the side of a step."""
    if _CALIBRATE[0] is None:
        _CALIBRATE[0] = torch.compiler.disable(FOAM._calibrate)
    return _CALIBRATE[0]


def _make_tuner(opt):
    from .discovery import embedding_params, parameter_names
    from .planner import AutoTuner

    params = [p for g in opt.param_groups if g.get("level") == "auto" for p in g["params"]]
    names = parameter_names(params, opt.autotune.get("model"))
    embeddings = embedding_params(params, opt.autotune.get("model"))
    named = [(names.get(id(p)) or f"param{i}", p) for i, p in enumerate(params)]
    kw = {k: opt.autotune[k] for k in ("budget", "max_error") if opt.autotune.get(k) is not None}
    kw["keep"] = [p for p in params if id(p) in embeddings]
    if opt.autotune.get("keep_unfolded") is not None:
        kw["keep_unfolded"] = opt.autotune["keep_unfolded"]
    steps = int(opt.autotune.get("steps", 8))
    return AutoTuner(named, steps=steps, model=opt.autotune.get("model"), **kw)


def _int_level(level) -> int:
    """The level a group runs at now: ``'auto'`` runs as AdamW (level 0) until calibrated."""
    return 0 if level == "auto" else level
