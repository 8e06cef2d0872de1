"""``FOAM``: AdamW with moments folded into block means (ALGORITHM.md), as a torch optimizer.

The optimizer owns the folded state: ``state[p]`` holds ``step``, ``exp_avg`` and ``exp_avg_sq``
(and ``max_exp_avg_sq`` with amsgrad) in the folded shape ``[..., ceil(n / 2**level)]``, float32,
plus ``foam_level``, the level ``p`` runs at. Nothing full-size is kept between steps.

The class is also the mixin that :func:`foam_compile.convert` puts in front of a stock
``torch.optim.AdamW``/``Adam``: every method here reads its hyperparameters from the param groups
with FOAM's defaults for the keys a stock optimizer lacks.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .distributed import fold, like_param, zeros_folded
from .functional import foam_adam_
from .reference import effective_level, folded_shape

__all__ = ["FOAM", "FOAM_DEFAULTS"]

log = logging.getLogger("foam_compile")

# Keys FOAM adds to a param group, with the values a converted stock optimizer gets.
FOAM_DEFAULTS = {"level": 2, "scale": 1.0, "res_scale": 1.0}
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
FOAM_AUTOTUNE = {"budget": None, "max_error": None, "steps": 8, "model": None, "keep_unfolded": None}


def state_dtype(p: Tensor) -> torch.dtype:
    """float32 moments whatever the parameter dtype; float64 parameters keep float64."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _describe(p: Tensor, gi: int, pi: int) -> str:
    return f"parameter {pi} of param group {gi} (shape {list(p.shape)}, dtype {p.dtype})"


