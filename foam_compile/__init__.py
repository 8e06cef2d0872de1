"""foam-compile: FOAM (folded Adam moments, arXiv 2512.07112) as an optimizer and a compiler feature."""

from .dynamo_backend import backend
from .convert import convert, explain, export_adamw_state_dict, is_converted
from .optimizer import FOAM
from .reference import fold, folded_shape, reference_step, unfold

__all__ = [
    "FOAM",
    "backend",
    "convert",
    "explain",
    "export_adamw_state_dict",
    "fold",
    "folded_shape",
    "is_converted",
    "reference_step",
    "unfold",
]
__version__ = "0.1.0"
