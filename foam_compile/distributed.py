"""FOAM's folded state for ``DTensor`` parameters (FSDP2, tensor parallel) and DDP.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns each parameter into a ``DTensor`` sharded on
dim 0; FOAM folds the *last* dim, and blocks never cross rows (ALGORITHM.md, "Folding"). So the
folded state of a shard is the shard of the folded state: every rank folds its local rows, the
update math runs on local tensors (``p.to_local()``, ``p.grad.to_local()``, the state's local
tensors) with no communication, and the result equals single-process FOAM.

The state of a ``DTensor`` parameter is itself a ``DTensor`` with the parameter's mesh and
placements and the *global* folded shape ``[..., ceil(n / 2**level)]``. That is what
``torch.distributed.checkpoint`` needs to save on N ranks and load on M: it sees each rank's
chunk of a global tensor, exactly as for AdamW's full-size moments
(``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` then need nothing FOAM-specific).

Sharding the last dim is fine when every shard boundary falls on a block boundary: with ``W``
shards of ``n`` elements (``torch.chunk`` sizes, ``c = ceil(n / W)``), when ``c`` is a multiple of
``B = 2**level``; then the state's own chunks (``ceil(nb / W) = c / B`` blocks) line up with the
parameter's, and the partial last block, if any, lies whole on the last non-empty shard. Any other
last-dim sharding would put a block on two ranks; :func:`check_foldable` refuses it, naming the
parameter and the fixes. 0-d and 1-d parameters run at level 0, so any sharding of them is fine.

DDP needs nothing: its parameters are plain tensors and every rank holds the same averaged
gradient, so every rank runs the same FOAM step.

Where the package calls this module (see the docstring of each function):

- state formats create moments with :func:`zeros_folded` (``state.StateFormat.zeros``); the
  checkpoint migrations create, encode and decode every format's state tensors with
  :func:`format_zeros` / :func:`format_encode` / :func:`format_decode`, which run the format on
  this rank's local tensors and place each state tensor (codes, scales, ...) like the parameter;
- ``foam_adam_`` runs on :func:`local_states` of its parameters, gradients and states;
- the checkpoint migrations (``checkpoint.py``) fold and unfold with :func:`fold` /
  :func:`unfold` (drop-in for ``reference.fold`` / ``unfold``) and place loaded moments with
  :func:`like_param`.

``torch.distributed.tensor`` is imported only when a ``DTensor`` can exist: no tensor is one
before that module is loaded, so plain training never pays for the import.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from . import reference
from .reference import folded_shape

__all__ = [
    "check_foldable",
    "check_format_shards",
    "fold",
    "format_decode",
    "format_encode",
    "format_zeros",
    "is_dtensor",
    "like_param",
    "local",
    "local_numel",
    "local_states",
    "unfold",
    "zeros_folded",
]


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``DTensor`` (without importing ``torch.distributed.tensor``)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _local_shape(global_shape, like: Tensor) -> tuple[int, ...]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, _ = compute_local_shape_and_global_offset(
        torch.Size(global_shape), like.device_mesh, like.placements
    )
    return tuple(local_shape)


def local(t: Tensor | None) -> Tensor | None:
    """The tensor this rank holds: ``t.to_local()`` for a ``DTensor``, ``t`` otherwise.

    In-place updates of the result update ``t`` (it is the ``DTensor``'s own local tensor).
    """
    return t.to_local() if is_dtensor(t) else t


def local_numel(t: Tensor) -> int:
    """Elements this rank stores (``explain()``'s per-rank bytes)."""
    return local(t).numel()


# --------------------------------------------------------------------------- placements
def _name_of(p: Tensor, what: str | None) -> str:
    if what:
        return what
    # Only on the error path: scanning the live modules for the name is slow but exact.
    from .discovery import parameter_names

    name = parameter_names([p]).get(id(p))
    return f"parameter {name!r}" if name else f"a parameter of shape {list(p.shape)}"


def _last_dim_shards(p: Tensor) -> list[tuple[int, object]]:
    """``(mesh_dim, placement)`` for each placement of ``p`` that shards its last dim."""
    last = p.dim() - 1
    out = []
    for mesh_dim, placement in enumerate(p.placements):
        dim = getattr(placement, "dim", None)  # Shard and _StridedShard (not a Shard subclass)
        if dim is not None and dim % p.dim() == last:
            out.append((mesh_dim, placement))
    return out


def check_foldable(p: Tensor, level: int, what: str | None = None) -> None:
    """Raise a ``ValueError`` if ``p``'s sharding would put a block of ``2**level`` on two ranks.

    Plain tensors, level 0, and ``DTensor``s that do not shard the last dim always pass. The
    check depends only on the global shape, the placements and the mesh shape, so every rank
    reaches the same verdict (no rank raises alone and leaves the others in a collective).
    """
    if not is_dtensor(p) or level == 0 or p.dim() == 0:
        return
    block = 2**level
    fix_level = (
        "or keep it unfolded (foam_compile.convert(..., levels={name: 0}), or a FOAM param group "
        "with level=0)"
    )
    for placement in p.placements:
        if placement.is_partial():
            raise ValueError(
                f"FOAM: {_name_of(p, what)} (shape {list(p.shape)}) has a Partial placement "
                f"{tuple(p.placements)}; FOAM folds parameter values, which must be Shard or "
                "Replicate. Redistribute it to Shard/Replicate before the optimizer sees it."
            )
    shards = _last_dim_shards(p)
    if not shards:
        return
    n = p.shape[-1]
    mesh_dim, placement = shards[0]
    if len(shards) > 1 or not placement.is_shard():
        raise ValueError(
            f"FOAM: {_name_of(p, what)} (shape {list(p.shape)}, placements "
            f"{tuple(p.placements)}) shards its last dim in a layout FOAM does not split into "
            f"whole blocks of 2**{level}={block}. Fix: shard it on dim 0 (FSDP2's default; in "
            f"fully_shard(shard_placement_fn=...) return Shard(0) for it), {fix_level}."
        )
    world = p.device_mesh.size(mesh_dim)
    chunk = math.ceil(n / world)
    if world == 1 or chunk >= n or chunk % block == 0:
        return
    raise ValueError(
        f"FOAM: {_name_of(p, what)} (shape {list(p.shape)}, placements {tuple(p.placements)}) "
        f"is sharded on its last dim, which FOAM folds in blocks of 2**{level}={block}: its "
        f"{world} shards of the {n} columns start at multiples of {chunk}, so a block would span "
        f"two ranks. Fix: shard it on dim 0 (FSDP2's default; in "
        f"fully_shard(shard_placement_fn=...) return Shard(0) for it), use a shard count W "
        f"with ceil({n} / W) a multiple of {block}, {fix_level}."
    )


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def _wrap_like(local_tensor: Tensor, like: Tensor, global_shape: Sequence[int]) -> Tensor:
    """A ``DTensor`` on ``like``'s mesh and placements whose local part is ``local_tensor``."""
    from torch.distributed.tensor import DTensor

    global_shape = torch.Size(global_shape)
    out = DTensor.from_local(
        local_tensor,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=global_shape,
        stride=_contiguous_stride(global_shape),
    )
    # torch.distributed.checkpoint finds each rank's chunk from the global shape and placements;
    # a local tensor of another size would be saved to the wrong place. check_foldable makes this
    # impossible; keep the check so that a layout we did not foresee fails loudly.
    expected = _local_shape(global_shape, like)
    if expected != tuple(local_tensor.shape):
        raise RuntimeError(
            f"FOAM: folded state of local shape {list(local_tensor.shape)} does not match the "
            f"shard {list(expected)} that placements {tuple(like.placements)} give the global "
            f"shape {list(global_shape)}; please report this layout."
        )
    return out


# ------------------------------------------------------------------------- state tensors
def zeros_folded(p: Tensor, level: int, dtype: torch.dtype, what: str | None = None) -> Tensor:
    """Zero moments in ``p``'s folded shape at ``level`` (the caller applies ``effective_level``).

    A plain tensor for a plain ``p``; for a ``DTensor`` ``p``, a ``DTensor`` with ``p``'s mesh
    and placements, the global folded shape, and local part ``zeros(fold_shape(p.to_local()))``
    on ``p``'s local device. Raises (see :func:`check_foldable`) if the sharding splits blocks.
    Wired in ``FOAM._new_state``: ``torch.zeros(shape, dtype=dtype, device=p.device)`` becomes
    ``zeros_folded(p, level, dtype)``.
    """
    if not is_dtensor(p):
        return torch.zeros(folded_shape(p.shape, level), dtype=dtype, device=p.device)
    check_foldable(p, level, what)
    mine = p.to_local()
    zeros = torch.zeros(folded_shape(mine.shape, level), dtype=dtype, device=mine.device)
    return _wrap_like(zeros, p, folded_shape(p.shape, level))


def _fold_local(x: Tensor, level: int) -> Tensor:
    if level and x.dim() and x.shape[-1] == 0:  # an empty last-dim shard: reference.fold indexes
        return x.new_zeros(folded_shape(x.shape, level))
    return reference.fold(x, level)


def fold(x: Tensor, level: int) -> Tensor:
    """``reference.fold`` that also takes a ``DTensor``: each rank folds its shard.

    Drop-in for ``reference.fold`` where a full-size moment is folded (``convert``,
    ``load_state_dict`` of a stock AdamW checkpoint, ``set_levels``).
    """
    if not is_dtensor(x):
        return reference.fold(x, level)
    if level == 0:
        return x
    check_foldable(x, level)
    return _wrap_like(_fold_local(x.to_local(), level), x, folded_shape(x.shape, level))


def _local_size(n: int, y: Tensor, dim: int) -> int:
    """This rank's size of a global dim ``dim`` of length ``n`` under ``y``'s placements."""
    shape = list(y.shape)
    shape[dim] = n
    return _local_shape(shape, y)[dim]


def unfold(y: Tensor, level: int, n: int) -> Tensor:
    """``reference.unfold`` that also takes a ``DTensor``: each rank unfolds its shard.

    ``n`` is the global last dim; a rank holding a last-dim shard unfolds to its own part of it.
    """
    if not is_dtensor(y):
        return reference.unfold(y, level, n)
    if level == 0:
        return y
    full_shape = (*y.shape[:-1], n)
    n_local = _local_size(n, y, y.dim() - 1) if _last_dim_shards(y) else n
    mine = reference.unfold(y.to_local(), level, n_local)
    # The alignment that check_foldable guarantees for the parameter holds for its unfolding.
    return _wrap_like(mine.contiguous(), y, full_shape)


def like_param(value: Tensor, p: Tensor, level: int = 0) -> Tensor:
    """A loaded moment placed like parameter ``p``'s state.

    For a ``DTensor`` ``p``: a ``DTensor`` value is redistributed to ``p``'s placements if they
    differ (a collective: every rank loads); a plain tensor of the global folded shape (a full
    state dict, e.g. saved without FSDP) is sliced locally to this rank's shard. For a plain
    ``p`` the value is returned as is. Wired in ``FOAM.load_state_dict`` after the dtype cast.
    """
    if not is_dtensor(p):
        if is_dtensor(value):
            raise ValueError(
                "FOAM.load_state_dict: a DTensor moment for a plain (unsharded) parameter; load "
                "it with torch.distributed.checkpoint (get/set_optimizer_state_dict), which "
                "reshards, or pass value.full_tensor()"
            )
        return value
    check_foldable(p, level)
    if is_dtensor(value):
        if value.device_mesh == p.device_mesh and tuple(value.placements) == tuple(p.placements):
            return value
        return value.redistribute(p.device_mesh, p.placements)
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank already holds the full value; slice, do not communicate.
    return distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)


def local_states(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict]
) -> tuple[list[Tensor], list[Tensor], list[dict]]:
    """The local tensors of FOAM's parameters, gradients and states, for the update math.

    Plain tensors pass through. For a ``DTensor`` parameter the gradient and every state tensor
    (but the 0-d ``step``) must be ``DTensor``s with the parameter's placements (else a local
    view would pair rows of different shards, a silently wrong update): checked here, with an
    error that says which.
    """
    if not any(is_dtensor(p) for p in params):
        return list(params), list(grads), list(states)
    out_params, out_grads, out_states = [], [], []
    for p, g, st in zip(params, grads, states):
        if is_dtensor(p):
            others = [("gradient", g)] + [
                (key, t) for key, t in st.items() if isinstance(t, Tensor) and key != "step"
            ]
            for role, t in others:
                if not is_dtensor(t) or tuple(t.placements) != tuple(p.placements):
                    got = tuple(t.placements) if is_dtensor(t) else "a plain tensor"
                    raise RuntimeError(
                        f"FOAM: {_name_of(p, None)} is a DTensor with placements "
                        f"{tuple(p.placements)} but its {role} is {got}; FOAM's state must be "
                        "sharded like its parameter. Create the optimizer after fully_shard(), "
                        "and load checkpoints with torch.distributed.checkpoint or "
                        "load_state_dict()."
                    )
        out_params.append(local(p))
        out_grads.append(local(g))
        out_states.append({k: local(v) if is_dtensor(v) else v for k, v in st.items()})
    return out_params, out_grads, out_states


