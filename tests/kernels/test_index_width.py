"""Tensors of 2**31 elements or more: int64 index arithmetic, proven without allocating them.

Two halves. (1) What the launchers request, on meta tensors of real sizes (no memory) with the
launches stubbed: ``IDX64`` from the element count, int64 tables holding the exact sizes, grids
that cover every block. (2) What the kernels do with ``IDX64``: compiled for sm_90 (on the CPU,
``foam_compile.kernels.aot``), every pointer offset in the TTIR of an ``IDX64`` launch is int64,
while the int32 launch of the same kernel does use int32 offsets (so the check can fail).
"""

import math
import os
import pathlib
import re

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from foam_compile.kernels import aot, foam_adam, plan_cache, plans  # noqa: E402
from tests.kernels.launch_stubs import folded, stub_launches  # noqa: E402

BIG = [
    ((2**16, 2**15 + 1), 2),  # ragged, 2**31 + 2**16 elements
    ((2**20, 2**11), 2),  # even, exactly 2**31
    ((2**31 + 5,), 0),  # 1-d: level 0, one flat row longer than int32
]


@pytest.fixture(autouse=True)
def fresh_plans():
    plan_cache.clear()
    yield
    plan_cache.clear()


def meta_group(shapes):
    params = [torch.empty(s, device="meta") for s, _ in shapes]
    states = [torch.empty(folded(s, lv), device="meta") for s, lv in shapes]
    return params, states


@pytest.mark.parametrize("shape, level", BIG, ids=str)
def test_grouped_launcher_requests_int64_for_2_31_elements(monkeypatch, shape, level):
    stubs = stub_launches(monkeypatch)
    (p,), (m,) = meta_group([(shape, level)])
    foam_adam.foam_adam_grouped_(
        [p], [p], [m], [m], None, [torch.tensor(1.0, device="meta")], [level], lr=1e-3
    )
    (call,) = stubs["multi"].calls
    assert call["kwargs"]["IDX64"]
    meta, chunks = call["args"][1], call["args"][2]
    assert meta.dtype == torch.int64 and chunks.dtype == torch.int32
    group = plan_cache.cached()[0].groups[0]
    rows, n, nb = plans.geometry(shape, level)
    assert group.tables.idx64 and rows * n == math.prod(shape)
    # The exact sizes reach the kernel (they do not fit int32), and the chunks cover every row
    # segment once.
    seg = plans.chunk_blocks(level)
    assert group.tables.n_chunks == rows * -(-nb // seg) == call["grid"][0]
    assert group.geoms == [(rows, n, nb)]
    if rows > 1:  # ragged: real rows of the last dim
        assert (n, nb) == (shape[-1], -(-shape[-1] // (1 << level)))
    else:  # even: one flat row
        assert (n, nb) == (math.prod(shape), math.prod(shape) >> level)
    # The same tables on the CPU hold the exact sizes, which do not fit int32.
    cpu = plans.GroupTables(group.geoms, level, torch.device("cpu"))
    assert cpu.meta.tolist() == [[n, nb, rows, -(-nb // seg)]] and cpu.meta.dtype == torch.int64


def test_grouped_launcher_keeps_int32_below_2_31(monkeypatch):
    stubs = stub_launches(monkeypatch)
    shapes = [((2**20, 2**10), 2), ((2**16, 2**14 + 1), 2)]  # 2**30 elements, even and ragged
    params, states = meta_group(shapes)
    steps = [torch.tensor(1.0, device="meta")] * 2
    foam_adam.foam_adam_grouped_(params, params, states, states, None, steps, [2, 2], lr=1e-3)
    assert [c["kwargs"]["IDX64"] for c in stubs["multi"].calls] == [False, False]
    assert all(c["args"][1].dtype == torch.int32 for c in stubs["multi"].calls)


def test_tables_hold_sizes_past_int32_exactly():
    """The shape tables, built on the CPU: int64 exactly when a size needs it."""
    big = plans.GroupTables([plans.geometry((2**31 + 5,), 0)], 0, torch.device("cpu"))
    assert big.idx64 and big.meta.dtype == torch.int64
    assert big.meta.tolist() == [[2**31 + 5, 2**31 + 5, 1, -(-(2**31 + 5) // 16384)]]
    assert big.chunks[-1].tolist() == [0, big.n_chunks - 1]
    small = plans.GroupTables([plans.geometry((2**30,), 0)], 0, torch.device("cpu"))
    assert not small.idx64 and small.meta.dtype == torch.int32


@pytest.mark.parametrize("shape, level", BIG, ids=str)
def test_single_launcher_requests_int64_and_covers_every_block(monkeypatch, shape, level):
    stubs = stub_launches(monkeypatch)
    (p,), (m,) = meta_group([(shape, level)])
    foam_adam.foam_adam_step_(p, p, m, m, lr=1e-3, step=1, level=level)
    (call,) = stubs["single"].calls
    kw = call["kwargs"]
    assert kw["IDX64"] and kw["EVEN"] == plans.is_even(shape, level)
    rows, n, nb = plans.geometry(shape, level)
    # after the 11 pointers (p, g, 3 moments, 3 scales, correction, lr, step): Triton passes
    # ints >= 2**31 as int64
    assert call["args"][11:13] == (n, nb)
    for tile in (1024, 2048, 4096):
        bb = max(1, tile >> level)
        programs = call["grid"]({"TILE": tile})[0]
        # Even: programs x BB blocks cover the flat row; ragged: every row gets ceil(nb / BB).
        assert programs == rows * -(-nb // bb)
        assert programs * bb >= rows * nb


def test_single_launcher_keeps_int32_below_2_31(monkeypatch):
    stubs = stub_launches(monkeypatch)
    (p,), (m,) = meta_group([((2**20, 2**10), 2)])
    foam_adam.foam_adam_step_(p, p, m, m, lr=1e-3, step=1, level=2)
    assert not stubs["single"].calls[0]["kwargs"]["IDX64"]


# ------------------------------------------------------------------------- the kernels
_ADDPTR = re.compile(r"tt\.addptr .* : tensor<[^>]*!tt\.ptr<[^>]*>>, tensor<\d+x(i\d+)")


def _offset_widths(ttir: str) -> set[str]:
    """Element types of every tensor offset added to a tensor of pointers."""
    return {m.group(1) for m in _ADDPTR.finditer(ttir)}


def _ttir(variants):
    cache = pathlib.Path(__file__).resolve().parents[2] / ".cache" / "aot"
    results = aot.compile_all(variants, workers=2, cache_dir=cache)
    for r in results:
        assert "error" not in r, r["error"]
    return [r["ttir"] for r in results]


def test_idx64_kernels_compute_every_offset_in_int64():
    even = aot.Variant("multi", 90, 2, True, 2048, 8)
    variants = [
        even,
        aot.Variant("multi", 90, 2, True, 2048, 8, idx64=True),
        aot.Variant("single", 90, 2, True, 2048, 8, idx64=True),
        aot.Variant("multi", 90, 0, True, 2048, 8, idx64=True),
    ]
    narrow, *wide = _ttir(variants)
    assert "i32" in _offset_widths(narrow)  # the check can see int32 offsets
    for ttir in wide:
        widths = _offset_widths(ttir)
        assert widths == {"i64"}, widths
