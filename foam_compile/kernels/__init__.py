"""Triton kernels for the FOAM step (ALGORITHM.md) and their thin launchers.

* :func:`foam_adam_step_` - one parameter, one launch.
* :func:`foam_adam_grouped_` - a list of parameters in a handful of launches (grouped by dtype
  and level).

Pure kernel code: this package imports nothing from the rest of foam_compile, and importing it
imports Triton. The torch ops and the fallback where the kernel cannot run live in
:mod:`foam_compile.backends.triton_cuda`.
"""

from . import foam_adam
from .foam_adam import *  # noqa: F403 - the launchers' public names, listed in foam_adam.__all__

__all__ = foam_adam.__all__
