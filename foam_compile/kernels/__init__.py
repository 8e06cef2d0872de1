"""FOAM step kernels and their thin launchers; pure kernel code that imports nothing from the
rest of foam_compile.

* :mod:`.foam_adam` (Triton): :func:`foam_adam_step_` (one parameter, one launch) and
  :func:`foam_adam_grouped_` (a list of parameters in a handful of launches);
* :mod:`.cpu` (C++): :func:`~.cpu.foam_cpu_step_`, a list of CPU parameters in one call.

Modules: ``tile`` (the device code: one tile, one span, the format hooks), ``foam_adam`` (the two
kernels and the launchers), ``plans`` (shape-only tables, pointer slots), ``tuning`` (configs,
size model, disk cache), ``checks`` (input validation), ``aot`` (ahead-of-time compile for
sm_80/sm_90 on a CPU machine, registers and spills).

The Triton names below load on first access (importing :mod:`.cpu` must not import Triton).
"""

import importlib

__all__ = [
    "MAX_LEVEL",
    "SUPPORTED_DTYPES",
    "foam_adam_grouped_",
    "foam_adam_step_",
    "is_interpreting",
    "is_tracing",
]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".foam_adam", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