# ------------------------------------------------------------------- formatted state tensors
# A state format (state.StateFormat) works on plain tensors: its codes and side tensors (e.g.
# one scale per group of the last dim) are laid out from the shape of the parameter it is given.
# For a DTensor parameter the format runs on the local shard, and each resulting tensor is
# wrapped on the parameter's mesh and placements with the global shape the format gives the
# parameter's global shape (found on a meta tensor: no data is made). That is exact when every
# rank's local tensors are its chunks of the global ones: always for dim-0 shards of a >= 2-d
# parameter (FSDP2's default; groups run along the last dim); for a sharded last dim (a 1-d
# parameter under FSDP2, or Shard(-1)) only when the shard boundaries fall on group boundaries.
# check_format_shards refuses the other layouts, naming the parameter.


def _format_shapes(fmt, shape, dtype, level: int, key: str, kind: str) -> dict[str, tuple]:
    meta = torch.empty(tuple(shape), dtype=dtype, device="meta")
    return {k: tuple(v.shape) for k, v in fmt.zeros(meta, level, key, kind).items()}


def _chunks(n: int, world: int) -> list[int]:
    """``torch.chunk`` sizes of ``n`` over ``world`` (Shard's split; trailing ranks may get 0)."""
    c = math.ceil(n / world) if n else 0
    return [max(0, min(c, n - r * c)) for r in range(world)]


