"""Triton kernels for the FOAM step (ALGORITHM.md) and their thin launchers.

* :func:`foam_adam_step_` - one parameter, one launch.
* :func:`foam_adam_grouped_` - a list of parameters in a handful of launches (grouped by dtype
  and level).

Pure kernel code: this package imports nothing from the rest of foam_compile, and importing it
imports Triton. The torch ops and the fallback where the kernel cannot run live in
:mod:`foam_compile.backends.triton_cuda`.
"""

from .foam_adam import (
    MAX_LEVEL,
    SUPPORTED_DTYPES,
    foam_adam_grouped_,
    foam_adam_step_,
    is_interpreting,
    is_tracing,
)

__all__ = [
    "MAX_LEVEL",
    "SUPPORTED_DTYPES",
    "foam_adam_grouped_",
    "foam_adam_step_",
    "is_interpreting",
    "is_tracing",
]
