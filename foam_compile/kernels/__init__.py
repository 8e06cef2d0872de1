"""FOAM step kernels and their thin launchers; pure kernel code that imports nothing from the
rest of foam_compile.

* :mod:`.foam_adam` (Triton): :func:`foam_adam_step_` (one parameter, one launch) and
  :func:`foam_adam_grouped_` (a list of parameters in a handful of launches);
* :mod:`.cpu` (C++): :func:`~.cpu.foam_cpu_step_`, a list of CPU parameters in one call.

The Triton names below load on first access (importing :mod:`.cpu` must not import Triton).
"""

import importlib

__all__ = [
    "HYPER_NAMES",
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
