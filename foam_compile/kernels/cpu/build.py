"""Build ``foam_step.cpp`` into a shared library once per machine, and cache it on disk.

The library is keyed like Inductor's own compiled code: a hash of the source, the compiler (its
path and ``--version``), the flags and the CPU (``-march=native`` code runs only where its
instruction set does), so a clean clone builds it once and a changed source rebuilds. Concurrent
processes do not race: the build holds an ``flock`` on a lock file beside it, writes a temporary
file and renames it into place (a rename is atomic), so a reader sees no library or a whole one.

Where: ``$FOAM_CPU_CACHE_DIR``, else ``$TORCHINDUCTOR_CACHE_DIR/foam_cpu``, else
``<tmp>/torchinductor_<user>/foam_cpu`` (Inductor's default cache directory).
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["FLAGS", "SOURCE", "build", "cache_root", "compiler"]

log = logging.getLogger("foam_compile")

SOURCE = Path(__file__).with_name("foam_step.cpp")
# -fno-math-errno: sqrt vectorises (no errno to set). -ffp-contract=off: no fused multiply-adds,
# so each operation rounds as torch's eager ops and the plain-torch update do, and level 0 stays
# within torch's own AdamW rounding (with contraction, a 5-step AdamW comparison drifted by 5
# float32 ulps).
FLAGS = (
    "-O3",
    "-march=native",
    "-std=c++17",
    "-fno-math-errno",
    "-ffp-contract=off",
    "-fopenmp",
    "-fPIC",
    "-shared",
    "-fvisibility=hidden",
)
LIBRARY = "libfoam_cpu.so"


def cache_root() -> Path:
    """The directory that holds the built libraries (see the module docstring)."""
    explicit = os.environ.get("FOAM_CPU_CACHE_DIR")
    if explicit:
        return Path(explicit)
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if inductor:
        return Path(inductor) / "foam_cpu"
    try:
        user = getpass.getuser()
    except Exception:  # no user name (containers): Inductor falls back the same way
        user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    user = re.sub(r'[\\/:*?"<>|]', "_", user)
    return Path(tempfile.gettempdir()) / f"torchinductor_{user}" / "foam_cpu"


def compiler() -> str:
    """The C++ compiler: ``$CXX``, else ``g++``, else ``c++``."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise RuntimeError("no C++ compiler found (set CXX, or install g++)")


@functools.cache
def _compiler_id(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    return out.stdout


@functools.cache
def _cpu_id() -> str:
    """The CPU's model and instruction-set flags (what ``-march=native`` depends on)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.machine() + platform.processor()
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags")]
    return "\n".join(sorted(set(keep)))


def _key(source: str, cxx: str, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for part in (source, cxx, _compiler_id(cxx), " ".join(flags), _cpu_id()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def build(source: str | None = None, cache_dir: str | Path | None = None) -> tuple[Path, bool]:
    """``(path of the library, whether this call compiled it)``; compiles only on a cache miss.

    ``source`` defaults to ``foam_step.cpp``'s text (tests pass others); raises ``RuntimeError``
    with the compiler's message if the build fails.
    """
    text = SOURCE.read_text() if source is None else source
    cxx = compiler()
    key = _key(text, cxx, FLAGS)
    folder = Path(cache_dir) if cache_dir is not None else cache_root()
    folder = folder / key
    target = folder / LIBRARY
    if target.exists():
        return target, False
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no flock here: the atomic rename alone keeps readers safe
            pass
        if target.exists():  # another process built it while we waited
            return target, False
        src = folder / "foam_step.cpp"
        src.write_text(text)
        tmp = folder / f"{LIBRARY}.{os.getpid()}.tmp"
        cmd = [cxx, *FLAGS, str(src), "-o", str(tmp)]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(
                f"foam: building the CPU step kernel failed ({' '.join(cmd)}):\n{done.stderr}"
            )
        os.replace(tmp, target)
        log.info(
            "foam: built the CPU step kernel in %.1f s (%s)", time.perf_counter() - start, target
        )
    return target, True