def check_format_shards(fmt, p: Tensor, level: int, key: str, kind: str, what=None) -> dict:
    """The global shapes of ``fmt``'s tensors for moment ``key`` of ``p`` at ``level``;
    ``ValueError`` unless, on every rank, the format's tensors for the local shard are that
    rank's chunks of them (new states, and checkpoints loaded into a ``DTensor`` parameter).

    Depends only on the global shape, the placements and the mesh: every rank gets the same
    verdict (none raises alone). Plain ``p``: nothing to check.
    """
    if not is_dtensor(p):
        return {}
    shapes = _format_shapes(fmt, p.shape, p.dtype, level, key, kind)
    shards = _last_dim_shards(p) if p.dim() else []
    if not shards:
        return shapes
    world = p.device_mesh.size(shards[0][0])
    for r, size in enumerate(_chunks(p.shape[-1], world)):
        mine = _format_shapes(fmt, (*p.shape[:-1], size), p.dtype, level, key, kind)
        for k, shape in shapes.items():
            want = _chunks(shape[-1], world)[r] if shape else None
            if (mine[k][-1] if mine[k] else None) != want:
                raise ValueError(
                    f"FOAM: {_name_of(p, what)} (shape {list(p.shape)}, placements "
                    f"{tuple(p.placements)}) is sharded on its last dim over {world} ranks, "
                    f"and state_format={fmt.name!r} keeps {k!r} in groups along that dim that "
                    "the shards would split. Fix: keep this parameter in state_format='fp32' "
                    "(FOAM._set_layout(p, state_format='fp32'), or a param group without "
                    "state_format), or shard it so that each shard's length is a multiple of "
                    f"the format's group times 2**level={2**level}."
                )
    return shapes


