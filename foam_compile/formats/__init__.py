"""State formats beyond float32: each module is one format and registers itself on import.

:mod:`foam_compile.state` is the layer (the :class:`~foam_compile.state.StateFormat` interface and
its registry); importing this package (``import foam_compile`` does) registers ``"int8"`` and
``"int4"`` and their stochastic-rounding variants ``"int8-sr"`` and ``"int4-sr"``. They need only
torch, so the import stays cheap.
"""

from . import int4, int8

__all__ = ["int4", "int8"]
