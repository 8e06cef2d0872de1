"""Every kernel variant the launchers can request compiles to a cubin for sm_90 and sm_80.

On the CPU: ``foam_compile.kernels.aot`` runs Triton's pipeline and the ptxas that ships in the
Triton wheel (no GPU, no driver), in worker processes, and reads registers and local memory
(spill space) off each cubin. The sample is :func:`aot.ci_sample` (its docstring says what it
covers; the first test checks that claim); results are cached in ``.cache/aot`` by a hash of the
kernels' source and the Triton version, so only a changed kernel is recompiled. The full set
(``python -m foam_compile.kernels.aot --all``) and its register table are in
``benchmarks/RESULTS.md``.

Bounds, and why:

* no compile error, on either architecture;
* no spill at all (``SPILL_BOUND = 0`` bytes): a streaming kernel holds at most 16 elements a
  thread and nothing that must live across the tile; any spill means a layout went wrong (the
  previous ragged path spilled up to 92 bytes) and costs local-memory traffic per element;
* a ragged launch within ``RAGGED_RATIO = 1.5`` of the registers of the even launch with the
  same level, config and flags (issue 17's bound: at more than 1.5x, ragged launches lose a
  resident program per SM against the even ones at 8 warps);
* the configs compile to distinct cubins (a duplicate config only doubles the tuning time).

Grouped state formats (int8/int4 codes, nearest and stochastic; the per-tensor kernel) and
master weights (bf16/fp16 + int8/int16 correction bits) are held to the same compile and spill
bounds (grouped formats at levels 0-4). The ragged/even ratio and the no-shuffle
rule are the float32 layouts' promises: a grouped tile reduces each group's max across the
threads that hold its 32 blocks, which takes shuffles by design, and a level-0 ragged 4-bit
launch is the one over the ratio (registers in ``benchmarks/RESULTS.md``).
"""

import collections
import dataclasses
import pathlib

import pytest

from foam_compile.kernels import aot, tuning

SPILL_BOUND = 0
RAGGED_RATIO = 1.5
CACHE = pathlib.Path(__file__).resolve().parents[2] / ".cache" / "aot"


def test_the_sample_covers_every_level_flag_dtype_and_config():
    sample = aot.ci_sample()
    multi90 = [v for v in sample if v.kernel == "multi" and v.arch == 90]
    assert {v.level for v in multi90} == set(aot.LEVELS)
    assert {v.level for v in sample if v.arch == 80} >= {0, 1, 2, 5, 10}
    assert {(v.p, v.g) for v in sample} == set(aot.DTYPE_PAIRS)
    assert {(v.tile, v.warps) for v in sample} == set(tuning.CONFIGS)
    fields = ("wd", "amsgrad", "maximize", "lr", "step", "aligned", "idx64", "even")
    for name in fields:
        assert len({getattr(v, name) for v in sample}) > 1, name
    assert {v.step for v in sample} == set(aot.STEP_KINDS)
    assert {v.lr for v in sample} == set(aot.LR_KINDS)
    assert {v.wd for v in sample} == {0, 1, 2}
    assert {v.kernel for v in sample} == {"multi", "single"}
    assert all(aot.requestable(v) for v in sample)
    assert {v.state for v in sample} == {"fp32", *aot.QUANT_STATES}
    assert {v.rho for v in sample} == {None, "int8", "int16"}
    assert {v.p for v in sample if v.rho} == {"bf16", "fp16"}
    for state in ("int8", "int4"):
        assert {v.level for v in sample if v.state == state} >= set(range(5)), state
        assert {v.arch for v in sample if v.state == state} == set(aot.ARCHS), state
    assert aot.CONFIGS == tuning.CONFIGS and len(set(tuning.CONFIGS)) == len(tuning.CONFIGS)


@pytest.fixture(scope="module")
def results():
    return aot.compile_all(aot.ci_sample(), workers=2, cache_dir=CACHE)


def test_every_variant_compiles(results):
    errors = [f"{r['variant']}: {r['error']}" for r in results if "error" in r]
    assert not errors, "\n".join(errors)


def test_no_variant_spills(results):
    over = [(r["variant"], r["local"]) for r in results if r.get("local", 0) > SPILL_BOUND]
    assert not over, over


def test_ragged_registers_within_bound_of_even(results):
    by_variant = {r["variant"]: r for r in results}
    pairs = 0
    for v, r in by_variant.items():
        if v.even or v.pair() not in by_variant or v.state != "fp32":
            continue
        even = by_variant[v.pair()]
        pairs += 1
        assert r["regs"] <= RAGGED_RATIO * even["regs"], (v, r["regs"], even["regs"])
    assert pairs >= 2


def test_configs_compile_to_distinct_cubins(results):
    by_level = collections.defaultdict(dict)
    for r in results:
        v = r["variant"]
        key = dataclasses.replace(v, tile=0, warps=0)
        by_level[key][(v.tile, v.warps)] = r["cubin_sha"]
    full = [shas for shas in by_level.values() if len(shas) == len(tuning.CONFIGS)]
    assert full, "no variant compiled at every config"
    for shas in full:
        assert len(set(shas.values())) == len(shas), shas


def test_even_tiles_are_vectorised_and_ragged_tiles_do_not_shuffle(results):
    """What the layouts promise: 128-bit loads on even tensors; on ragged ones at levels 1-2
    (blocks inside a quad) no warp shuffle at all."""
    for r in results:
        v = r["variant"]
        if v.even and v.aligned and v.p == v.g == "fp32":
            assert r["ld_v4"] > 0, v
        if not v.even and v.level <= 2 and v.state == "fp32":
            assert r["shfl"] == 0, v
