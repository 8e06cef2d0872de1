"""backend="foam" end to end: stock AdamW/Adam steps compiled into FOAM, checkpoints, warnings."""

import io
import subprocess
import sys
import textwrap

import pytest
import torch
from float64_model import OPS, Hyper, ParamModel, assert_within, param_tolerance, unit_roundoff

import foam_compile
from foam_compile import FOAM
from foam_compile.reference import fold
from tests.helpers import batches, loss_fn, set_grads, tiny_model

U32 = unit_roundoff(torch.float32)


class EagerTwin:
    """Eager FOAM on a copy of a model, fed the compiled side's gradients, and the float64 model
    of each parameter fed the same: what the compiled step is held to.

    Both the compiled step and eager FOAM run ALGORITHM.md's float32 math from the same inputs,
    in different orders (Inductor fuses and reorders). ``float64_model.param_tolerance`` bounds,
    per element, how far any such evaluation can be from the exact step, summed over the steps
    taken (a few float32 roundings of the parameter and ``OPS`` of the update per step); so the
    two are within twice that of each other. Moments likewise, with ``OPS`` roundings per step
    of the terms they sum. Feeding both the same gradients keeps the bound a property of the
    step alone: through a network, each side's own gradients would amplify rounding.
    """

    def __init__(self, model, hp: Hyper, level: int = 2):
        self.model = tiny_model()
        self.model.load_state_dict(model.state_dict())
        self.hp = hp
        self.opt = FOAM(self.model.parameters(), level=level, **hp.foam_kwargs())
        self.exact = [ParamModel.create(q, level) for q in self.model.parameters()]

    def step(self, grads, lr=None) -> None:
        """One eager step with ``grads`` (the compiled side's), at ``lr`` if given."""
        for q, g, m in zip(self.model.parameters(), grads, self.exact):
            q.grad = g.detach().clone()
            m.step(g, self.hp, lr=lr)
        self.opt.step()

    def assert_matches(self, model, opt) -> None:
        __tracebackhide__ = True
        for i, (p, q, m) in enumerate(zip(model.parameters(), self.model.parameters(), self.exact)):
            assert opt.state[p]["foam_level"] == self.opt.state[q]["foam_level"]
            tol = 2 * param_tolerance(m, torch.float32)
            assert_within(p, q.detach().double(), tol, f"parameter {i}")
            for key, scale in (("exp_avg", m.m_scale), ("exp_avg_sq", m.v_scale)):
                got, want = opt.state[p][key], self.opt.state[q][key].double()
                assert_within(got, want, 2 * OPS * U32 * scale, f"{key} of parameter {i}")


def compiled_step(opt, backend="foam"):
    @torch.compile(backend=backend)
    def step():
        opt.step()

    return step


def test_converting_graph_runs_once_without_inductor(fresh_dynamo, monkeypatch):
    """The graph whose compile converts the optimizer runs once (the class swap re-traces the
    next call), so Inductor compiles only FOAM's own step: one Inductor compile, not two."""
    from torch._inductor import compile_fx as inductor

    compiled = []
    real = inductor.compile_fx

    def counting(gm, example_inputs, **kw):
        compiled.append(gm)
        return real(gm, example_inputs, **kw)

    monkeypatch.setattr(inductor, "compile_fx", counting)
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    eager = EagerTwin(model, Hyper(lr=0.02))
    step = compiled_step(opt)
    for i, (x, y) in enumerate(batches(3)):
        set_grads(model, x, y)
        eager.step([p.grad for p in model.parameters()])
        step()
        assert len(compiled) == (0 if i == 0 else 1), f"step {i + 1}: {len(compiled)} compiles"
    eager.assert_matches(model, opt)


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_compiled_stock_optimizer_matches_eager_foam(cls, foreach, fresh_dynamo):
    model = tiny_model()
    wd = 0.05
    opt = cls(model.parameters(), lr=0.02, weight_decay=wd, foreach=foreach)
    eager = EagerTwin(
        model, Hyper(lr=0.02, weight_decay=wd, decoupled_weight_decay=cls is torch.optim.AdamW)
    )
    step = compiled_step(opt)
    for x, y in batches(5):
        set_grads(model, x, y)
        eager.step([p.grad for p in model.parameters()])
        step()
    assert isinstance(opt, FOAM) and isinstance(opt, cls)
    assert fresh_dynamo["foam"]["fold_adam_states"] == 1
    eager.assert_matches(model, opt)


