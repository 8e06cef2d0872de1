"""Host-side tables of the multi-tensor kernel: built once per shape, refreshed without a sync.

A group (tensors of one launch) needs three device tables:

* ``meta [T, 4]``: per tensor ``(n, nb, rows, segments per row)``, the tensor seen as ``rows x
  n`` with ``nb`` blocks a row. A tensor whose last dim is a multiple of ``2**level`` (*even*) is
  one row of ``numel`` elements: blocks never cross rows then, so the flat view is the same.
* ``chunks [C, 2]``: per program ``(tensor, segment)``; a segment is ``chunk_blocks`` blocks of
  one row (a row of a ragged tensor starts a new segment, so no program ever crosses a row).
* ``ptrs [T * 6]``: per tensor the addresses of ``p, g, exp_avg, exp_avg_sq, max_exp_avg_sq``
  and of its step counter (0 when the step is not read on the device).

The first two depend only on shapes and the level: :class:`GroupTables` builds them once, with
numpy, and they never change. Only the pointer table depends on addresses. :class:`PointerSlots`
keeps a few device copies of it, keyed by the address tuple: a step whose tensors sit where they
sat before (the steady state) touches nothing; a step whose addresses are new (gradients
reallocated by ``zero_grad(set_to_none=True)`` at other addresses) writes them into a pinned
host row and copies it with ``non_blocking=True`` (no sync; legal inside CUDA-graph capture,
where the copy becomes a graph node that re-reads that pinned row, which is then never
rewritten). Slots used during a capture are never reused, so a graph's table outlives it.

Index width. ``meta`` is int64 when a tensor has 2**31 elements or more (the kernels then do
their index arithmetic in int64: ``IDX64``); ``chunks`` holds segment numbers, which fit int32
for any tensor that fits in memory.

This module imports nothing from the rest of foam_compile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["CHUNK_ELEMS", "IDX64_LIMIT", "NCOLS", "GroupTables", "PointerSlots", "geometry"]

# A program walks one segment of this many elements (a multiple of every TILE).
CHUNK_ELEMS = 16384
# Element offsets up to numel + one tile are formed; below this they all fit int32.
IDX64_LIMIT = 2**31 - 2**20
NCOLS = 6  # p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, step
META_COLS = 4


def geometry(shape: Sequence[int], level: int) -> tuple[int, int, int]:
    """``(rows, n, nb)``: the tensor as ``rows`` rows of ``n`` elements and ``nb`` blocks.

    Even tensors (and level 0) are one flat row; a ragged tensor keeps its real rows.
    """
    numel = math.prod(shape)
    if level == 0:
        return 1, numel, numel
    n = shape[-1]
    if n % (1 << level) == 0:
        return 1, numel, numel >> level
    return numel // n, n, -(-n // (1 << level))


def is_even(shape: Sequence[int], level: int) -> bool:
    return level == 0 or shape[-1] % (1 << level) == 0


def needs_idx64(numel: int) -> bool:
    return numel >= IDX64_LIMIT


def chunk_blocks(level: int) -> int:
    return max(1, CHUNK_ELEMS >> level)


class GroupTables:
    """The shape-only tables of one group (see the module docstring); built once."""

    def __init__(self, geoms: Sequence[tuple[int, int, int]], level: int, device: torch.device):
        cb = chunk_blocks(level)
        geo = np.asarray(geoms, dtype=np.int64).reshape(-1, 3)
        rows, n, nb = geo[:, 0], geo[:, 1], geo[:, 2]
        spr = -(-nb // cb)  # segments per row
        counts = rows * spr
        total = int(counts.sum())
        if total >= 2**31:
            raise ValueError(f"a group of {total} chunks does not fit the int32 chunk table")
        first = np.cumsum(counts) - counts
        tensor = np.repeat(np.arange(len(geo), dtype=np.int64), counts)
        segment = np.arange(total, dtype=np.int64) - np.repeat(first, counts)
        meta = np.stack([n, nb, rows, spr], axis=1)
        self.idx64 = bool(any(needs_idx64(int(r * c)) for r, c in zip(rows, n)))
        meta_dtype = np.int64 if self.idx64 or int(meta.max(initial=0)) >= 2**31 else np.int32
        self.level = level
        self.chunk_blocks = cb
        self.n_chunks = total
        self.n_tensors = len(geo)
        self.meta = _to_device(meta.astype(meta_dtype), device)
        self.chunks = _to_device(np.stack([tensor, segment], axis=1).astype(np.int32), device)


def _to_device(array: np.ndarray, device: torch.device) -> Tensor:
    # Once per shape signature, outside any capture (the launcher refuses to build a plan while
    # a CUDA graph is being captured).
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class PointerSlots:
    """Device copies of a group's pointer table, one per address tuple seen (a few, LRU).

    ``get(addrs)`` returns the ``[T * 6]`` int64 device row holding ``addrs``. A hit does
    nothing on the device. A miss writes a slot's pinned host row and copies it with
    ``non_blocking=True``. Outside a capture the slot is a free one or the least recently used
    one that no captured graph reads; an event recorded after the copy guards its host row
    against being rewritten before the copy has read it (the host may run steps ahead of the
    device). Inside a capture no event may be waited on or recorded, so a miss takes one of the
    ``spare`` slots, which are never filled outside a capture (nothing can be pending on
    them). Every slot a capture reads or writes is kept for the life of the process.
    """

    def __init__(self, width: int, device: torch.device, n_slots: int = 4, n_spare: int = 2):
        self.device = device
        self.width = width
        self.rows: list[Tensor] = []
        self.host: list[Tensor] = []
        self.host_np: list = []  # numpy views of the host rows: no aten op per fill
        self.addrs: list[tuple | None] = []
        self.aligned: list[bool] = []
        self.events: list = []
        self.last_use: list[int] = []
        for _ in range(n_slots + n_spare):
            self._add_slot()
        self.spare = list(range(n_slots, n_slots + n_spare))
        self.captured: set[int] = set()
        self.by_addrs: dict[tuple, int] = {}
        self.clock = 0
        self.fills = 0  # host-to-device copies made (tests and benchmarks read it)

    def _add_slot(self) -> int:
        pin = self.device.type == "cuda"
        self.rows.append(torch.empty(self.width, dtype=torch.int64, device=self.device))
        self.host.append(torch.zeros(self.width, dtype=torch.int64, pin_memory=pin))
        self.host_np.append(self.host[-1].numpy())
        self.addrs.append(None)
        self.aligned.append(False)
        self.events.append(None)
        self.last_use.append(0)
        return len(self.rows) - 1

    def get(self, addrs: tuple) -> tuple[Tensor, bool]:
        """``(device row, every address 16-byte aligned)`` for this address tuple."""
        in_capture = capturing(self.device)
        slot = self.by_addrs.get(addrs)
        if slot is None:
            slot = self._fill(addrs, in_capture)
        self.clock += 1
        self.last_use[slot] = self.clock
        if in_capture:
            self.captured.add(slot)
        return self.rows[slot], self.aligned[slot]

    def _victim(self, in_capture: bool) -> int:
        if in_capture:
            if not self.spare:
                raise RuntimeError(
                    "foam: more new tensor addresses inside CUDA-graph captures than spare "
                    "pointer tables; run an eager step with the tensors a graph will read "
                    "before capturing it"
                )
            return self.spare.pop(0)
        usable = [i for i in range(len(self.rows)) if i not in self.spare]
        free = [i for i in usable if self.addrs[i] is None]
        if free:
            return free[0]
        reusable = [i for i in usable if i not in self.captured]
        if not reusable:  # every slot is read by a captured graph: add one (outside a capture)
            return self._add_slot()
        return min(reusable, key=self.last_use.__getitem__)

    def _fill(self, addrs: tuple, in_capture: bool) -> int:
        slot = self._victim(in_capture)
        old = self.addrs[slot]
        if old is not None:
            del self.by_addrs[old]
        if self.events[slot] is not None:  # never inside a capture: spare slots have no event
            self.events[slot].synchronize()  # the previous copy out of this host row is done
            self.events[slot] = None
        self.host_np[slot][:] = addrs
        self.rows[slot].copy_(self.host[slot], non_blocking=True)
        if self.device.type == "cuda" and not in_capture:
            self.events[slot] = torch.cuda.Event()
            self.events[slot].record()
        self.addrs[slot] = addrs
        # Step counters (4-byte scalars) are read one at a time; only bulk tensors need 16 bytes.
        self.aligned[slot] = all(a % 16 == 0 for k, a in enumerate(addrs) if k % NCOLS != NCOLS - 1)
        self.by_addrs[addrs] = slot
        self.fills += 1
        return slot
