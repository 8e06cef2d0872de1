"""Tuning of the kernels' launch configs: distinct configs, one tuning per key, kept on disk."""

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from foam_compile.kernels import foam_adam, plan_cache, tuning  # noqa: E402
from tests.kernels.launch_stubs import make_group, stub_launches  # noqa: E402


def test_configs_are_distinct_and_ragged_ones_hold_8_elements_a_thread():
    assert len(set(tuning.CONFIGS)) == len(tuning.CONFIGS)
    assert tuning.NUM_STAGES == 1
    for tile, warps in tuning.CONFIGS:
        assert tile % (32 * warps) == 0
    ragged = [c for c in tuning.CONFIGS if tuning.allowed(c, even=False)]
    assert ragged and all(t // (32 * w) <= tuning.RAGGED_ELEMS_PER_THREAD for t, w in ragged)
    assert tuning.DEFAULT in ragged  # the untuned config runs every launch


def test_size_buckets_saturate():
    sat = tuning.saturation_elems("cpu")
    assert sat == 1 << 25
    assert tuning.size_bucket(10, sat) == 16  # tiny groups share the smallest bucket
    assert tuning.size_bucket(3 << 20, sat) == (3 << 20).bit_length()
    # A 1.2 G-element group is tuned as a saturated one (the scratch is not 1.2 G).
    assert tuning.size_bucket(1_200_000_000, sat) == tuning.size_bucket(sat, sat)


def test_choices_persist_on_disk(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    monkeypatch.setenv("FOAM_TUNE_CACHE", str(path))
    monkeypatch.setattr(tuning, "is_interpreting", lambda: False)
    tuning.reset_memory_cache()
    fields = ("torch.float32", "torch.float32", 2, False, 0, 25)
    try:
        assert tuning.cached_choice("H200", "abc", fields) is None
        tuning.record_choice("H200", "abc", fields, (2048, 8), {(2048, 8): 1.0, (1024, 4): 1.2})
        tuning.reset_memory_cache()  # a new process
        assert tuning.cached_choice("H200", "abc", fields) == (2048, 8)
        assert tuning.cached_choice("A100", "abc", fields) is None  # keyed by device
        assert tuning.cached_choice("H200", "new source", fields) is None  # and by kernel
        data = json.loads(path.read_text())
        (entry,) = data.values()
        assert entry["TILE"] == 2048 and entry["ms"] == {"2048x8": 1.0, "1024x4": 1.2}
        # A stale entry (a config no longer in the list) is ignored, not used.
        key = next(iter(data))
        data[key]["TILE"] = 999
        path.write_text(json.dumps(data))
        tuning.reset_memory_cache()
        assert tuning.cached_choice("H200", "abc", fields) is None
    finally:
        tuning.reset_memory_cache()


def test_the_interpreter_never_writes_the_disk_cache(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    monkeypatch.setenv("FOAM_TUNE_CACHE", str(path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tuning.record_choice("cpu", "x", (1,), (1024, 4))
    assert not path.exists()


@pytest.fixture
def tuned(monkeypatch):
    """Tuning switched on, the timing replaced by a recorder; launches stubbed."""
    plan_cache.clear()
    foam_adam._MULTI_TUNED.clear()
    stub_launches(monkeypatch)
    monkeypatch.setattr(tuning, "autotune_enabled", lambda: True)
    calls = []

    def fake_tune(group, hp, bucket):
        calls.append((group.level, group.even, bucket))
        choices = tuning.configs(group.even)
        return choices[-1], {c: float(i) for i, c in enumerate(choices)}

    monkeypatch.setattr(foam_adam, "_tune_multi", fake_tune)
    yield calls
    plan_cache.clear()
    foam_adam._MULTI_TUNED.clear()


def test_one_tuning_per_key(tuned):
    """Groups of one (dtypes, level, evenness, format, bucket) share a tuning; a ragged group
    is its own key and only ragged-allowed configs are timed for it."""
    a = make_group([((8, 64), 2), ((8, 61), 2)], device="cpu")
    b = make_group([((16, 64), 2), ((3, 61), 2), ((5,), 0)], device="cpu")
    for group in (a, b, a):
        params, grads, ms, vs, steps, levels = group
        foam_adam.foam_adam_grouped_(params, grads, ms, vs, None, steps, levels, lr=1e-3)
    assert sorted(tuned) == [(0, True, 12), (2, False, 12), (2, True, 12)]
    ragged = [c for k, c in foam_adam._MULTI_TUNED.items() if k[1][3] is False]
    assert ragged and all(tuning.allowed(c, even=False) for c in ragged)


def test_the_single_kernel_prunes_ragged_configs(monkeypatch):
    import triton

    monkeypatch.setattr(tuning, "autotune_enabled", lambda: True)
    configs = [triton.Config({"TILE": t}, num_warps=w) for t, w in tuning.CONFIGS]
    assert foam_adam._prune_configs(configs, {}, EVEN=True) == configs
    kept = foam_adam._prune_configs(configs, {}, EVEN=False)
    assert 0 < len(kept) < len(configs)
    assert all(tuning.allowed((c.kwargs["TILE"], c.num_warps), False) for c in kept)
