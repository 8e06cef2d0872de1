"""Gradient release (``foam_compile.release_gradients``): same weights as the ordinary loop,
at most one parameter's gradient alive during backward, schedulers, accumulation, clipping
and checkpoints."""

from __future__ import annotations

import io
import weakref

import pytest
import torch
from torch import nn
from torch.nn.utils import clip_grad_norm_, clip_grads_with_norm_, get_total_norm

from foam_compile import FOAM, release_gradients

STEPS = 4


def make_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)  # sizes differ so "the largest gradient" means something
    return nn.Sequential(
        nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 30), nn.Tanh(), nn.Linear(30, 6)
    ).to(dtype)


def batch(i: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(16, 10, generator=g).to(dtype), torch.randint(0, 6, (16,), generator=g)


def loss_of(model, i, dtype=torch.float32, scale=1.0):
    x, y = batch(i, dtype)
    return nn.functional.cross_entropy(model(x).float(), y) * scale


OPTIMIZERS = {
    "foam": lambda ps: FOAM(ps, lr=1e-2, level=2),
    "foam_bf16_int8": lambda ps: FOAM(ps, lr=1e-2, level=2, master_weights="int8"),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    # quantized moments (the group key read by foam_compile.layout.format_for)
    "foam_int8_state": lambda ps: FOAM([{"params": ps, "state_format": "int8"}], lr=1e-2, level=2),
    "foam_bf16_int8_int4sr_state": lambda ps: FOAM(
        [{"params": ps, "state_format": "int4-sr"}], lr=1e-2, level=2, master_weights="int8"
    ),
}
DTYPES = {
    "foam": torch.float32,
    "foam_bf16_int8": torch.bfloat16,
    "adamw": torch.float32,
    "foam_int8_state": torch.float32,
    "foam_bf16_int8_int4sr_state": torch.bfloat16,
}
STATE_FORMATS = {"foam_int8_state": "int8", "foam_bf16_int8_int4sr_state": "int4-sr"}


def _schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))


def _assert_same(model_a, opt_a, model_b, opt_b):
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
        for key, value in opt_a.state[p].items():
            if torch.is_tensor(value):
                assert torch.equal(value, opt_b.state[q][key]), key


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_same_weights_as_the_ordinary_step(name):
    dtype = DTYPES[name]
    ref_model, model = make_model(dtype), make_model(dtype)
    ref_opt = OPTIMIZERS[name](list(ref_model.parameters()))
    ref_sched = _schedule(ref_opt)
    release = release_gradients(model, OPTIMIZERS[name])
    sched = _schedule(release.optimizer)
    for i in range(STEPS):
        loss_of(ref_model, i, dtype).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_sched.step()
        loss_of(model, i, dtype).backward()
        assert all(p.grad is None for p in model.parameters())
        sched.step()
    assert release.steps == STEPS
    assert release.optimizer.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    if name in STATE_FORMATS:  # the codes and scales are compared below too
        for st in release.optimizer.state.values():
            assert st["foam_format"] == STATE_FORMATS[name] and "exp_avg_scale" in st
    _assert_same(ref_model, ref_opt, model, release.optimizer)


def test_peak_live_gradient_bytes():
    """Every gradient tensor is tracked by a weak reference from a probe hook that runs before
    the release hook; at each probe, the bytes of the gradients still alive anywhere are summed.
    With release, that peak is the largest single gradient; without, all of them."""

    def peak(release: bool) -> tuple[int, int, int]:
        model = make_model()
        params = list(model.parameters())
        alive: list[weakref.ref] = []
        seen = [0]

        def probe(p):
            alive.append(weakref.ref(p.grad))
            live = sum(r().numel() * r().element_size() for r in alive if r() is not None)
            seen[0] = max(seen[0], live)

        for p in params:
            p.register_post_accumulate_grad_hook(probe)
        opt = FOAM(params, lr=1e-2)
        if release:
            release_gradients(model, opt)
        loss_of(model, 0).backward()
        sizes = [p.numel() * p.element_size() for p in params]
        return seen[0], max(sizes), sum(sizes)

    released, largest, total = peak(release=True)
    assert released <= largest
    kept, _largest, _total = peak(release=False)
    assert kept == total > largest  # the probe can see more than one gradient


def test_accumulation_over_micro_batches():
    ref_model, model = make_model(), make_model()
    ref_opt = FOAM(ref_model.parameters(), lr=1e-2)
    release = release_gradients(model, lambda ps: FOAM(ps, lr=1e-2))
    for i in range(STEPS):
        for k in range(3):
            loss_of(ref_model, 3 * i + k, scale=1 / 3).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        with release.accumulate():
            for k in range(2):
                loss_of(model, 3 * i + k, scale=1 / 3).backward()
        assert all(p.grad is not None for p in model.parameters())  # kept while accumulating
        loss_of(model, 3 * i + 2, scale=1 / 3).backward()
        assert all(p.grad is None for p in model.parameters())
    _assert_same(ref_model, ref_opt, model, release.optimizer)


