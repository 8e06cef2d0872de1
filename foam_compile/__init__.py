"""foam-compile: FOAM (folded Adam moments, arXiv 2512.07112) as an optimizer and a compiler feature.

``torch.compile(step, backend="foam")`` runs a stock AdamW/Adam step as FOAM; ``convert`` does
the same without a compile; ``FOAM`` is the optimizer for new code; ``plan`` picks fold levels.
"""

from .convert import convert, explain, export_adamw_state_dict, is_converted
from .cost_model import ErrorMeter, cost
from .dynamo_backend import backend
from .optimizer import FOAM
from .planner import AutoTuner, Plan, plan, plan_params
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
    "plan",
    "plan_params",
    "reference_step",
    "unfold",
]
__version__ = "0.1.0"