def check_hyperparameters(group: dict, where: str = "FOAM") -> None:
    """Raise a ValueError naming the bad hyperparameter and the valid range."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}: lr as a tensor must have one element, got shape {list(lr.shape)}")
        lr = float(lr)
    if not 0.0 <= lr:
        raise ValueError(f"{where}: invalid lr={lr}; use lr >= 0")
    if not 0.0 <= group["eps"]:
        raise ValueError(f"{where}: invalid eps={group['eps']}; use eps >= 0")
    betas = group["betas"]
    for i, b in enumerate(betas):
        b = float(b)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{where}: invalid betas[{i}]={b}; each beta must be in [0, 1)")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(
            f"{where}: invalid weight_decay={group['weight_decay']}; use weight_decay >= 0"
        )
    level = group.get("level", FOAM_DEFAULTS["level"])
    if level != "auto" and (
        isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 16
    ):
        raise ValueError(
            f"{where}: invalid level={level!r}; use an int in [0, 16] "
            "(0 = plain AdamW, 2 = blocks of 4) or 'auto'"
        )
    for key in ("scale", "res_scale"):
        value = group.get(key, FOAM_DEFAULTS[key])
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{where}: invalid {key}={value!r}; use a finite number >= 0")


def check_params(groups: Iterable[dict]) -> None:
    """FOAM works on real floating-point dense parameters."""
    for gi, group in enumerate(groups):
        for pi, p in enumerate(group["params"]):
            if p.is_complex():
                raise ValueError(
                    f"FOAM: {_describe(p, gi, pi)} is complex; FOAM folds real tensors only. "
                    "Pass torch.view_as_real(p) as the parameter instead, or keep it in an "
                    "AdamW param group."
                )
            if not p.is_floating_point():
                raise ValueError(f"FOAM: {_describe(p, gi, pi)} is not floating point")


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
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, level=level, scale=scale,
            res_scale=res_scale, amsgrad=amsgrad, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay, capturable=capturable,
        )
        check_hyperparameters(defaults)
        super().__init__(params, defaults)
        self.autotune = dict(FOAM_AUTOTUNE, budget=budget, max_error=max_error, steps=calibration_steps)
        _check_autotune(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)  # may be a generator
        param_group["params"] = params
        group = dict(param_group)
        for key, value in getattr(self, "defaults", {}).items():
            group.setdefault(key, value)
        check_params([{"params": params}])
        if "lr" in group:
            check_hyperparameters(group)
        super().add_param_group(param_group)

    # ----------------------------------------------------------------------------- state
    def _new_state(self, p: Tensor, group: dict, level: int | None = None) -> dict:
        level = effective_level(p.shape, _group_level(group) if level is None else level)
        dtype = state_dtype(p)
        step_device = p.device if group.get("capturable") or group.get("fused") else "cpu"
        state = {
            "step": torch.tensor(0.0, dtype=torch.float32, device=step_device),
            "exp_avg": zeros_folded(p, level, dtype),
            "exp_avg_sq": zeros_folded(p, level, dtype),
        }
        if group.get("amsgrad", False):
            state["max_exp_avg_sq"] = zeros_folded(p, level, dtype)
        state["foam_level"] = level
        return state

    def _init_group(
        self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, levels
    ):
        """Collect this group's tensors, creating state on first use (Dynamo runs this eagerly)."""
        gi = next((i for i, g in enumerate(self.param_groups) if g is group), 0)
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"FOAM: {_describe(p, gi, pi)} has a sparse gradient; FOAM needs dense "
                    "gradients (use torch.optim.SparseAdam for sparse embeddings)."
                )
            state = self.state[p]
            if len(state) == 0:
                state.update(self._new_state(p, group))
            elif "foam_level" not in state:
                raise RuntimeError(
                    f"FOAM: the state of {_describe(p, gi, pi)} has no 'foam_level'; it was "
                    "written by another optimizer. Load it with load_state_dict(), which folds "
                    "stock AdamW/Adam moments."
                )
            level = state["foam_level"]
            expected = folded_shape(p.shape, level)
            for key in _MOMENTS:
                if key in state and tuple(state[key].shape) != expected:
                    raise RuntimeError(
                        f"FOAM: {key} of {_describe(p, gi, pi)} has shape "
                        f"{list(state[key].shape)}, expected {list(expected)} for level {level}"
                    )
            if group.get("amsgrad", False) and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group.get("amsgrad", False):
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            state_steps.append(state["step"])
            levels.append(level)
        return False

    @torch.no_grad()
    def step(self, closure=None):
        """One FOAM step. All inputs are checked before any tensor is written."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if getattr(self, "_foam_calibrating", False):
            self._calibrate()
        batches = []
        for group in self.param_groups:
            lists: tuple[list, ...] = ([], [], [], [], [], [], [])
            self._init_group(group, *lists)
            batches.append((group, lists))
        for group, (params, grads, m, v, vmax, steps, levels) in batches:
            if not params:
                continue
            beta1, beta2 = group["betas"]
            foam_adam_(
                params, grads, m, v, vmax, steps, levels,
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"],
                decoupled_weight_decay=group.get("decoupled_weight_decay", True),
                amsgrad=group.get("amsgrad", False), maximize=group.get("maximize", False),
                scale=group.get("scale", FOAM_DEFAULTS["scale"]),
                res_scale=group.get("res_scale", FOAM_DEFAULTS["res_scale"]),
            )
        return loss

    # ------------------------------------------------------------------------ levels
    @torch.compiler.disable  # Python bookkeeping on the side of the compiled step
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

    # ------------------------------------------------------------------------ levels
    @torch.no_grad()
    def set_levels(self, levels: dict[Tensor, int]) -> None:
        """Move parameters to new fold levels, refolding their moments.

        Going deeper (``new >= old``) keeps the moments' block means; going shallower unfolds
        them (each element gets its block's mean). Used by the planner's ``level='auto'``.
        """
        index = {p: (gi, pi, g) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])}
        for p, level in levels.items():  # check everything before changing anything
            if p not in index:
                raise ValueError(f"set_levels: a tensor of shape {list(p.shape)} is not in this optimizer")
            if isinstance(level, bool) or not isinstance(level, numbers.Integral) or not 0 <= level <= 16:
                raise ValueError(
                    f"set_levels: invalid level {level!r} for the parameter of shape "
                    f"{list(p.shape)}; use an int in [0, 16]"
                )
        for p, level in levels.items():
            gi, pi, group = index[p]
            level = effective_level(p.shape, int(level))
            state = self.state[p]
            if not state:
                state.update(self._new_state(p, group, level))
                continue
            old = state["foam_level"]
            n = p.shape[-1] if p.dim() else 1
            for key in _MOMENTS:
                if key in state:
                    full = _unfold_to(state[key], old, n)
                    state[key] = fold(full, level).contiguous()
            state["foam_level"] = level

    # -------------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a FOAM checkpoint, or a stock AdamW/Adam one (its full-size moments are folded).

        Everything is checked before the optimizer changes; on error the state is untouched.
        """
        prepared, moments = _prepare_state_dict(self, state_dict)
        foam_keys = [{k: g.get(k, v) for k, v in FOAM_DEFAULTS.items()} for g in self.param_groups]
        super().load_state_dict(prepared)
        for group, keys in zip(self.param_groups, foam_keys):
            for k, v in keys.items():
                group.setdefault(k, v)
        # torch casts floating state to the parameter dtype; FOAM keeps its float32 state.
        for p, st in self.state.items():
            for key, value in moments.get(p, {}).items():
                value = value.to(device=p.device, dtype=state_dtype(p))
                st[key] = like_param(value, p, st.get("foam_level", 0))
        if not hasattr(self, "autotune"):
            self.autotune = dict(FOAM_AUTOTUNE)
        _check_autotune(self)


def _check_autotune(opt) -> None:
    """Arm the calibration of ``level='auto'`` groups (also used by ``convert``)."""
    auto = any(g.get("level") == "auto" and not g.get("auto_planned") for g in opt.param_groups)
    if auto and opt.autotune.get("budget") is None and opt.autotune.get("max_error") is None:
        raise ValueError(
            "FOAM: level='auto' needs budget= (optimizer state as a fraction of AdamW's, e.g. "
            "0.3) and/or max_error= (e.g. 0.5); or give an int level."
        )
    if auto and int(opt.autotune.get("steps", 8)) < 1:
        raise ValueError("FOAM: calibration_steps must be >= 1 for level='auto'")
    opt._foam_calibrating = auto


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
    return AutoTuner(named, steps=int(opt.autotune.get("steps", 8)), model=opt.autotune.get("model"), **kw)


def _group_level(group: dict) -> int:
    level = group.get("level", FOAM_DEFAULTS["level"])
    return 0 if level == "auto" else level


def _unfold_to(y: Tensor, level: int, n: int) -> Tensor:
    from .distributed import unfold

    return unfold(y, level, n)


def _prepare_state_dict(opt: torch.optim.Optimizer, state_dict: dict) -> tuple[dict, dict]:
    """Check ``state_dict`` against ``opt`` and fold full-size moments; mutate nothing."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("FOAM.load_state_dict: expected a dict with 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"FOAM.load_state_dict: the checkpoint has {len(saved_groups)} param groups, "
            f"this optimizer {len(opt.param_groups)}"
        )
    id_map = {}
    for gi, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"FOAM.load_state_dict: param group {gi} has {len(saved['params'])} parameters "
                f"in the checkpoint and {len(group['params'])} here"
            )
        level = saved.get("level", group.get("level", FOAM_DEFAULTS["level"]))
        level = 0 if level == "auto" else level
        for pi, (sid, p) in enumerate(zip(saved["params"], group["params"])):
            id_map[sid] = (gi, pi, p, level)
    new_state, moments = {}, {}
    for sid, st in state_dict["state"].items():
        if sid not in id_map:
            new_state[sid] = st
            continue
        gi, pi, p, group_level = id_map[sid]
        st = dict(st)
        if "foam_level" in st:
            level = st["foam_level"]
            expected = folded_shape(p.shape, level)
            convert = False
        else:
            level = effective_level(p.shape, group_level)
            expected = tuple(p.shape)
            convert = True
        folded = {}
        for key in _MOMENTS:
            if key not in st:
                continue
            value = st[key]
            if not isinstance(value, Tensor) or tuple(value.shape) != expected:
                got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"FOAM.load_state_dict: '{key}' of {_describe(p, gi, pi)} has shape {got}, "
                    f"expected {list(expected)}"
                    + (f" (folded at level {level})" if not convert else " (a stock AdamW moment)")
                    + ". Was the checkpoint saved for a different model or fold level?"
                )
            folded[key] = fold(value.to(state_dtype(p)), level).contiguous() if convert else value
        if convert:
            st["foam_level"] = level
            if "step" in st and not isinstance(st["step"], Tensor):
                st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)
        st.update(folded)
        new_state[sid] = st
        moments[p] = folded
    return {"state": new_state, "param_groups": saved_groups}, moments
