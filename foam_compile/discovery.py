"""Finding the live optimizers and modules that own given tensors.

A Dynamo backend is handed a graph, not the optimizer whose step it traced; the graph's
``get_attr`` nodes and example inputs are the very tensors in ``opt.state`` and
``opt.param_groups``. We find the owner by tensor identity among the live optimizers, which the
garbage collector lists (one scan per compiled graph, not per step).

Parameter names come the same way: from the model when one is given, else from the live root
module that owns each tensor (one heap scan for the tensors not seen before, then cached per
tensor). Names read as in the user's model: the wrappers that torch.compile, DDP, FSDP and
activation checkpointing put around it are looked through.
"""

from __future__ import annotations

import gc
import itertools
import weakref
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "embedding_params",
    "live_optimizers",
    "optimizers_owning",
    "owner_roots",
    "parameter_names",
    "unwrap",
]

# Parts of a qualified name that a wrapper adds: torch.compile's OptimizedModule, FSDP1's
# FullyShardedDataParallel and torch.distributed's checkpoint_wrapper.
_WRAPPER_PARTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


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


def optimizers_owning(tensors: Iterable[Tensor], *, role: str | None = None):
    """Live optimizers any of whose tensors (of ``role``, if given) is among ``tensors``."""
    ids = {id(t) for t in tensors}
    found = []
    for opt in live_optimizers():
        roles = optimizer_tensors(opt)
        if any(i in roles and (role is None or roles[i][0] == role) for i in ids):
            found.append(opt)
    return found


def unwrap(module: nn.Module) -> nn.Module:
    """The user's model inside data-parallel wrappers (DDP, DataParallel), whose names would
    otherwise start with ``module.`` and miss anchored patterns such as ``^output\\.``."""
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


def _clean(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def parameter_names(params: Iterable[Tensor], model: nn.Module | None = None) -> dict[int, str]:
    """``id(param) -> qualified name``, from ``model`` or else from the live root modules.

    A tensor reachable under several names (tied weights) gets all of them joined by ``|`` so
    that name-based policies see every role it plays.
    """
    params = list(params)
    wanted = {id(p) for p in params}
    if model is not None:
        roots = [unwrap(model)]
    else:
        found = owner_roots(params)
        roots = list({id(r): r for r in found.values() if r is not None}.values())
    names: dict[int, list[str]] = {}
    for root in roots:
        for name, p in root.named_parameters(remove_duplicate=False):
            name = _clean(name)
            if id(p) in wanted and name not in names.setdefault(id(p), []):
                names[id(p)].append(name)
    return {k: "|".join(v) for k, v in names.items() if v}


def embedding_params(params: Iterable[Tensor], model: nn.Module | None = None) -> set[int]:
    """Ids of parameters owned by ``nn.Embedding``/``nn.EmbeddingBag`` modules."""
    params = list(params)
    wanted = {id(p) for p in params}
    if model is not None:
        roots = [model]
    else:
        roots = list({id(r): r for r in owner_roots(params).values() if r is not None}.values())
    return {
        id(p)
        for root in roots
        for m in root.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        for p in m.parameters(recurse=False)
        if id(p) in wanted
    }


# parameter -> weakref to the root module that owns it (None: no module owned it when looked
# up). One optimizer per parameter (torchtune's optimizer_in_bwd) would otherwise scan the heap
# once per parameter; a scan costs 0.1-0.8 s with a few libraries imported.
_ROOT_OF: WeakIdKeyDictionary = WeakIdKeyDictionary()


def owner_roots(params: Iterable[Tensor]) -> dict[int, nn.Module | None]:
    """``id(p) -> the root module that owns p`` (``None`` if none does), data-parallel wrappers
    looked through: from the cache, else one heap scan for all the tensors not seen before."""

    def cached(p):
        if p not in _ROOT_OF:
            return False, None
        ref = _ROOT_OF[p]
        root = ref() if ref is not None else None
        return ref is None or root is not None, root

    params = list(params)
    missing = [p for p in params if not cached(p)[0]]
    if missing:
        for root in _find_roots(missing):
            ref = weakref.ref(root)
            for q in root.parameters():
                _ROOT_OF[q] = ref
        for p in missing:
            if p not in _ROOT_OF:
                _ROOT_OF[p] = None
    return {id(p): cached(p)[1] for p in params}


def _live_modules() -> list[nn.Module]:
    """Every live ``nn.Module`` but Dynamo's graph modules (one heap scan, C-speed filter)."""
    objects = gc.get_objects()
    kinds = {
        t
        for t in set(map(type, objects))
        if issubclass(t, nn.Module)
        and not issubclass(t, torch.fx.GraphModule)
        and not t.__module__.startswith(("torch._dynamo", "torch.fx"))
    }
    return list(itertools.compress(objects, map(kinds.__contains__, map(type, objects))))


def _find_roots(params: list[Tensor]) -> list[nn.Module]:
    """Modules that own any of ``params`` and are no other module's child (one heap scan).

    Data-parallel wrappers are looked through, so that names read as in the user's model.
    """
    wanted = {id(p) for p in params}
    modules = _live_modules()
    children = {id(c) for m in modules for c in m.children()}
    roots = []
    for m in modules:
        if id(m) in children:
            continue
        m = unwrap(m)
        if any(id(q) in wanted for q in m.parameters()):
            roots.append(m)
    return roots