def test_whole_train_step_trains_without_recompiles(fresh_dynamo):
    """forward + backward + step + zero_grad in one compiled function, a scheduler every step."""
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.03, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.05 * s))
    adamw_bytes = sum(2 * 4 * p.numel() for p in model.parameters() if p.dim() >= 2)

    eager = EagerTwin(model, Hyper(lr=0.03, weight_decay=0.0))
    eager_sched = torch.optim.lr_scheduler.LambdaLR(eager.opt, lambda s: 1.0 / (1 + 0.05 * s))

    @torch.compile(backend="foam")
    def train_step(x, y):
        loss = loss_fn(model, x, y)
        loss.backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]  # for the eager twin
        opt.step()
        opt.zero_grad()
        return loss, grads

    data = batches(4)
    for i in range(24):
        if i == 4:  # after the conversion's one re-trace, the steady state must not recompile
            torch._dynamo.config.error_on_recompile = True
        _, grads = train_step(*data[i % 4])
        eager.step(grads, lr=eager.opt.param_groups[0]["lr"])
        sched.step()
        eager_sched.step()
    assert isinstance(opt, FOAM)
    eager.assert_matches(model, opt)  # the scheduled lr reached every compiled step
    lr = opt.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and float(lr) == pytest.approx(0.03 / (1 + 0.05 * 24), rel=4 * U32)
    folded = [p for p in model.parameters() if p.dim() >= 2]
    foam_bytes = sum(opt.state[p][k].nbytes for p in folded for k in ("exp_avg", "exp_avg_sq"))
    # Level 2: a quarter, up to the partial block of the 10-wide weight (ceil(10/4) = 3 of 2.5).
    expected = sum(2 * 4 * p.shape[0] * -(-p.shape[1] // 4) for p in folded)
    assert foam_bytes == expected and foam_bytes <= adamw_bytes * 0.3


def train_foam(steps, data, opt=None, model=None, step=None):
    model = model or tiny_model()
    opt = opt or torch.optim.AdamW(model.parameters(), lr=0.02)
    step = step or compiled_step(opt)
    for x, y in data[:steps]:
        set_grads(model, x, y)
        step()
    return model, opt, step


def test_checkpoint_paths(fresh_dynamo, tmp_path):
    data = batches(6)
    model, opt, step = train_foam(3, data)
    sd = opt.state_dict()
    # Compact: every saved moment has the folded shape.
    for pid, p in enumerate(model.parameters()):
        st = sd["state"][pid]
        assert st["exp_avg"].shape == foam_compile.folded_shape(p.shape, st["foam_level"])
    torch.save({"model": model.state_dict(), "opt": sd}, tmp_path / "ckpt.pt")
    for x, y in data[3:]:  # the run goes on: the target of every resume below
        set_grads(model, x, y)
        step()
    target = [p.detach().clone() for p in model.parameters()]

    def fresh():
        ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        m = tiny_model(seed=7)
        m.load_state_dict(ckpt["model"])
        return m, ckpt["opt"]

    # FOAM-aware resume: one documented line before load_state_dict.
    m, osd = fresh()
    opt2 = foam_compile.convert(torch.optim.AdamW(m.parameters(), lr=0.02))
    opt2.load_state_dict(osd)
    train_foam(3, data[3:], opt2, m)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), target))  # bitwise

    # The unchanged script: a stock AdamW loads the folded checkpoint, then backend="foam".
    m, osd = fresh()
    opt3 = torch.optim.AdamW(m.parameters(), lr=0.02)
    opt3.load_state_dict(osd)
    train_foam(3, data[3:], opt3, m)
    assert isinstance(opt3, FOAM)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), target))

    # Export to a stock AdamW checkpoint: unfold is exact under fold.
    exported = foam_compile.export_adamw_state_dict(opt)
    stock = torch.optim.AdamW(model.parameters(), lr=0.02)
    stock.load_state_dict(exported)
    for p in model.parameters():
        st, folded = stock.state[p], opt.state[p]
        assert st["exp_avg"].shape == p.shape
        assert torch.equal(fold(st["exp_avg"], folded["foam_level"]), folded["exp_avg"])
    buf = io.BytesIO()
    torch.save(exported, buf)
    buf.seek(0)
    assert (
        torch.load(buf, weights_only=True)["param_groups"][0]["lr"]
        == exported["param_groups"][0]["lr"]
    )


