"""Test-wide settings: Triton's interpreter on CPU, a persistent Inductor cache, fresh Dynamo."""

import os
import pathlib

# Before anything imports triton: without a GPU, kernels run in Triton's CPU interpreter.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not pathlib.Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Cold Inductor compiles take 10-20 s on 2 cores; keep them across runs and test files.
_root = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_root / ".cache" / "inductor"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def fresh_dynamo():
    """Each compiled test starts from an empty Dynamo cache and zeroed counters."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()