def format_zeros(fmt, p: Tensor, level: int, key: str, kind: str, what=None) -> dict:
    """``fmt.zeros(p, level, key, kind)``; for a ``DTensor`` ``p`` each tensor placed like it."""
    if not is_dtensor(p):
        return fmt.zeros(p, level, key, kind)
    check_foldable(p, level, what)
    shapes = check_format_shards(fmt, p, level, key, kind, what)  # before any allocation
    mine = fmt.zeros(p.to_local(), level, key, kind)
    return {k: _wrap_like(v, p, shapes[k]) for k, v in mine.items()}


def format_encode(
    fmt, value: Tensor, p: Tensor, level: int, key: str, kind: str, what=None
) -> dict:
    """``fmt.encode(value, p, key, kind)`` of the folded moment ``value`` (at ``level``).

    For a ``DTensor`` ``p``: ``value`` is placed like ``p`` first (:func:`like_param`: a
    ``DTensor`` is redistributed if need be, a plain full value is sliced), the format encodes
    the local shard, and each new tensor is placed like ``p``.
    """
    if not is_dtensor(p):
        return fmt.encode(value, p, key, kind)
    check_foldable(p, level, what)
    shapes = check_format_shards(fmt, p, level, key, kind, what)
    mine = fmt.encode(like_param(value, p, level).to_local(), p.to_local(), key, kind)
    return {k: _wrap_like(v, p, shapes[k]) for k, v in mine.items()}


def format_decode(fmt, state: dict, key: str, kind: str, p: Tensor) -> Tensor:
    """``fmt.decode(state, key, kind, p)``; for a ``DTensor`` ``p`` the folded moment is a
    ``DTensor`` placed like ``p`` (each rank decodes its own codes and side tensors)."""
    if not is_dtensor(p):
        return fmt.decode(state, key, kind, p)
    mine = {k: local(v) if is_dtensor(v) else v for k, v in state.items()}
    value = fmt.decode(mine, key, kind, p.to_local())
    level = reference.effective_level(p.shape, state.get("foam_level", 0))
    return _wrap_like(value.contiguous(), p, folded_shape(p.shape, level))
