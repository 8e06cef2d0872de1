"""Launch configurations of the FOAM kernels and how one is chosen (once, then from disk).

Configs. A streaming kernel's knobs are the elements a program holds (``TILE``) and the warps
that issue its loads. ``num_stages`` is not one: with no ``tl.dot`` there is nothing for Triton's
software pipeliner to stage, and ``num_stages`` 1 and 3 compiled to byte-identical cubins
(issue 17), so every config uses 1 and the list has no duplicates (``tests/kernels/
test_aot_compile.py`` checks that the configs compile to distinct cubins).

Keys. A tuned choice is kept per ``(kernel, dtypes, level, even, state format, size bucket)``:
``amsgrad`` and the other flags change a few scalar instructions, not the traffic pattern, so
they do not re-tune.

Size model. The multi-tensor kernel is timed on a scratch group, never on live state (stores go
through a pointer table, which ``restore_value`` cannot snapshot). A group of 1.2 G elements is
not copied for that; instead the scratch is as large as the real group up to the *saturation
size*: ``WAVES`` full waves of programs at the largest tile, i.e. ``WAVES * SMs *
max threads per SM * elements per thread``. Past it, the launch's tail (its last partial wave)
is under ``1 / WAVES`` of the time, so the time per element, and with it the ranking of the
configs, no longer depends on the size; a larger problem would rank them the same at the cost
of gigabytes of scratch. Sizes below saturation are tuned at their own bucket (powers of two).

Disk cache. Choices persist in a JSON file (``$FOAM_TUNE_CACHE``, default
``~/.cache/foam_compile/tune.json``) keyed by device name, Triton version and the kernel's
source hash, so a process tunes a key once per machine, not once per run. The interpreter
never writes it.

This module imports nothing from the rest of foam_compile.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import threading
import time

import triton

__all__ = [
    "CONFIGS",
    "allowed",
    "DEFAULT",
    "autotune_enabled",
    "cached_choice",
    "is_interpreting",
    "record_choice",
    "saturation_elems",
    "size_bucket",
]

# (TILE, num_warps): 8 or 16 elements per thread, 4 or 8 warps. Duplicates are not allowed.
CONFIGS = ((1024, 4), (2048, 4), (2048, 8), (4096, 8))
DEFAULT = CONFIGS[0]
NUM_STAGES = 1
WAVES = 8
RAGGED_ELEMS_PER_THREAD = 8
_MAX_ELEMS_PER_THREAD = max(tile // (32 * warps) for tile, warps in CONFIGS)


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """``FOAM_TRITON_AUTOTUNE``: "0" = one config; "force" = tune even in the interpreter (a
    CPU timer; the tests use it to exercise the tuning paths); default = tune on GPUs only."""
    mode = os.environ.get("FOAM_TRITON_AUTOTUNE", "1")
    return mode == "force" or (mode != "0" and not is_interpreting())


def configs(even: bool = True) -> tuple[tuple[int, int], ...]:
    """The configs in play now: one (deterministic, nothing timed) when not tuning. Ragged
    launches take those of at most ``RAGGED_ELEMS_PER_THREAD`` elements per thread: their loads
    are scalar quad columns, and at 16 elements per thread the level-1 ragged launch needed 194
    registers against 118 for the even one (at 8: 86 against 74; sm_90)."""
    chosen = CONFIGS if autotune_enabled() else (DEFAULT,)
    return tuple(c for c in chosen if allowed(c, even))


def allowed(config: tuple[int, int], even: bool) -> bool:
    """Whether a launch of this evenness may use ``config`` (see :func:`configs`)."""
    tile, warps = config
    return even or tile // (32 * warps) <= RAGGED_ELEMS_PER_THREAD


def saturation_elems(device) -> int:
    """Elements past which a launch's time per element is flat (see the module docstring)."""
    import torch

    if getattr(device, "type", device) != "cuda" or not torch.cuda.is_available():
        return 1 << 25  # an H100's value, for CPU-side planning and tests
    props = torch.cuda.get_device_properties(device)
    threads = getattr(props, "max_threads_per_multi_processor", 2048)
    return WAVES * props.multi_processor_count * threads * _MAX_ELEMS_PER_THREAD


def size_bucket(numel: int, saturation: int) -> int:
    """log2 bucket of the size a config is tuned at: ``min(numel, saturation)``, at least 2**16."""
    return max(16, min(int(numel), int(saturation)).bit_length())


# ------------------------------------------------------------------------------ disk cache
_LOCK = threading.Lock()
_DISK: dict | None = None


def _cache_path() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "foam_compile" / "tune.json"
    return pathlib.Path(os.environ.get("FOAM_TUNE_CACHE", str(default)))


def _load() -> dict:
    global _DISK
    if _DISK is None:
        try:
            _DISK = json.loads(_cache_path().read_text())
        except (OSError, ValueError):
            _DISK = {}
    return _DISK


def _disk_key(device_name: str, kernel_hash: str, fields: tuple) -> str:
    return "|".join([device_name, f"triton {triton.__version__}", kernel_hash, repr(fields)])


def cached_choice(device_name: str, kernel_hash: str, fields: tuple) -> tuple[int, int] | None:
    """A config tuned earlier (this process or a previous one on this machine), if any."""
    if is_interpreting():
        return None
    with _LOCK:
        hit = _load().get(_disk_key(device_name, kernel_hash, fields))
    if hit is None:
        return None
    choice = (int(hit["TILE"]), int(hit["num_warps"]))
    return choice if choice in CONFIGS else None  # a stale entry from another config list


def record_choice(
    device_name: str, kernel_hash: str, fields: tuple, choice, timings: dict | None = None
) -> None:
    """Persist a tuned config (atomically: write a temporary file, then rename it)."""
    if is_interpreting():
        return
    entry = {"TILE": choice[0], "num_warps": choice[1], "when": time.strftime("%Y-%m-%d")}
    if timings:
        entry["ms"] = {f"{t}x{w}": round(ms, 4) for (t, w), ms in timings.items()}
    path = _cache_path()
    with _LOCK:
        data = _load()
        data[_disk_key(device_name, kernel_hash, fields)] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tune-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError:  # a read-only home: the choice still holds for this process
            pass


def reset_memory_cache() -> None:
    """Forget what was read from disk (tests point ``$FOAM_TUNE_CACHE`` elsewhere)."""
    global _DISK
    with _LOCK:
        _DISK = None
