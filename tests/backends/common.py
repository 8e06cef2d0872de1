"""The step-backend tests' harness: a backend and ``reference_step`` on the same inputs.

Every step starts both from the backend's own tensors as they stand: fresh random gradients, the
state's ``step`` incremented as ``foam_adam_`` does, then the backend steps the whole list and
``foam_compile.reference.reference_step`` steps copies, one parameter at a time. A wrong state
update therefore fails at the step that makes it, and errors never compound. Moments start
nonzero (random) and step counters start at several values, so the first step already carries
state and bias corrections differ between parameters.

Tolerances are derived, not chosen. ``float64_model.ParamModel`` takes the same inputs, runs the
step exactly and keeps the sizes each result rounds against; ``param_tolerance`` bounds how far
any float32 (float64 for float64 parameters) evaluation of the step, in any order of operations,
can be from the exact one, plus one rounding to the parameter's dtype; moments get ``OPS``
roundings of the terms they are built from. ``tests/test_reference.py`` holds ``reference_step``
to those bounds. A backend held to the same bounds is within twice them of ``reference_step``:
that is the bound here (one step's worth, a few float32 ulps of the update, far below the update
itself, so a wrong level, scale or unwritten element fails).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from float64_model import (
    F64,
    OPS,
    Hyper,
    ParamModel,
    assert_within,
    param_tolerance,
    unit_roundoff,
)

from foam_compile.checkpoint import new_state
from foam_compile.hyper import Hyper as FoamHyper
from foam_compile.reference import reference_step
from foam_compile.state import get_format
from foam_compile.update import moments_of

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
GRAD_SCALES = (4.0, 1.0, 0.25, 2.0)  # shrinking gradients: amsgrad's max differs from v

OPTIONS = {
    "adamw": Hyper(weight_decay=0.1),
    "adam_coupled": Hyper(decoupled_weight_decay=False, weight_decay=0.1),
    "amsgrad": Hyper(amsgrad=True),
    "maximize": Hyper(maximize=True),
    "scale_rho": Hyper(scale=0.25, res_scale=0.5),
    "no_residual": Hyper(res_scale=0.0, weight_decay=0.0),
    "everything": Hyper(
        lr=3e-2,
        betas=(0.8, 0.95),
        eps=1e-6,
        weight_decay=0.05,
        decoupled_weight_decay=False,
        amsgrad=True,
        maximize=True,
        scale=0.25,
        res_scale=2.0,
    ),
}


@dataclass(frozen=True)
class Spec:
    """One parameter: its shape, requested level, dtype and the step count its state starts at."""

    shape: tuple[int, ...]
    level: int
    dtype: torch.dtype = F32
    start_step: int = 0


def specs(shapes_levels, dtype, start_steps=(0, 6, 1)) -> list[Spec]:
    """``Spec``s of one dtype, their start steps cycling through ``start_steps``."""
    return [
        Spec(tuple(shape), level, dtype, start_steps[i % len(start_steps)])
        for i, (shape, level) in enumerate(shapes_levels)
    ]


def generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(shape, gen, std=1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=F64) * std


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update runs in (ALGORITHM.md): float32, float64 for float64 parameters."""
    return F64 if dtype == F64 else F32


@dataclass
class Group:
    """Parameters stepped by one backend call, with their states and (persistent) gradients.

    Gradients are written in place every step, so a compiled step sees the same tensors.
    """

    specs: list[Spec]
    hp: Hyper
    foam_hp: FoamHyper
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    states: list[dict] = field(default_factory=list)


def make_group(
    group_specs: Sequence[Spec], hp: Hyper, gen, device="cpu", lr_tensor: bool = False
) -> Group:
    kw = hp.reference_kwargs()
    if lr_tensor:  # as a scheduler keeps it: a float32 0-d tensor; the reference takes its value
        kw["lr"] = torch.tensor(hp.lr, device=device)
        hp = replace(hp, lr=float(kw["lr"]))
    group = Group(list(group_specs), hp, FoamHyper(**kw))
    moments = moments_of(group.foam_hp)
    for spec in group.specs:
        std = 1.0 if spec.dtype in (F32, F64) else 0.1  # half types: the update is many ulps
        p = _randn(spec.shape, gen, std).to(device=device, dtype=spec.dtype)
        st = new_state(p, spec.level, moments, get_format("fp32"))
        st["step"].fill_(spec.start_step)
        shape = st["exp_avg"].shape
        st["exp_avg"].copy_(0.1 * _randn(shape, gen))
        st["exp_avg_sq"].copy_(0.01 + 0.1 * torch.rand(shape, generator=gen, dtype=F64))
        if "max_exp_avg_sq" in st:  # a running max: at least v, above it somewhere
            st["max_exp_avg_sq"].copy_(
                st["exp_avg_sq"] + 0.01 * torch.rand(shape, generator=gen, dtype=F64)
            )
        group.params.append(p)
        group.grads.append(torch.zeros_like(p))
        group.states.append(st)
    return group


def _moment_keys(st: dict) -> list[str]:
    return [k for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in st]


def run_and_compare(
    step: Callable[[list[Group]], None], groups: list[Group], gen, steps: int = 3
) -> None:
    """``steps`` times: new gradients, ``step(groups)``, every parameter checked against
    ``reference_step`` from the same inputs (see the module docstring for the tolerances)."""
    for t in range(steps):
        before = []
        for group in groups:
            for p, g, st in zip(group.params, group.grads, group.states):
                scale = GRAD_SCALES[t % len(GRAD_SCALES)]
                g.copy_(_randn(p.shape, gen, scale).to(p.dtype))
                moments = {k: st[k].detach().cpu().clone() for k in _moment_keys(st)}
                before.append((p.detach().cpu().clone(), moments, float(st["step"])))
                st["step"] += 1  # as foam_adam_ does before the backends run
        step(groups)
        i = 0
        for group in groups:
            for spec, p, g, st in zip(group.specs, group.params, group.grads, group.states):
                _check_one(spec, group.hp, p, g, st, *before[i], what=f"step {t + 1}, {spec}")
                i += 1


def _check_one(spec, hp, p, g, st, p0, moments0, step0, what) -> None:
    __tracebackhide__ = True
    level = st["foam_level"]
    math = math_dtype(spec.dtype)
    assert p.dtype == spec.dtype, what
    assert float(st["step"]) == step0 + 1, what
    g = g.detach().cpu()

    p_ref, ref_state = p0.clone(), {**{k: v.clone() for k, v in moments0.items()}, "step": step0}
    reference_step(p_ref, g, ref_state, level=level, **hp.reference_kwargs())
    model = ParamModel.create(p0, level)
    model.load_state(
        moments0["exp_avg"], moments0["exp_avg_sq"], moments0.get("max_exp_avg_sq"), step0
    )
    model.step(g, hp)

    assert_within(
        p.detach().cpu(), p_ref.to(F64), 2 * param_tolerance(model, spec.dtype, math), what
    )
    u = unit_roundoff(math)
    scales = {"exp_avg": model.m_scale, "exp_avg_sq": model.v_scale}
    scales["max_exp_avg_sq"] = model.v_scale
    for key in moments0:
        got = st[key].detach().cpu()
        assert got.dtype == math and got.shape == ref_state[key].shape, f"{what}: {key}"
        assert_within(got, ref_state[key].to(F64), 2 * OPS * u * scales[key], f"{what}: {key}")


def eager(step_):
    """A ``run_and_compare`` step from a backend's ``step_(params, grads, states, hp)``."""

    def step(groups: list[Group]) -> None:
        for group in groups:
            step_(group.params, group.grads, group.states, group.foam_hp)

    return step