def test_stock_checkpoint_folds_into_converted_optimizer():
    model = tiny_model()
    stock = torch.optim.AdamW(model.parameters(), lr=0.02)
    for x, y in batches(3):
        set_grads(model, x, y)
        stock.step()
    sd = stock.state_dict()
    opt = foam_compile.convert(torch.optim.AdamW(model.parameters(), lr=0.02))
    opt.load_state_dict(sd)
    for pid, p in enumerate(model.parameters()):
        level = opt.state[p]["foam_level"]
        assert level == (2 if p.dim() >= 2 else 0)
        torch.testing.assert_close(
            opt.state[p]["exp_avg"], fold(sd["state"][pid]["exp_avg"], level)
        )
    set_grads(model, *batches(4)[3])
    opt.step()  # and it steps


def test_fused_optimizer_warns_with_the_fix(fresh_dynamo):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, fused=True)

    @torch.compile(backend="foam")
    def train_step(x, y):
        loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()

    with pytest.warns(UserWarning, match=r"fused=True.*foam_compile\.convert\(optimizer\)"):
        train_step(*batches(1)[0])
    assert not isinstance(opt, FOAM)
    foam_compile.convert(opt)  # the fix works on fused optimizers
    assert opt.state[model[0].weight]["exp_avg"].shape == (24, 3)


def test_eager_step_outside_the_compiled_function_warns(fresh_dynamo):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    compiled = torch.compile(model, backend="foam")
    x, y = batches(1)[0]
    torch.nn.functional.cross_entropy(compiled(x), y).backward()
    with pytest.warns(UserWarning, match="stepped outside the compiled function"):
        opt.step()


def test_backend_is_found_by_name_in_a_fresh_process():
    code = textwrap.dedent(
        """
        import sys, torch
        m = torch.nn.Linear(8, 8)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        m(torch.randn(2, 8)).sum().backward()
        torch.compile(lambda: opt.step(), backend="foam")()
        print(type(opt).__name__, tuple(opt.state[m.weight]["exp_avg"].shape),
              "foam_compile" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["FOAMAdamW", "(8,", "2)", "True"]


def test_backend_options_are_checked_when_the_backend_is_built():
    assert foam_compile.backend(level=3, scale=0.5).convert_options == dict(level=3, scale=0.5)
    with pytest.raises(TypeError, match=r"foam_compile.backend: unknown option\(s\) \['levle'\]"):
        foam_compile.backend(levle=2)
    with pytest.raises(ValueError, match=r"foam_compile.backend: invalid level=-1"):
        foam_compile.backend(level=-1)
    with pytest.raises(ValueError, match=r"foam_compile.backend: invalid res_scale=-1.0"):
        foam_compile.backend(res_scale=-1.0)
    with pytest.raises(ValueError, match=r"foam_compile.backend: level='auto' needs budget="):
        foam_compile.backend(level="auto")
