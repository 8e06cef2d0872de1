"""foam-compile: FOAM (folded Adam moments, arXiv 2512.07112), an optimizer and a compiler feature.

``torch.compile(step, backend="foam")`` runs a stock AdamW/Adam step as FOAM; ``convert`` does
the same without a compile; ``FOAM`` is the optimizer for new code; ``plan`` picks fold levels.
Whole-training memory: ``FOAM(..., master_weights="int8")`` (bf16 weights + correction bits),
``release_gradients`` (step in backward, free each gradient), ``memory_report``.

Importing the package is cheap: Dynamo, Inductor, sympy and Triton load when first needed
(``backend``, the planner and cost model, a CUDA parameter). It installs one global optimizer
step pre-hook (:mod:`foam_compile.guard`): a stock AdamW that loaded a FOAM checkpoint raises an
error naming ``foam_compile.convert`` instead of failing on the folded shapes.
"""

import importlib

from . import (
    formats,  # noqa: F401  (registers the int8/int4 state formats; torch only)
    master_weights,
)
from .convert import convert, explain, export_adamw_state_dict, is_converted
from .grad_release import release_gradients
from .guard import install_folded_state_guard
from .memory import memory_report
from .optimizer import FOAM
from .reference import fold, folded_shape, reference_step, unfold

__all__ = [
    "FOAM",
    "AutoTuner",
    "ErrorMeter",
    "Plan",
    "backend",
    "convert",
    "cost",
    "explain",
    "export_adamw_state_dict",
    "fold",
    "folded_shape",
    "is_converted",
    "master_weights",
    "memory_report",
    "plan",
    "plan_params",
    "reference_step",
    "release_gradients",
    "unfold",
]
__version__ = "0.1.0"

# Public names whose modules are heavy to import, loaded on first use.
_LAZY = {
    "backend": "dynamo_backend",
    "AutoTuner": "planner",
    "Plan": "planner",
    "plan": "planner",
    "plan_params": "planner",
    "ErrorMeter": "cost_model",
    "cost": "cost_model",
}


install_folded_state_guard()


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'foam_compile' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
