"""Launch stubs for the kernel launchers' host-side tests (no test logic here).

The launchers are run for real up to the kernel launch; the launch itself is recorded instead
of run, so host behaviour (plans, tables, copies, index width) is tested on meta tensors of real
LLaMA sizes and on small CPU tensors without paying for the interpreter.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from foam_compile.kernels import foam_adam


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` is recorded."""

    def __init__(self):
        self.calls: list[dict] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(dict(grid=grid, args=args, kwargs=kwargs))

        return launch


def stub_launches(monkeypatch) -> dict[str, Recorder]:
    """Replace both kernels by recorders; returns ``{"multi": ..., "single": ...}``."""
    stubs = {"multi": Recorder(), "single": Recorder()}
    monkeypatch.setattr(foam_adam, "_foam_adam_multi_kernel", stubs["multi"])
    monkeypatch.setattr(foam_adam, "_foam_adam_kernel", stubs["single"])
    return stubs


class AtenLog(TorchDispatchMode):
    """Every aten op run while active: allocations, copies and kernels alike."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def llama_shapes(hidden: int, inter: int, layers: int, vocab: int) -> list[tuple[tuple, int]]:
    """``[(shape, level)]`` of a LLaMA model under the paper's policy (block weights at level 2,
    embedding, head and norms at level 0); the 1B config has 219 parameters."""
    h = hidden
    out = [((vocab, h), 0)]
    for _ in range(layers):
        out += [((h, h), 2)] * 4 + [((inter, h), 2)] * 2 + [((h, inter), 2)]
        out += [((h,), 0)] * 2
    out += [((h,), 0), ((vocab, h), 0)]
    return out


LLAMA_1B = dict(hidden=2048, inter=5461, layers=24, vocab=32000)


def folded(shape, level):
    if level == 0 or len(shape) < 2:
        return tuple(shape)
    return (*shape[:-1], -(-shape[-1] // (1 << level)))


def make_group(shapes, device="meta", dtype=torch.float32, step_device=None):
    """Parameters, gradients, moments and step counters for ``[(shape, level)]``."""
    params = [torch.empty(s, device=device, dtype=dtype) for s, _ in shapes]
    grads = [torch.empty(s, device=device, dtype=dtype) for s, _ in shapes]
    ms = [torch.zeros(folded(s, lv), device=device) for s, lv in shapes]
    vs = [torch.zeros(folded(s, lv), device=device) for s, lv in shapes]
    steps = [torch.tensor(1.0, device=step_device or device) for _ in shapes]
    return params, grads, ms, vs, steps, [lv for _, lv in shapes]
