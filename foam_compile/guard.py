"""A clear error, instead of a shape mismatch deep in Adam's kernel, when a stock AdamW/Adam
steps on FOAM's folded state.

Trainers resume by ``optimizer.load_state_dict(torch.load(...))`` into the optimizer they build.
When that optimizer is a stock ``torch.optim.AdamW`` and the checkpoint is FOAM's, torch loads
the folded moments as they are and the next step fails with "The size of tensor a (4) must match
the size of tensor b (16)". ``import foam_compile`` installs a global step pre-hook
(``torch.optim.optimizer.register_optimizer_step_pre_hook``) that sees the optimizer first.

It raises; it does not convert. The hook runs inside the stock class's step wrapper, which has
already bound ``AdamW.step``: converting the optimizer there would leave that call running
AdamW's code on a FOAM object, and no hook can swap the step that is about to run. The error is
raised before anything is written and names the one-line fix (``foam_compile.convert``), and,
when the folded state does not fit the parameters, which parameter and why (a checkpoint of
another model). Under ``torch.compile(backend="foam")`` the backend converts such optimizers
before tracing (``compile_hooks``); one it cannot convert is refused here, outside the graph.

Cost for everyone else: one ``isinstance`` and a look at one state entry per step.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .optimizer import FOAM

__all__ = ["folded_state_problem", "install_folded_state_guard"]

_handle = None


def _holds_folded_state(optimizer: torch.optim.Optimizer) -> bool:
    # Every parameter of a FOAM checkpoint carries foam_level: one state entry tells.
    first = next(iter(optimizer.state.values()), None)
    return isinstance(first, dict) and "foam_level" in first


def folded_state_problem(optimizer: torch.optim.Optimizer) -> str | None:
    """Why the folded state of ``optimizer`` cannot be FOAM's for its parameters, or None."""
    from . import checkpoint
    from .families import family_of

    family = family_of(optimizer)
    for gi, group in enumerate(optimizer.param_groups):
        moments = family.moments(family.hyper(group))
        for pi, p in enumerate(group["params"]):
            st = optimizer.state.get(p)
            if not st:
                continue
            try:
                checkpoint.to_foam_state(
                    p,
                    st,
                    level=st.get("foam_level", 0),
                    moments=moments,
                    where="the checkpoint",
                    what=checkpoint.describe(p, gi, pi),
                )
            except ValueError as err:
                return str(err)
    return None


def refusal(optimizer: torch.optim.Optimizer) -> str:
    """The error message for a stock ``optimizer`` that holds FOAM's folded state."""
    name = type(optimizer).__name__
    problem = folded_state_problem(optimizer)
    if problem is not None:
        return (
            f"foam_compile: this torch.optim.{name} holds FOAM's folded state that does not fit "
            f"its parameters: {problem} Load the checkpoint of this model, then convert: "
            "optimizer = foam_compile.convert(optimizer)."
        )
    return (
        f"foam_compile: this torch.optim.{name} holds FOAM's folded state (a FOAM checkpoint "
        f"was loaded into a stock {name}); its own step would fail on the folded shapes. "
        "Convert it once after loading: optimizer = foam_compile.convert(optimizer). With the "
        "Hugging Face Trainer, build the optimizer with optimizer_cls_and_kwargs="
        "foam_compile.integrations.hf.foam_optimizer(args), or pass "
        "callbacks=[foam_compile.integrations.hf.FOAMCallback()], which converts the "
        "Trainer's own optimizer after it loads the checkpoint."
    )


def _refuse(optimizer: torch.optim.Optimizer) -> None:
    raise RuntimeError(refusal(optimizer))


_refuse_eagerly = None  # _refuse under torch.compiler.disable, made on first need (Dynamo)


def _refuse_folded_state(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if torch.compiler.is_compiling():
        # Tracing the check would add guards to every compiled stock step. The "foam" backend
        # marks the optimizers it could not convert; the refusal then runs outside the graph.
        if getattr(optimizer, "_foam_refused", False):
            _refuse_eagerly(optimizer)
        return
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    if not isinstance(optimizer, FOAM) and _holds_folded_state(optimizer):
        _refuse(optimizer)


def mark_refused(optimizer: torch.optim.Optimizer) -> None:
    """Refuse ``optimizer``'s step even inside a compiled function (see the module doc)."""
    global _refuse_eagerly
    if _refuse_eagerly is None:
        _refuse_eagerly = torch.compiler.disable(_refuse)
    optimizer._foam_refused = True


def install_folded_state_guard():
    """Register the check for every optimizer step (once; returns the hook's handle)."""
    global _handle
    if _handle is None:
        _handle = register_optimizer_step_pre_hook(_refuse_folded_state)
    return _handle
