"""Issue 14: one test per defect a new user ran into (each failed before its fix).

The numbers are the issue's. Compiled steps use ``aot_eager`` behind the ``"foam"`` backend: the
backend's own logic is under test, not Inductor's compile time.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import foam_compile
from foam_compile import FOAM

ROOT = Path(__file__).resolve().parents[1]


class TinyLM(nn.Module):
    """An embedding, two blocks of 2-d weights, a norm and an output head (the policy's cases)."""

    def __init__(self, vocab: int = 40, dim: int = 12):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, 20)  # 20: a partial last block at level 3
        self.mix = nn.Linear(20, dim)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, x):
        return self.lm_head(self.norm(self.mix(torch.tanh(self.proj(self.embed(x))))))


def tiny_lm(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def tokens(seed: int, n: int = 6) -> torch.Tensor:
    return torch.randint(0, 40, (4, n), generator=torch.Generator().manual_seed(seed))


def loss_of(model, x):
    logits = model(x[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())


def train(model, opt, steps: int, seed: int = 0) -> None:
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(model, tokens(seed + t)).backward()
        opt.step()


# The policy the README promises, written out independently of foam_compile's own code.
POLICY = {
    "embed.weight": 0,
    "proj.weight": 2,
    "proj.bias": 0,
    "mix.weight": 2,
    "mix.bias": 0,
    "norm.weight": 0,
    "norm.bias": 0,
    "lm_head.weight": 0,
}


def levels_of(opt, model) -> dict[str, int]:
    return {n: opt.state[p]["foam_level"] for n, p in model.named_parameters() if opt.state.get(p)}


def aot_eager():
    return torch._dynamo.lookup_backend("aot_eager")


# ------------------------------------------------------------------------------------- 1
def test_1_named_parameters_are_taken_and_named_in_the_state_dict():
    model = tiny_lm()
    opt = FOAM(model.named_parameters(), lr=1e-2)
    train(model, opt, 2)
    names = [n for n, _ in model.named_parameters()]
    assert opt.state_dict()["param_groups"][0]["param_names"] == names
    assert levels_of(opt, model) == POLICY  # the names reached the policy


# ------------------------------------------------------------------------------------- 2
def test_2_load_state_dict_pre_hook_repairs_a_checkpoint_first():
    model = tiny_lm()
    opt = FOAM(model.parameters(), lr=1e-2)
    train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    proj = next(i for i, (n, _) in enumerate(model.named_parameters()) if n == "proj.weight")
    good = sd["state"][proj]["exp_avg"].clone()
    sd["state"][proj]["exp_avg"] = torch.zeros(20, 12)  # a full-size moment: FOAM would refuse

    def repair(optimizer, state_dict):
        assert optimizer is fresh
        state_dict["state"][proj]["exp_avg"] = good.clone()
        return state_dict

    seen = []
    fresh = FOAM(tiny_lm().parameters(), lr=1e-2)
    fresh.register_load_state_dict_pre_hook(repair)
    fresh.register_load_state_dict_post_hook(lambda o: seen.append(o.state_dict()["state"]))
    fresh.load_state_dict(sd)
    p = fresh.param_groups[0]["params"][proj]
    assert torch.equal(fresh.state[p]["exp_avg"], good)
    assert torch.equal(seen[0][proj]["exp_avg"], good)  # post-hooks see FOAM's loaded state


# ------------------------------------------------------------------------------------- 3
@pytest.mark.parametrize("make", ["FOAM", "convert"])
def test_3_a_float_step_from_an_old_checkpoint_keeps_counting(make):
    """Bias correction must go on: the run equals one whose step stayed a tensor."""

    def build(model):
        if make == "FOAM":
            return FOAM(model.parameters(), lr=1e-2)
        return foam_compile.convert(torch.optim.AdamW(model.parameters(), lr=1e-2))

    a, b = tiny_lm(), tiny_lm()
    opt_a, opt_b = build(a), build(b)
    train(a, opt_a, 3)
    sd = copy.deepcopy(opt_a.state_dict())
    for st in sd["state"].values():
        st["step"] = st["step"].item()  # as older torch versions saved it
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(sd)
    train(a, opt_a, 3, seed=3)
    train(b, opt_b, 3, seed=3)
    for p in b.parameters():
        assert torch.is_tensor(opt_b.state[p]["step"]) and float(opt_b.state[p]["step"]) == 6
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------------- 4
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_4_a_copy_taken_mid_calibration_still_folds(how):
    model = tiny_lm()
    opt = FOAM(model.parameters(), lr=1e-2, level="auto", budget=0.8, calibration_steps=3)
    train(model, opt, 1)
    if how == "deepcopy":
        twin, twin_opt = copy.deepcopy((model, opt))
    else:
        buf = io.BytesIO()
        torch.save((model, opt), buf)
        buf.seek(0)
        twin, twin_opt = torch.load(buf, weights_only=False)
    train(model, opt, 3, seed=1)
    train(twin, twin_opt, 3, seed=1)
    assert any(lv > 0 for lv in levels_of(opt, model).values())
    assert levels_of(twin_opt, twin) == levels_of(opt, model)
    assert twin_opt.foam_plan.levels == opt.foam_plan.levels
    assert pickle.loads(pickle.dumps(opt)).foam_plan.levels == opt.foam_plan.levels


# ------------------------------------------------------------------------------------- 5
def test_5_one_element_tensor_betas_of_any_shape_step_like_floats():
    a, b = tiny_lm(), tiny_lm()
    betas = (torch.tensor([[[0.9]]]), torch.tensor([[0.99]]))  # torch's own test inputs
    opt_a = FOAM(a.parameters(), lr=1e-2, betas=betas)
    opt_b = FOAM(b.parameters(), lr=1e-2, betas=tuple(t.item() for t in betas))  # float32 values
    train(a, opt_a, 3)
    train(b, opt_b, 3)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_5_an_integer_parameter_without_gradient_is_accepted_and_left_alone():
    model = tiny_lm()
    counter = torch.zeros(3, dtype=torch.long)
    opt = FOAM([*model.parameters(), counter], lr=1e-2)
    train(model, opt, 2)
    assert torch.equal(counter, torch.zeros(3, dtype=torch.long)) and counter not in opt.state


# ------------------------------------------------------------------------------------- 6
def frozen_embedding_lm():
    model = tiny_lm()
    model.embed = nn.Embedding(5000, 12)  # big and frozen: its state would dominate
    model.embed.weight.requires_grad_(False)
    return model


def test_6_convert_gives_frozen_parameters_no_state():
    model = frozen_embedding_lm()
    opt = foam_compile.convert(torch.optim.AdamW(model.parameters(), lr=1e-2))
    assert len(opt.state) == 0  # state comes with the first gradient, as in torch
    train(model, opt, 2)
    assert model.embed.weight not in opt.state
    stock = torch.optim.AdamW(frozen_embedding_lm().parameters(), lr=1e-2)
    train(frozen_embedding_lm(), stock, 1)
    report = foam_compile.explain(opt, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert report.adamw_bytes == sum(8 * p.numel() for p in trainable)
    foam = sum(
        t.nbytes
        for st in opt.state.values()
        for k, t in st.items()
        if k != "step" and torch.is_tensor(t)
    )
    assert report.state_bytes == foam < report.adamw_bytes
    assert "no state yet" in str(report)


def test_6_a_parameter_unfrozen_later_gets_the_level_chosen_when_it_entered():
    model = tiny_lm()
    model.proj.weight.requires_grad_(False)
    model.embed.weight.requires_grad_(False)
    opt = foam_compile.convert(
        torch.optim.AdamW(model.parameters(), lr=1e-2), level=2, levels={"proj.weight": 3}
    )
    train(model, opt, 1)
    assert model.proj.weight not in opt.state and model.embed.weight not in opt.state
    restored = foam_compile.convert(torch.optim.AdamW(tiny_lm(1).parameters(), lr=1e-2))
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))  # the choice is in the checkpoint
    clone = copy.deepcopy(opt)
    model.proj.weight.requires_grad_(True)
    model.embed.weight.requires_grad_(True)
    train(model, opt, 1, seed=1)
    assert opt.state[model.proj.weight]["foam_level"] == 3  # levels= honoured at creation
    assert opt.state[model.embed.weight]["foam_level"] == 0  # the policy too
    for other in (restored, clone):
        ps = other.param_groups[0]["params"]
        for p in ps:
            p.requires_grad_(True)
            p.grad = torch.ones_like(p)
        other.step()
        names = [n for n, _ in model.named_parameters()]
        assert other.state[ps[names.index("proj.weight")]]["foam_level"] == 3
        assert other.state[ps[names.index("embed.weight")]]["foam_level"] == 0


def test_6_the_backend_gives_frozen_parameters_no_state(fresh_dynamo):
    model = frozen_embedding_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    @torch.compile(backend=foam_compile.backend(inner=aot_eager()))
    def step(x):
        loss_of(model, x).backward()
        opt.step()
        opt.zero_grad()

    for t in range(2):
        step(tokens(t))
    assert isinstance(opt, FOAM) and model.embed.weight not in opt.state
    assert levels_of(opt, model) == {k: v for k, v in POLICY.items() if k != "embed.weight"}


# ------------------------------------------------------------------------------------- 7
def foam_checkpoint(model) -> dict:
    opt = FOAM(model.parameters(), lr=1e-2)
    train(model, opt, 1)
    return copy.deepcopy(opt.state_dict())


def test_7_a_stock_adamw_on_a_foam_checkpoint_names_convert():
    model = tiny_lm()
    stock = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stock.load_state_dict(foam_checkpoint(tiny_lm()))
    loss_of(model, tokens(0)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"foam_compile\.convert\(optimizer\)"):
        stock.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    foam_compile.convert(stock).step()  # the fix it names works


def test_7_a_checkpoint_of_another_model_says_so():
    model = tiny_lm()
    stock = torch.optim.AdamW(model.parameters(), lr=1e-2)
    other = TinyLM(vocab=40, dim=16)  # same parameter count, other shapes
    stock.load_state_dict(foam_checkpoint(other))
    loss_of(model, tokens(0)).backward()
    with pytest.raises(RuntimeError, match=r"does not fit its parameters.*different model"):
        stock.step()


def test_7_compiled_with_a_checkpoint_of_another_model_says_so(fresh_dynamo):
    model = tiny_lm()
    stock = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stock.load_state_dict(foam_checkpoint(TinyLM(vocab=40, dim=16)))

    @torch.compile(backend=foam_compile.backend(inner=aot_eager()))
    def step(x):
        loss_of(model, x).backward()
        stock.step()

    with pytest.raises(RuntimeError, match=r"does not fit its parameters.*different model"):
        step(tokens(0))


# ------------------------------------------------------------------------------------- 8
def decay_groups(model):
    """The HF Trainer's decay / no-decay groups, as bare tensors."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


ENTRY_POINTS = {
    "FOAM(bare tensors)": lambda m: FOAM(m.parameters(), lr=1e-2),
    "FOAM(named)": lambda m: FOAM(m.named_parameters(), lr=1e-2),
    "FOAM(model=)": lambda m: FOAM(list(m.parameters()), lr=1e-2, model=m),
    "trainer groups": lambda m: FOAM(decay_groups(m), lr=1e-2),
    "convert": lambda m: foam_compile.convert(torch.optim.AdamW(m.parameters(), lr=1e-2)),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_8_every_entry_point_applies_the_same_policy(entry):
    model = tiny_lm()
    opt = ENTRY_POINTS[entry](model)
    train(model, opt, 1)
    assert levels_of(opt, model) == POLICY


def test_8_add_param_group_applies_the_policy():
    model = tiny_lm()
    opt = FOAM(model.proj.parameters(), lr=1e-2)
    opt.add_param_group({"params": [model.embed.weight, model.lm_head.weight]})
    opt.add_param_group({"params": [model.mix.weight, model.mix.bias, *model.norm.parameters()]})
    train(model, opt, 1)
    assert levels_of(opt, model) == POLICY


def test_8_the_backend_applies_the_same_policy(fresh_dynamo):
    model = tiny_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    @torch.compile(backend=foam_compile.backend(inner=aot_eager()))
    def step(x):
        loss_of(model, x).backward()
        opt.step()
        opt.zero_grad()

    step(tokens(0))
    assert levels_of(opt, model) == POLICY


def test_8_names_read_through_ddp_style_wrappers():
    """A DDP/DataParallel root names everything ``module.*``: an anchored ``^output\\.`` would
    miss the head of a Meta-LLaMA-style model."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("tok", nn.Embedding(40, 12))
    model.add_module("block", nn.Linear(12, 12))
    model.add_module("output", nn.Linear(12, 40, bias=False))
    wrapped = nn.DataParallel(model)
    for how in ("model=", "owning module"):
        opt = foam_compile.convert(
            torch.optim.AdamW(model.parameters(), lr=1e-2),
            **({"model": wrapped} if how == "model=" else {}),
        )
        opt.zero_grad()
        model(tokens(0)).sum().backward()
        opt.step()
        levels = {n: opt.state[p]["foam_level"] for n, p in model.named_parameters()}
        assert levels == {"tok.weight": 0, "block.weight": 2, "block.bias": 0, "output.weight": 0}
    del wrapped


# ------------------------------------------------------------------------------------- 9
def test_9_convert_on_a_foam_optimizer_refuses_a_different_level():
    model = tiny_lm()
    opt = FOAM(model.parameters(), lr=1e-2, level=2)
    assert foam_compile.convert(opt) is opt and foam_compile.convert(opt, level=2) is opt
    with pytest.raises(ValueError, match=r"already FOAM.*param_group\['level'\]"):
        foam_compile.convert(opt, level=3)
    with pytest.raises(ValueError, match=r"already FOAM.*set_levels"):
        foam_compile.convert(opt, levels={"proj.weight": 4})


def test_9_a_group_level_changed_after_the_first_step_refolds():
    model = tiny_lm()
    opt = FOAM(model.parameters(), lr=1e-2, level=2)
    train(model, opt, 2)
    m = opt.state[model.proj.weight]["exp_avg"].clone()
    opt.param_groups[0]["level"] = 3
    train(model, opt, 1, seed=2)
    st = opt.state[model.proj.weight]
    assert st["foam_level"] == 3 and st["exp_avg"].shape == (20, 2)
    assert opt.state[model.embed.weight]["foam_level"] == 0  # the policy still holds
    # Deeper keeps block means: the re-folded old moment is the mean of pairs of old blocks.
    refolded = foam_compile.fold(foam_compile.unfold(m, 2, 12), 3)
    assert refolded.shape == st["exp_avg"].shape


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(level=-1), r"invalid level=-1"),
        (dict(level="auto", budget=0), r"invalid budget=0"),
        (dict(level="auto", budget=2), r"invalid budget=2.*budget >= 1"),
        (dict(level="auto", max_error=-0.1), r"invalid max_error"),
        (dict(level="auto", budget=0.3, calibration_steps=0), r"calibration_steps"),
        (dict(level=2, budget=0.3), r"level='auto' only"),
        (dict(scale=0), r"invalid scale=0"),
        (dict(levels={"proj.weight": 99}), r"levels\['proj.weight'\]"),
    ],
)
def test_9_options_are_checked_where_they_are_given(options, match):
    with pytest.raises(ValueError, match=match):
        foam_compile.backend(**options)
    with pytest.raises(ValueError, match=match):
        FOAM(tiny_lm().parameters(), **options)
    with pytest.raises(ValueError, match=match):
        foam_compile.convert(torch.optim.AdamW(tiny_lm().parameters()), **options)


