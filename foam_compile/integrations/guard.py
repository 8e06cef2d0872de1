"""A clear error, instead of a shape mismatch deep in Adam's kernel, when a stock AdamW/Adam
steps on FOAM's folded state.

Trainers resume by ``optimizer.load_state_dict(torch.load(...))`` into the optimizer they build.
When that optimizer is a stock ``torch.optim.AdamW`` and the checkpoint is FOAM's, torch loads
the folded moments as they are and the next step fails with "The size of tensor a (8) must match
the size of tensor b (32)". A global step pre-hook (``torch.optim.optimizer.
register_optimizer_step_pre_hook``) sees the optimizer before its step runs; it cannot swap the
step that is about to run, so it raises and names the fix.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..optimizer import FOAM

__all__ = ["install_folded_state_guard"]

_handle = None


def _refuse_folded_state(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if torch.compiler.is_compiling():  # a traced check would break the graph; Dynamo's own
        return  # compile-start hook (backend="foam") converts such optimizers before tracing
    if isinstance(optimizer, FOAM) or not isinstance(
        optimizer, (torch.optim.Adam, torch.optim.AdamW)
    ):
        return
    if any("foam_level" in st for st in optimizer.state.values()):
        name = type(optimizer).__name__
        raise RuntimeError(
            f"foam_compile: this torch.optim.{name} holds FOAM's folded state (a FOAM checkpoint "
            f"was loaded into a stock {name}); its own step would fail on the folded shapes. "
            "Convert it once after loading: optimizer = foam_compile.convert(optimizer). With the "
            "Hugging Face Trainer, build the optimizer with optimizer_cls_and_kwargs="
            "foam_compile.integrations.hf.foam_optimizer(args), or pass "
            "callbacks=[foam_compile.integrations.hf.FOAMCallback()], which converts the "
            "Trainer's own optimizer after it loads the checkpoint."
        )


def install_folded_state_guard():
    """Register the check for every optimizer step (once; returns the hook's handle)."""
    global _handle
    if _handle is None:
        _handle = register_optimizer_step_pre_hook(_refuse_folded_state)
    return _handle