def test_clip_param_is_per_parameter_clipping():
    max_norm = 0.05
    ref_model, model = make_model(), make_model()
    ref_opt = FOAM(ref_model.parameters(), lr=1e-2)
    release = release_gradients(
        model, lambda ps: FOAM(ps, lr=1e-2), max_norm=max_norm, clip="param"
    )
    for i in range(STEPS):
        loss_of(ref_model, i).backward()
        grads = [p.grad.clone() for p in ref_model.parameters()]
        for p in ref_model.parameters():
            clip_grad_norm_([p], max_norm, foreach=False)
        ref_opt.step()
        ref_opt.zero_grad()
        loss_of(model, i).backward()
        norms = [get_total_norm([g], foreach=False) for g in grads]
        assert torch.equal(release.last_grad_norm, get_total_norm(norms, foreach=False))
    _assert_same(ref_model, ref_opt, model, release.optimizer)


def test_clip_previous_is_global_clipping_one_step_late():
    max_norm = 0.5
    ref_model, model = make_model(), make_model()
    ref_opt = FOAM(ref_model.parameters(), lr=1e-2)
    release = release_gradients(
        model, lambda ps: FOAM(ps, lr=1e-2), max_norm=max_norm, clip="previous"
    )
    previous = None
    for i in range(STEPS):
        loss_of(ref_model, i, scale=4.0).backward()  # large enough to clip
        params = list(ref_model.parameters())
        norm = get_total_norm([p.grad for p in params], foreach=False)  # clip_grad_norm_'s
        if previous is not None:
            clip_grads_with_norm_(params, max_norm, previous, foreach=False)
        ref_opt.step()
        ref_opt.zero_grad()
        previous = norm
        loss_of(model, i, scale=4.0).backward()
        assert torch.equal(release.last_grad_norm, norm)
    assert float(previous) > max_norm  # the clipping did something
    _assert_same(ref_model, ref_opt, model, release.optimizer)


def test_checkpoint_resume_is_bitwise():
    def fresh():
        model = make_model()
        release = release_gradients(
            model, lambda ps: FOAM(ps, lr=1e-2), max_norm=0.5, clip="previous"
        )
        return model, release, _schedule(release.optimizer)

    model, release, sched = fresh()
    for i in range(2 * STEPS):
        if i == STEPS:
            buf = io.BytesIO()
            torch.save(
                {
                    "model": model.state_dict(),
                    "release": release.state_dict(),
                    "sched": sched.state_dict(),
                },
                buf,
            )
        loss_of(model, i, scale=4.0).backward()
        sched.step()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, release2, sched2 = fresh()
    model2.load_state_dict(ckpt["model"])
    release2.load_state_dict(ckpt["release"])
    sched2.load_state_dict(ckpt["sched"])
    for i in range(STEPS, 2 * STEPS):
        loss_of(model2, i, scale=4.0).backward()
        sched2.step()
    _assert_same(model, release.optimizer, model2, release2.optimizer)
    with pytest.raises(ValueError, match="GradientRelease.state_dict"):
        release2.load_state_dict(release2.optimizer.state_dict())


def test_refusals_and_remove():
    model = make_model()
    with pytest.raises(ValueError, match="clip='previous'"):
        release_gradients(model, lambda ps: FOAM(ps), max_norm=1.0)
    with pytest.raises(ValueError, match="invalid clip"):
        release_gradients(model, lambda ps: FOAM(ps), max_norm=1.0, clip="global")
    with pytest.raises(ValueError, match="max_norm"):
        release_gradients(model, lambda ps: FOAM(ps), max_norm=-1.0, clip="param")
    with pytest.raises(ValueError, match="level='auto'"):
        release_gradients(model, lambda ps: FOAM(ps, level="auto", budget=0.5))
    with pytest.raises(ValueError, match="not a trainable parameter"):
        release_gradients(model, FOAM([torch.zeros(3, requires_grad=True)]))
    with pytest.raises(TypeError, match="Optimizer"):
        release_gradients(model, 3)

    release = release_gradients(model, lambda ps: FOAM(ps, lr=1e-2))
    before = [p.detach().clone() for p in model.parameters()]
    release.optimizer.step()  # nothing to step after a release backward: a no-op
    release.remove()
    loss_of(model, 0).backward()  # hooks gone: gradients kept, weights unchanged
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_backward_that_raises_does_not_wedge_the_next():
    model = make_model()
    release = release_gradients(model, lambda ps: FOAM(ps, lr=1e-2), max_norm=1.0, clip="previous")
    x, y = batch(0)
    hidden = model[1](model[0](x))

    def fail(_grad):
        raise RuntimeError("boom")

    hidden.register_hook(fail)  # runs after the last layers' parameters have stepped
    loss = nn.functional.cross_entropy(model[4](model[3](model[2](hidden))), y)
    with pytest.raises(RuntimeError, match="boom"):
        loss.backward()
    assert release.steps == 0 and release.last_grad_norm is None
    for p in model.parameters():
        p.grad = None
    loss_of(model, 1).backward()
    assert release.steps == 1
    assert release.last_grad_norm is not None and release._previous_norm is not None
