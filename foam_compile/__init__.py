"""foam-compile: FOAM (folded Adam moments, arXiv 2512.07112) as an optimizer and a compiler feature."""

from .optimizer import FOAM
from .reference import fold, folded_shape, reference_step, unfold

__all__ = ["FOAM", "fold", "unfold", "folded_shape", "reference_step"]
__version__ = "0.1.0"
