"""How a folded moment is stored: the state-format layer.

A moment of a parameter at level ``l`` is, in math, a float tensor of the folded shape
``[..., ceil(n / 2**l)]`` (``reference.folded_shape``). A *state format* says how that tensor is
kept between steps: which tensors hold it in ``optimizer.state[p]`` (the moment's own key, plus
side tensors such as scales under ``f"{key}_{part}"``), their dtypes, the bytes it costs (a
sympy formula the cost model reads), how to decode it to float and encode it back, and how a
``DTensor`` parameter's moment is placed (every tensor sharded like the parameter).

Only ``"fp32"`` exists today: float32 moments (float64 for float64 parameters), the tensor is
the moment. A new format is one :class:`StateFormat` subclass and one :func:`register` call.
Parameters whose state carries no ``foam_format`` key use ``"fp32"`` (every checkpoint written
before formats existed).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import distributed
from .update import compute_dtype

__all__ = [
    "DEFAULT_FORMAT",
    "FORMATS",
    "Fp32Format",
    "StateFormat",
    "format_of",
    "get_format",
    "register",
]

DEFAULT_FORMAT = "fp32"


class StateFormat:
    """One way of storing a folded moment (subclass and :func:`register` to add one).

    ``kind`` arguments say what a moment holds: ``"signed"`` (``exp_avg``) or ``"square"``
    (``exp_avg_sq``, ``max_exp_avg_sq``: never negative), so a format may code them differently.
    """

    name: str = ""
    #: Side tensors stored next to the moment, as ``f"{key}_{part}"`` in the state.
    parts: tuple[str, ...] = ()

    def compute_dtype(self, p: Tensor) -> torch.dtype:
        """The dtype the update math runs in: float32, float64 for float64 parameters."""
        return compute_dtype(p)

    def keys(self, key: str) -> tuple[str, ...]:
        """The state keys that hold moment ``key``: itself first, then its parts."""
        return (key, *(f"{key}_{part}" for part in self.parts))

    def zeros(self, p: Tensor, level: int, key: str, kind: str) -> dict[str, Tensor]:
        """A zero moment for ``p`` at ``level`` (placed like ``p`` when it is a DTensor)."""
        return self.encode(distributed.zeros_folded(p, level, self.compute_dtype(p)), p, key, kind)

    def decode(self, state: dict, key: str, kind: str, p: Tensor) -> Tensor:
        """Moment ``key`` of ``state`` as a float tensor of the folded shape (may be a view)."""
        raise NotImplementedError

    def encode(self, value: Tensor, p: Tensor, key: str, kind: str) -> dict[str, Tensor]:
        """New state tensors (``keys(key)`` -> tensor) that hold the float moment ``value``."""
        raise NotImplementedError

    def write_(self, state: dict, key: str, kind: str, value: Tensor) -> None:
        """Store the float moment ``value`` into ``state``'s existing tensors, in place."""
        raise NotImplementedError

    def moment_bytes(self, rows, blocks, itemsize):
        """Bytes of one moment of ``rows x blocks`` folded elements (ints or sympy symbols);
        ``itemsize`` is the bytes of :meth:`compute_dtype` (4, or 8 for float64 params)."""
        raise NotImplementedError

    def check(self, state: dict, key: str, p: Tensor, shape: tuple[int, ...]) -> str | None:
        """Why ``state``'s moment ``key`` cannot be a moment of folded ``shape``, or None."""
        value = state.get(key)
        if not isinstance(value, Tensor):
            return f"is {type(value).__name__}, not a tensor"
        if tuple(value.shape) != tuple(shape):
            return f"has shape {list(value.shape)}, expected {list(shape)}"
        return None


class Fp32Format(StateFormat):
    """float32 moments (float64 for float64 parameters): the tensor is the moment."""

    name = "fp32"

    def decode(self, state: dict, key: str, kind: str, p: Tensor) -> Tensor:
        return state[key]

    def encode(self, value: Tensor, p: Tensor, key: str, kind: str) -> dict[str, Tensor]:
        return {key: value.to(self.compute_dtype(p)).contiguous()}

    def write_(self, state: dict, key: str, kind: str, value: Tensor) -> None:
        if state[key] is not value:
            state[key].copy_(value)

    def moment_bytes(self, rows, blocks, itemsize):
        return rows * blocks * itemsize


FORMATS: dict[str, StateFormat] = {}


def register(fmt: StateFormat) -> StateFormat:
    """Make ``fmt`` available by its name (``state_format=...``)."""
    if not fmt.name:
        raise ValueError("state formats need a name")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str, where: str = "FOAM") -> StateFormat:
    """The registered format called ``name``; a ``ValueError`` naming the choices otherwise."""
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise ValueError(f"{where}: unknown state_format={name!r}; use one of {sorted(FORMATS)}")
    return fmt


def format_of(state: dict) -> StateFormat:
    """The format a parameter's state is stored in (``fp32`` when it does not say)."""
    return FORMATS[state.get("foam_format", DEFAULT_FORMAT)]


register(Fp32Format())
