"""``PolicyFOAM``: another name for :class:`foam_compile.FOAM`, kept for configs that name it.

``FOAM`` itself now applies the folding policy to parameters given as bare tensors (names from
``model=`` or the live module that owns them; see :mod:`foam_compile.policy`) and keeps each
parameter's level in its param group until its state is created (:mod:`foam_compile.layout`),
which survives accelerate's FSDP2 parameter swap.
"""

from ..optimizer import FOAM

__all__ = ["PolicyFOAM"]

PolicyFOAM = FOAM
