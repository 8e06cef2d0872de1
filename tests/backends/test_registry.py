"""The step-backend registry: priority order, the reasons it logs, registration, a device with
no fast path, and which backend modules it imports.

Every test that changes the registry works on a private copy of it (``registry`` fixture).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from foam_compile import backends
from foam_compile.backends import cpu, plain_torch
from foam_compile.checkpoint import new_state
from foam_compile.functional import foam_adam_
from foam_compile.hyper import Hyper
from foam_compile.state import get_format
from foam_compile.update import moments_of

FP32 = get_format("fp32")
HP = Hyper(lr=1e-3)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, its imported modules and what it has said."""
    monkeypatch.setattr(backends, "_REGISTRY", list(backends._REGISTRY))
    monkeypatch.setattr(backends, "_MODULES", dict(backends._MODULES))
    monkeypatch.setattr(backends, "_SAID", set())
    return backends


@pytest.fixture
def foam_log(caplog):
    caplog.set_level(logging.INFO, logger="foam_compile")
    return caplog


def messages(caplog, level=None) -> list[str]:
    return [r.getMessage() for r in caplog.records if level is None or r.levelno == level]


def test_priority_order_and_devices():
    assert backends.registered() == ["triton", "cpu", "torch"]
    serving = {
        device: [b.name for b in backends._REGISTRY if b.serves(device)]
        for device in ("cuda", "cpu", "meta")
    }
    assert serving == {
        "cuda": ["triton", "torch"],
        "cpu": ["cpu", "torch"],
        "meta": ["torch"],
    }


def test_select_on_cpu_says_why_once(registry, foam_log):
    p = torch.zeros(4, 8)
    assert registry.select(p, p, 2, FP32, HP) is cpu
    assert messages(foam_log) == []  # the first backend asked took it: nothing to say
    strided = torch.zeros(8, 4).t()
    for _ in range(3):
        assert registry.select(strided, strided, 0, FP32, HP) is plain_torch
    (said,) = messages(foam_log, logging.INFO)
    assert said == (
        "foam: a cpu parameter (torch.float32, level 0) runs the 'torch' step backend: "
        "the CPU kernel takes contiguous parameters"
    )
    g16 = p.to(torch.float16)
    assert registry.select(p, g16, 2, FP32, HP) is plain_torch  # another reason: said too
    assert messages(foam_log)[1].endswith(
        "runs the 'torch' step backend: "
        "the CPU kernel takes gradients of the parameter's dtype and shape"
    )
    assert len(messages(foam_log)) == 2


def test_plan_groups_parameters_by_backend_in_first_seen_order(registry):
    params = [torch.zeros(8, 4).t(), torch.zeros(5), torch.zeros(3, 9), torch.zeros(2, 2).t()]
    moments = moments_of(HP)
    states = [new_state(p, level, moments, FP32) for p, level in zip(params, (0, 2, 3, 2))]
    plan = registry.plan(params, params, states, HP)
    assert [(module, idx) for module, idx in plan] == [
        (plain_torch, [0, 3]),
        (cpu, [1, 2]),
    ]


def test_device_without_a_fast_path_runs_plain_torch_and_warns_once(registry, foam_log):
    """``meta`` tensors stand for any device nothing registered serves (MPS, XPU, ...): the
    registry has only the plain-torch backend for them, says so once, and the step runs."""
    params = [torch.zeros(4, 8, device="meta"), torch.zeros(3, device="meta")]
    grads = [torch.zeros_like(p) for p in params]
    states = [new_state(p, 2, moments_of(HP), FP32) for p in params]
    for _ in range(3):
        assert all(registry.select(p, p, 2, FP32, HP) is plain_torch for p in params)
        foam_adam_(params, grads, states, HP)
    (warning,) = messages(foam_log, logging.WARNING)
    assert warning == (
        "foam: no fast step for meta parameters; they run the plain-torch update "
        "(correct, not fused)"
    )
    assert len(messages(foam_log)) == 1
    assert [float(st["step"]) for st in states] == [3.0, 3.0]
    assert states[0]["exp_avg"].shape == (4, 2) and states[0]["exp_avg"].device.type == "meta"


def _fake_backend(monkeypatch, name: str, takes_level: int) -> types.ModuleType:
    module = types.ModuleType(name)
    module.calls = []
    module.supports = lambda p, g, level, fmt, hp: (
        None if level == takes_level else f"only level {takes_level}"
    )
    module.step_ = lambda params, grads, states, hp: module.calls.append(
        [tuple(p.shape) for p in params]
    )
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_register_before_another_backend(registry, monkeypatch, foam_log):
    fake = _fake_backend(monkeypatch, "fake_cpu_backend", takes_level=2)
    registry.register("fake", "fake_cpu_backend", ("cpu",), before="cpu")
    assert registry.registered() == ["triton", "fake", "cpu", "torch"]
    p = torch.zeros(4, 8)
    assert registry.select(p, p, 2, FP32, HP) is fake
    assert registry.select(p, p, 3, FP32, HP) is cpu
    assert messages(foam_log) == [
        "foam: a cpu parameter (torch.float32, level 3) runs the 'cpu' step backend: only level 2"
    ]

    # The step dispatches to it: the parameters it takes, in one call.
    params = [torch.zeros(4, 8), torch.zeros(6, 12), torch.zeros(3, 5)]
    states = [new_state(q, level, moments_of(HP), FP32) for q, level in zip(params, (2, 3, 2))]
    foam_adam_(params, [torch.ones_like(q) for q in params], states, HP)
    assert fake.calls == [[(4, 8), (3, 5)]]
    assert float(params[1].abs().sum()) > 0  # the level-3 one stepped through the CPU kernel

    # Without ``before``: just ahead of plain torch. Registering a name again moves it.
    registry.register("fake2", "fake_cpu_backend", ("cpu",))
    assert registry.registered() == ["triton", "fake", "cpu", "fake2", "torch"]
    registry.register("fake", "fake_cpu_backend", ("cpu",), before="triton")
    assert registry.registered() == ["fake", "triton", "cpu", "fake2", "torch"]


def test_a_backend_that_cannot_be_imported_is_passed_over(registry, foam_log):
    registry.register("missing", "foam_compile_no_such_backend", ("cpu",), before="cpu")
    p = torch.zeros(4, 8)
    assert registry.select(p, p, 2, FP32, HP) is cpu
    assert registry.select(p, p, 2, FP32, HP) is cpu
    (said,) = messages(foam_log)
    assert said.startswith("foam: step backend 'missing' is unavailable here (No module named")


PREPARE = """
import sys, torch
from foam_compile import backends

def loaded():
    names = (m.rsplit(".", 1)[1] for m in sys.modules if m.startswith("foam_compile.backends."))
    return sorted(names), "triton" in sys.modules

print(loaded())
backends.prepare([])
print(loaded())
backends.prepare([torch.zeros(2, device="meta")])
print(loaded())
backends.prepare([torch.zeros(2), torch.zeros(2, device="meta")])
print(loaded())
"""


def test_prepare_imports_the_backends_of_the_devices_seen():
    """In a fresh interpreter: nothing before a tensor is seen, plain torch for a device without
    a fast path, the CPU backend for CPU tensors, and never the Triton backend (or Triton)."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PREPARE)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [
        "([], False)",
        "([], False)",
        "(['plain_torch'], False)",
        "(['cpu', 'plain_torch'], False)",
    ]