def test_9_a_budget_no_plan_can_meet_fails_at_construction():
    with pytest.raises(ValueError, match=r"no plan meets budget=0.001"):
        FOAM(tiny_lm().parameters(), level="auto", budget=0.001)


# ------------------------------------------------------------------------------------ 10
def test_10_the_backend_keeps_get_last_lr_json_and_does_not_recompile(fresh_dynamo):
    model = tiny_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)

    @torch.compile(backend=foam_compile.backend(inner=aot_eager()))
    def step(x):
        loss_of(model, x).backward()
        opt.step()
        opt.zero_grad()

    logged = []
    for t in range(6):
        if t == 3:  # conversion and the one re-trace are over
            torch._dynamo.config.error_on_recompile = True
        step(tokens(t))
        sched.step()
        logged.append(json.dumps(sched.get_last_lr()))
    assert torch.is_tensor(opt.param_groups[0]["lr"])
    assert json.loads(logged[-1])[0] == pytest.approx(1e-2 * 0.9**6, rel=1e-6)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    plain = torch.optim.lr_scheduler.LambdaLR(
        torch.optim.SGD([nn.Parameter(torch.ones(1))]), lambda s: 1.0
    )
    assert set(vars(sched)) - {"optimizer"} == set(vars(plain)) - {"optimizer"}


