"""Triton kernels for the FOAM step (ALGORITHM.md) and their thin launchers.

* :func:`foam_adam_step_` - one parameter, one launch.
* :func:`foam_adam_grouped_` - a list of parameters in a handful of launches (grouped by dtype,
  level and evenness); a steady loop allocates, copies and synchronises nothing (CUDA-graph safe).

Modules: ``tile`` (the device code: one tile, one span, the format hooks), ``foam_adam`` (the two
kernels and the launchers), ``plans`` (shape-only tables, pointer slots), ``tuning`` (configs,
size model, disk cache), ``checks`` (input validation), ``aot`` (ahead-of-time compile for
sm_80/sm_90 on a CPU machine, registers and spills).

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
