"""Finding the live optimizers and modules that own given tensors.

A Dynamo backend is handed a graph, not the optimizer whose step it traced; the graph's
``get_attr`` nodes and example inputs are the very tensors in ``opt.state`` and
``opt.param_groups``. We find the owner by tensor identity among the live optimizers, which the
garbage collector lists (one scan per compiled graph, not per step).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["live_optimizers", "optimizers_owning", "parameter_names"]


def live_optimizers() -> list[torch.optim.Optimizer]:
    # type(), not isinstance(): a dead weakref.proxy among the objects raises on isinstance.
    return [o for o in gc.get_objects() if issubclass(type(o), torch.optim.Optimizer)]


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[int, tuple[str, Tensor]]:
    """``id(tensor) -> (role, param)`` for every tensor an optimizer step reads or writes."""
    roles: dict[int, tuple[str, Tensor]] = {}
    for group in opt.param_groups:
        if isinstance(group.get("lr"), Tensor):
            roles[id(group["lr"])] = ("lr", group["params"][0] if group["params"] else None)
        for p in group["params"]:
            roles[id(p)] = ("param", p)
            if p.grad is not None:
                roles[id(p.grad)] = ("grad", p)
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    roles[id(value)] = (key, p)
    return roles


def optimizers_owning(tensors: Iterable[Tensor]) -> list[torch.optim.Optimizer]:
    """Live optimizers any of whose tensors is among ``tensors``."""
    ids = {id(t) for t in tensors}
    return [opt for opt in live_optimizers() if not ids.isdisjoint(optimizer_tensors(opt))]


def parameter_names(params: Iterable[Tensor], model: nn.Module | None = None) -> dict[int, str]:
    """``id(param) -> qualified name``, from ``model`` or else from the live root modules.

    A tensor reachable under several names (tied weights) gets all of them joined by ``|`` so
    that name-based policies see every role it plays.
    """
    wanted = {id(p) for p in params}
    roots = [model] if model is not None else root_modules(wanted)
    names: dict[int, list[str]] = {}
    for root in roots:
        for name, p in root.named_parameters(remove_duplicate=False):
            name = name.replace("_orig_mod.", "")  # torch.compile(model) wrappers
            if id(p) in wanted and name not in names.setdefault(id(p), []):
                names[id(p)].append(name)
    return {k: "|".join(v) for k, v in names.items()}


def embedding_params(params: Iterable[Tensor], model: nn.Module | None = None) -> set[int]:
    """Ids of parameters owned by ``nn.Embedding``/``nn.EmbeddingBag`` modules."""
    wanted = {id(p) for p in params}
    modules = (
        model.modules()
        if model is not None
        else (o for o in gc.get_objects() if issubclass(type(o), nn.Module))
    )
    return {
        id(p)
        for m in modules
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        for p in m.parameters(recurse=False)
        if id(p) in wanted
    }


def root_modules(wanted: set[int], *, unwrap: bool = False) -> list[nn.Module]:
    """Live modules holding any parameter whose id is in ``wanted`` that are no other module's
    child (one heap scan). With ``unwrap``, data-parallel wrappers are looked through, so that
    names read as in the user's model."""
    # Dynamo's graph modules (and its fake root module) hold parameters under generated names:
    # they are not a user's model.
    modules = [
        o
        for o in gc.get_objects()
        if issubclass(type(o), nn.Module)
        and not issubclass(type(o), torch.fx.GraphModule)
        and not type(o).__module__.startswith(("torch._dynamo", "torch.fx"))
    ]
    children = {id(c) for m in modules for c in m.children()}
    roots = []
    for m in modules:
        if id(m) in children:
            continue
        while unwrap and isinstance(m, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            m = m.module
        if any(id(p) in wanted for p in m.parameters()):
            roots.append(m)
    return roots