# ------------------------------------------------------------------------------------ 11
def test_11_a_stateless_sgd_step_gets_the_one_time_warning(fresh_dynamo):
    model = tiny_lm()
    sgd = torch.optim.SGD(model.parameters(), lr=1e-2)

    @torch.compile(backend=foam_compile.backend(inner=aot_eager()))
    def step(x):
        loss_of(model, x).backward()
        sgd.step()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(tokens(0))
        step(tokens(1))
    said = [w for w in caught if "no FOAM rewrite for SGD" in str(w.message)]
    assert len(said) == 1


# ------------------------------------------------------------------------------------ 12
def test_12_the_readme_points_at_the_projects_own_algorithm_page():
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme and "](docs/algorithm.md)" in readme
    page = (ROOT / "docs" / "algorithm.md").read_text()
    for needed in ("arxiv.org/abs/2512.07112", "partial", "Level 0 is AdamW", "coupled"):
        assert needed in page, needed


def test_12_triton_is_not_a_core_dependency_but_the_tests_get_it():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("triton") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(d.startswith("triton") for d in extras["triton"])
    assert "foam-compile[triton]" in extras["test"]


def test_12_setup_is_skipped_on_a_second_run():
    """scripts/setup.sh returns before any pip call when its stamp matches."""
    script = (ROOT / "scripts" / "setup.sh").read_text()
    first_pip = script.index("pip install")
    skip = re.search(r'if .*"\$stamp".*\n\s*exit 0', script)
    assert skip is not None and skip.start() < first_pip
    assert "ignore:Editable installation" in script  # setuptools' caution on every install


def test_12_the_demo_does_not_validate_every_step_on_short_runs():
    import importlib.util

    pytest.importorskip("tqdm")
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "train_llama.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.eval_interval(30, None) >= 30 // 2  # at most a couple of points
    assert demo.eval_interval(400, None) == 40  # the default 400-step runs: 10 points
    assert demo.eval_interval(30, 10) == 3  # given explicitly, --evals is honoured
    assert math.ceil(100 / demo.eval_interval(100, None)) <= 5


def test_12_logs_call_a_converted_optimizer_by_its_stock_name(fresh_dynamo, caplog):
    model = tiny_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    @torch.compile(backend=foam_compile.backend(inner=aot_eager()))
    def step(x):
        loss_of(model, x).backward()
        opt.step()
        opt.zero_grad()

    with caplog.at_level(logging.INFO, logger="foam_compile"):
        step(tokens(0))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "converted AdamW to FOAM" in text and "FOAMAdamW" not in text
