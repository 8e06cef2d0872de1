"""Step backends: which code runs the FOAM update of a parameter, decided in one place.

A backend is a module with two functions:

* ``supports(p, g, level, fmt, hp) -> str | None``: ``None`` if it takes this parameter, else
  the reason it does not (said once in the log);
* ``step_(params, grads, states, hp)``: one step of those parameters, in place (``states[i]`` is
  parameter ``i``'s state dict, its ``step`` already incremented, unless the module sets
  ``INCREMENTS_STEPS = True``: then ``step_`` increments it).

A bfloat16/float16 parameter with correction bits (``hp.master_weights``, issue 13) goes only to
a backend whose module sets ``MASTER_WEIGHTS = True`` (plain torch today): a fast path written
before the corrections existed would step ``p`` and leave its correction stale. The fused paths
opt in once their kernels read and write the correction.

The registry lists backends in priority order with the device types they serve; :func:`select`
asks each in turn and the plain-torch backend takes whatever is left. A backend's module is
imported the first time a parameter of one of its devices is seen (:func:`prepare` does it
eagerly, outside any trace), so ``import foam_compile`` never loads Triton.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from ..hyper import Hyper
from ..master_weights import uses_correction
from ..state import StateFormat, format_of

__all__ = ["Backend", "plan", "prepare", "register", "registered", "select", "step_lists"]

log = logging.getLogger("foam_compile")


@dataclass(frozen=True)
class Backend:
    """A registry entry: the module is imported when a parameter of ``devices`` first needs it."""

    name: str
    module: str
    devices: tuple[str, ...] | None  # device types served; None: any device

    def serves(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices


_REGISTRY: list[Backend] = []
_MODULES: dict[str, ModuleType | None] = {}
_SAID: set[tuple] = set()


def register(
    name: str, module: str, devices: Sequence[str] | None = None, *, before: str | None = None
) -> Backend:
    """Add a backend, ahead of ``before`` (default: just ahead of the plain-torch fallback)."""
    entry = Backend(name, module, None if devices is None else tuple(devices))
    _REGISTRY[:] = [b for b in _REGISTRY if b.name != name]
    names = [b.name for b in _REGISTRY]
    anchor = before if before is not None else ("torch" if "torch" in names else None)
    at = names.index(anchor) if anchor in names else len(_REGISTRY)
    _REGISTRY.insert(at, entry)
    _MODULES.pop(name, None)
    return entry


def registered() -> list[str]:
    """Backend names in the order :func:`select` asks them."""
    return [b.name for b in _REGISTRY]


def step_lists(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict], hp: Hyper
):
    """The step ops' first six arguments (``foam::cpu_step_``, ``foam::adam_step_grouped_``):
    parameters, gradients, the moments of ``states`` (the max one only with amsgrad) and their
    step counts, as lists."""
    return (
        list(params),
        list(grads),
        [st["exp_avg"] for st in states],
        [st["exp_avg_sq"] for st in states],
        [st["max_exp_avg_sq"] for st in states] if hp.amsgrad else [],
        [st["step"] for st in states],
    )


def _load(entry: Backend) -> ModuleType | None:
    if entry.name not in _MODULES:
        try:
            _MODULES[entry.name] = importlib.import_module(entry.module)
        except ImportError as exc:  # e.g. no triton on this machine: the next backend serves
            _MODULES[entry.name] = None
            log.info("foam: step backend %r is unavailable here (%s)", entry.name, exc)
    return _MODULES[entry.name]


def prepare(tensors: Sequence[Tensor]) -> None:
    """Import the backends that serve these tensors' devices now, not inside a compiled trace."""
    for device_type in {t.device.type for t in tensors}:
        for entry in _REGISTRY:
            if entry.serves(device_type):
                _load(entry)


def _say_once(key: tuple, level: int, message: str, *args) -> None:
    if (
        key not in _SAID and not torch.compiler.is_compiling()
    ):  # logging is not traced; the eager call says it
        _SAID.add(key)
        log.log(level, message, *args)


def select(p: Tensor, g: Tensor, level: int, fmt: StateFormat, hp: Hyper) -> ModuleType:
    """The backend module that steps ``p``: the first registered one that supports it."""
    device = p.device.type
    declined = []
    for entry in _REGISTRY:
        if not entry.serves(device):
            continue
        module = _load(entry)
        if module is None:
            continue
        reason = module.supports(p, g, level, fmt, hp)
        if reason is None and not getattr(module, "MASTER_WEIGHTS", False):
            if uses_correction(p, hp.master_weights):
                reason = (
                    f"it does not read correction bits yet (master_weights="
                    f"{hp.master_weights!r}); they run in plain torch"
                )
        if reason is None:
            if declined:
                name, why = declined[0]
                _say_once(
                    (device, name, why),
                    logging.INFO,
                    "foam: a %s parameter (%s, level %d) runs the %r step backend: %s",
                    device,
                    p.dtype,
                    level,
                    entry.name,
                    why,
                )
            elif entry.devices is None and not any(
                b.devices for b in _REGISTRY if b.serves(device)
            ):
                _say_once(
                    (device,),
                    logging.WARNING,
                    "foam: no fast step for %s parameters; they run the plain-torch update "
                    "(correct, not fused)",
                    device,
                )
            return module
        declined.append((entry.name, reason))
    raise RuntimeError(f"foam: no step backend takes a {device} parameter: {declined}")


def plan(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict], hp: Hyper
) -> list[tuple[ModuleType, list[int]]]:
    """``[(backend, indices)]``: the parameters each backend steps, in first-seen order."""
    chosen: dict[str, tuple[ModuleType, list[int]]] = {}
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        module = select(p, g, st["foam_level"], format_of(st), hp)
        chosen.setdefault(module.__name__, (module, []))[1].append(i)
    return list(chosen.values())


# Priority order: the first that supports a parameter steps it.
register("torch", "foam_compile.backends.plain_torch")
register("triton", "foam_compile.backends.triton_cuda", ("cuda",))
register("cpu", "foam_compile.backends.cpu", ("cpu",))
