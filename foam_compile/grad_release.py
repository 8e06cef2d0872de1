"""Gradient release: step each parameter as soon as its gradient is complete, then free it.

The pattern torchtune calls optimizer-in-backward (``register_optim_in_bwd_hooks``): a hook
registered with ``Tensor.register_post_accumulate_grad_hook`` runs once a parameter's gradient
has been accumulated in a backward pass; it steps that parameter and drops the gradient, so a
backward pass never holds more than about one parameter's gradient (plus what autograd holds
for the activations). torchtune builds one optimizer per parameter and wraps them for
checkpoints; here the user's one optimizer steps one parameter at a time (its param groups are
narrowed to that parameter for the call), so its ``state_dict`` is the same as without release,
LR schedulers attach to it as usual, and a run can switch between release and ordinary steps.

What is and is not possible (said again in :func:`release_gradients`):

* The order of updates is the backward's; each parameter's update is the optimizer's own, so
  on CPU the weights equal the ordinary ``backward(); step()`` loop bit for bit.
* Clipping by the global gradient norm needs every gradient before the first step: impossible
  when each is freed as it comes. ``clip="param"`` clips each gradient by its own norm (a
  different rule: a parameter with a large gradient no longer shrinks the others');
  ``clip="previous"`` clips every gradient by the global norm of the *previous* step (computed
  here as the gradients pass, so it costs no memory): the rule of ``clip_grad_norm_`` lagging one
  step, so a spike is clipped one step late and the first step is not clipped.
* Gradient accumulation: backward passes inside ``with release.accumulate():`` keep their
  gradients (as usual, so no memory is saved on them); the next backward outside it adds its
  gradients and steps. Without ``accumulate()`` every backward pass is an optimizer step.
* A backward pass that raises has already stepped the parameters whose gradients came first
  (there is no step to undo, as in any optimizer-in-backward); the next backward starts clean.
* ``level="auto"`` FOAM groups (which calibrate on whole steps) and clipping of ``DTensor``
  (FSDP2) parameters are refused for now.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from .distributed import is_dtensor
from .memory import params_of

__all__ = ["CLIP_MODES", "GradientRelease", "release_gradients"]

CLIP_MODES = ("param", "previous")


class GradientRelease:
    """Steps ``optimizer``'s parameters from their gradient hooks; see the module docstring.

    Attributes: ``optimizer`` (the user's; give it to LR schedulers), ``params`` (those released,
    in the optimizer's order, as of construction: a param group added later is not released),
    ``last_grad_norm`` (the global norm of the last step's gradients, before clipping; with
    clipping on), ``steps`` (backward passes that stepped).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        max_norm: float | None = None,
        clip: str | None = None,
    ):
        _check_clip(max_norm, clip)
        if getattr(optimizer, "_foam_calibrating", False):
            raise ValueError(
                "release_gradients: this FOAM optimizer has level='auto' groups that still "
                "calibrate on whole steps; give int levels (or finish calibrating without release)."
            )
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(self.params):
            if not (p.is_leaf and p.requires_grad):
                raise ValueError(
                    f"release_gradients: parameter {i} (shape {list(p.shape)}) is not a leaf "
                    "tensor that requires grad; only those get post-accumulate-grad hooks."
                )
            if clip is not None and is_dtensor(p):
                raise NotImplementedError(
                    f"release_gradients: parameter {i} is a DTensor (FSDP2/tensor parallel); "
                    "clipping sharded gradients as they are released needs a cross-rank norm "
                    "per step, not done yet. Release without max_norm."
                )
        self.max_norm = None if max_norm is None else float(max_norm)
        self.clip = clip
        self.last_grad_norm: Tensor | None = None
        self.steps = 0
        self._previous_norm: Tensor | None = None
        self._norms: dict[int, Tensor] = {}
        self._accumulating = False
        self._task: int | None = None
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._group_of = {
            id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]
        }
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    # ------------------------------------------------------------------------------ hooks
    def _on_grad(self, p: Tensor) -> None:
        if self._accumulating or p.grad is None:
            return
        task = torch._C._current_graph_task_id()
        if task != self._task:  # first gradient of this backward: finish it at its end
            # (by task id, not a flag: a backward that raised never ran its callback)
            self._task = task
            self._norms = {}
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        self._clip(p)
        self._step_one(p)
        p.grad = None

    def _clip(self, p: Tensor) -> None:
        if self.clip is None:
            return
        from torch.nn.utils import clip_grad_norm_, clip_grads_with_norm_, get_total_norm

        i = self._index[id(p)]
        if self.clip == "param":
            self._norms[i] = clip_grad_norm_([p], self.max_norm, foreach=False)
            return
        self._norms[i] = get_total_norm([p.grad], foreach=False)
        if self._previous_norm is not None:
            clip_grads_with_norm_([p], self.max_norm, self._previous_norm, foreach=False)

    def _step_one(self, p: Tensor) -> None:
        """``optimizer.step()`` with its param groups narrowed to ``p`` for the call."""
        groups = self.optimizer.param_groups
        saved = [g["params"] for g in groups]
        mine = self._group_of[id(p)]
        try:
            for gi, g in enumerate(groups):
                g["params"] = [p] if gi == mine else []
            self.optimizer.step()
        finally:
            for g, params in zip(groups, saved):
                g["params"] = params

    def _end_backward(self) -> None:
        self._task = None
        self.steps += 1
        if self._norms:
            from torch.nn.utils import get_total_norm

            # In the optimizer's parameter order, as clip_grad_norm_ sums them.
            norms = [self._norms[i] for i in sorted(self._norms)]
            self.last_grad_norm = get_total_norm(norms, foreach=False)
            self._norms = {}
            if self.clip == "previous":
                self._previous_norm = self.last_grad_norm

    # -------------------------------------------------------------------------- the API
    @contextlib.contextmanager
    def accumulate(self):
        """Backward passes inside keep their gradients (no step); the next one outside steps."""
        self._accumulating = True
        try:
            yield self
        finally:
            self._accumulating = False

    def step(self, closure: Callable | None = None):
        """Nothing to do: the parameters stepped during backward (kept for training loops)."""
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears gradients held by ``accumulate()`` (released ones are gone already)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The optimizer's state dict (as without release) plus the clipping norm carried over."""
        return {"optimizer": self.optimizer.state_dict(), "previous_grad_norm": self._previous_norm}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "optimizer" not in state_dict:
            raise ValueError(
                "GradientRelease.load_state_dict: expected the dict of "
                "GradientRelease.state_dict() ({'optimizer': ..., 'previous_grad_norm': ...}); "
                "a plain optimizer state dict "
                "loads with release.optimizer.load_state_dict()"
            )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._previous_norm = state_dict.get("previous_grad_norm")

    def remove(self) -> None:
        """Remove the hooks: backward keeps gradients again and ``optimizer.step()`` steps."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _check_clip(max_norm, clip) -> None:
    if clip is not None and clip not in CLIP_MODES:
        raise ValueError(f"release_gradients: invalid clip={clip!r}; use one of {CLIP_MODES}")
    if (max_norm is None) != (clip is None):
        raise ValueError(
            "release_gradients: give max_norm= and clip= together. Clipping by the global norm "
            "of this step's gradients is impossible when each gradient is freed as it comes; "
            "clip='param' clips each gradient by its own norm, clip='previous' clips all by the "
            "previous step's global norm (one step late; the first step unclipped)."
        )
    if max_norm is not None and not (float(max_norm) > 0 and float(max_norm) < float("inf")):
        raise ValueError(f"release_gradients: invalid max_norm={max_norm!r}; use a number > 0")


def release_gradients(
    model,
    optimizer: torch.optim.Optimizer | Callable[[list[Tensor]], torch.optim.Optimizer],
    *,
    max_norm: float | None = None,
    clip: str | None = None,
) -> GradientRelease:
    """Step each parameter from its gradient hook during backward and free its gradient.

    ``optimizer`` is an optimizer over (some of) ``model``'s parameters, or a factory that
    builds one from a list of them (``lambda ps: FOAM(ps, lr=1e-3)``: it gets every parameter
    of ``model`` that requires grad). Parameters the optimizer does not hold keep their
    gradients as usual. The training loop becomes::

        release = release_gradients(model, opt)
        sched = torch.optim.lr_scheduler.LambdaLR(release.optimizer, ...)  # as before
        for x, y in data:
            loss_fn(model(x), y).backward()  # steps every parameter, frees every gradient
            sched.step()

    ``max_norm`` with ``clip="param"`` (each gradient by its own norm) or ``clip="previous"``
    (all by the previous step's global norm): the global norm of the current step cannot be
    known before its first gradient is freed. ``release.accumulate()`` runs micro-batches that
    only accumulate. Checkpoint with ``release.state_dict()`` (or the optimizer's own).
    """
    params = [p for p in params_of(model) if p.requires_grad]
    if not isinstance(optimizer, torch.optim.Optimizer):
        if not callable(optimizer):
            raise TypeError(
                "release_gradients: optimizer must be a torch.optim.Optimizer or a callable "
                f"that builds one from a list of parameters, got {type(optimizer).__name__}"
            )
        optimizer = optimizer(params)
    known = {id(p) for p in params}
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in known:
                raise ValueError(
                    f"release_gradients: the optimizer holds a tensor of shape {list(p.shape)} "
                    "that is not a trainable parameter of the model"
                )
    return GradientRelease(optimizer, max_norm=max_norm, clip=clip)
