"""``state_format=`` / ``state_formats=`` as user options: FOAM, convert and the "foam" backend.

Each option is checked where it is given (a bad name is refused naming the option and the valid
names), honoured (state keys, dtypes and ``foam_format`` show it; values equal the format's own
encoding of the reference moments), changed mid-run (re-encoded at the next step, exactly as an
explicit re-layout), and kept by checkpoints. Embeddings and the output head round
stochastically by default under a quantized format (issue 12), unless ``state_formats`` says
otherwise.
"""

import copy
import io

import pytest
import torch
from torch import nn

import foam_compile
from foam_compile import FOAM
from foam_compile.reference import fold
from foam_compile.state import FORMATS, format_of, get_format
from tests.helpers import batches, set_grads, tiny_model

QUANTIZED = ["int8", "int4", "int8-sr", "int4-sr"]


class LM(nn.Module):
    """Embedding, a folded projection (last dim 10: a partial block at level 2), a head."""

    def __init__(self, vocab: int = 37, dim: int = 10):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, x):
        return self.lm_head(torch.tanh(self.proj(self.embed(x))))


def lm(seed: int = 0) -> LM:
    torch.manual_seed(seed)
    return LM()


def backward(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 37, (4, 9), generator=g)
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def formats_by_name(model: nn.Module, opt) -> dict[str, str]:
    return {n: format_of(opt.state[p]).name for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("bad", ["int3", "INT8", "", 8])
def test_bad_state_format_is_refused_everywhere(bad):
    names = r"use one of \['fp32', 'int4', 'int4-sr', 'int8', 'int8-sr'\]"
    model = lm()
    with pytest.raises(ValueError, match=f"FOAM: unknown state_format=.*{names}"):
        FOAM(model.parameters(), state_format=bad)
    with pytest.raises(ValueError, match=f"unknown state_format=.*{names}"):
        FOAM(model.proj.parameters()).add_param_group(
            {"params": model.lm_head.parameters(), "state_format": bad}
        )
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=f"foam_compile.convert: unknown state_format.*{names}"):
        foam_compile.convert(opt, state_format=bad)
    assert type(opt) is torch.optim.AdamW  # nothing changed
    with pytest.raises(ValueError, match=f"foam_compile.backend: unknown state_format.*{names}"):
        foam_compile.backend(state_format=bad)


def test_bad_state_formats_mapping_is_refused_everywhere():
    model = lm()
    for build in (
        lambda **kw: FOAM(model.parameters(), **kw),
        lambda **kw: foam_compile.convert(torch.optim.AdamW(model.parameters()), **kw),
        foam_compile.backend,
    ):
        with pytest.raises(ValueError, match=r"state_formats\['proj.weight'\]: unknown .*'int9'"):
            build(state_formats={"proj.weight": "int9"})
        with pytest.raises(ValueError, match=r"state_formats\['the tensor of shape \[10, 10\]'\]"):
            build(state_formats={model.proj.weight: "fp16"})
        with pytest.raises(TypeError, match="state_formats keys must be parameter names"):
            build(state_formats={3: "int8"})
        with pytest.raises(TypeError, match="state_formats must be a dict"):
            build(state_formats="int8")


def test_bad_group_edit_is_refused_before_any_write():
    model = lm()
    opt = FOAM(model.parameters(), lr=1e-2, state_format="int8")
    backward(model, 0)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["state_format"] = "int2"
    backward(model, 1)
    with pytest.raises(ValueError, match="unknown state_format='int2'"):
        opt.step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    after = opt.state_dict()
    for pid, st in before["state"].items():
        for key, value in st.items():
            assert torch.equal(after["state"][pid][key], value) if torch.is_tensor(value) else True


# ------------------------------------------------------------------------------ honoured


@pytest.mark.parametrize("name", ["fp32", *QUANTIZED])
def test_foam_state_format_shapes_dtypes_and_sr_default(name):
    model = lm()
    opt = FOAM(model.named_parameters(), lr=1e-2, state_format=name)
    backward(model, 0)
    opt.step()
    sr = get_format(name).name if name.endswith("-sr") or name == "fp32" else f"{name}-sr"
    assert formats_by_name(model, opt) == {
        "embed.weight": sr,  # the policy: stochastic rounding for embeddings and the head
        "proj.weight": name,
        "proj.bias": name,
        "lm_head.weight": sr,
    }
    for n, p in model.named_parameters():
        st = opt.state[p]
        fmt = format_of(st)
        assert ("foam_format" in st) == (fmt.name != "fp32")
        level = st["foam_level"]
        assert level == (2 if n == "proj.weight" else 0)
        folded = (*p.shape[:-1], -(-p.shape[-1] // 2**level))
        for key in ("exp_avg", "exp_avg_sq"):
            assert fmt.check(st, key, p, folded) is None
            assert set(fmt.keys(key)) <= set(st)
            if fmt.name == "fp32":
                assert st[key].dtype == torch.float32
            else:
                assert st[key].dtype in (torch.int8, torch.uint8)
                assert st[f"{key}_scale"].dtype == torch.float32


def test_mapping_wins_over_the_sr_default_by_name_and_by_tensor():
    model = lm()
    opt = FOAM(
        model.named_parameters(),
        lr=1e-2,
        state_format="int8",
        state_formats={"embed.weight": "int8", model.proj.weight: "fp32", "proj.bias": "int4-sr"},
    )
    backward(model, 0)
    opt.step()
    assert formats_by_name(model, opt) == {
        "embed.weight": "int8",
        "proj.weight": "fp32",
        "proj.bias": "int4-sr",
        "lm_head.weight": "int8-sr",
    }


def test_no_sr_default_for_other_weights_or_fp32():
    model = lm()
    opt = FOAM(model.parameters(), lr=1e-2)  # names from the owning module
    backward(model, 0)
    opt.step()
    assert set(formats_by_name(model, opt).values()) == {"fp32"}
    assert "state_format" not in opt.param_groups[0]  # absent means fp32: state dicts unchanged


def test_convert_encodes_existing_moments_in_the_format():
    model = lm()
    stock = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for seed in range(2):
        backward(model, seed)
        stock.step()
    moments = {
        p: {k: stock.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}
        for p in model.parameters()
    }
    opt = foam_compile.convert(stock, state_format="int8", model=model)
    assert opt.param_groups[0]["state_format"] == "int8"
    for n, p in model.named_parameters():
        st = opt.state[p]
        fmt = get_format("int8-sr" if n in ("embed.weight", "lm_head.weight") else "int8")
        assert st["foam_format"] == fmt.name
        for key, kind in (("exp_avg", "signed"), ("exp_avg_sq", "square")):
            want = fmt.encode(fold(moments[p][key], st["foam_level"]), p, key, kind)
            for part, value in want.items():
                assert torch.equal(st[part], value), (n, part)


def test_convert_refuses_to_change_formats_of_a_foam_optimizer():
    model = lm()
    opt = FOAM(model.named_parameters(), lr=1e-2, state_format="int8")
    assert foam_compile.convert(opt, state_format="int8") is opt  # no change: accepted
    with pytest.raises(ValueError, match="already FOAM, with state_format='int8'"):
        foam_compile.convert(opt, state_format="int4")
    with pytest.raises(ValueError, match="keeps its moments in 'int8'.*state_formats= given"):
        foam_compile.convert(opt, state_formats={model.proj.weight: "fp32"}, model=None)


# ------------------------------------------------------------------------------ mid-run


@pytest.mark.parametrize("switch", [("fp32", "int8"), ("int8", "int4"), ("int4-sr", "fp32")])
def test_changing_a_groups_format_re_encodes_at_the_next_step(switch):
    """Editing param_groups[i]['state_format'] equals re-laying out each parameter by hand."""
    old, new = switch
    model = tiny_model()
    twin = copy.deepcopy(model)
    a = FOAM(model.parameters(), lr=1e-2, state_format=old)
    b = FOAM(twin.parameters(), lr=1e-2, state_format=old)
    data = batches(3)
    for m, o in ((model, a), (twin, b)):
        set_grads(m, *data[0])
        o.step()
    a.param_groups[0]["state_format"] = new
    for p in twin.parameters():
        b._set_layout(p, state_format=new)
    for x, y in data[1:]:
        for m, o in ((model, a), (twin, b)):
            set_grads(m, x, y)
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert format_of(a.state[p]).name == new
        assert a.state[p].keys() == b.state[q].keys()
        for key, value in a.state[p].items():
            assert torch.equal(value, b.state[q][key]) if torch.is_tensor(value) else True


# ------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("name", QUANTIZED)
def test_checkpoint_round_trip_continues_bitwise(name):
    model = lm()
    opt = FOAM(model.named_parameters(), lr=1e-2, state_format=name)
    for seed in range(2):
        backward(model, seed)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twin = copy.deepcopy(model)
    loaded = FOAM(twin.named_parameters(), lr=1e-2, state_format=name)
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    assert loaded.param_groups[0]["state_format"] == name
    assert loaded.param_groups[0]["foam_layout"] == opt.param_groups[0]["foam_layout"]
    for seed in range(2, 4):
        for m, o in ((model, opt), (twin, loaded)):
            backward(m, seed)
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, loaded.state[q][key]) if torch.is_tensor(value) else True


@pytest.mark.parametrize("into", ["fp32", "int4"])
def test_loading_into_another_format_re_encodes(into):
    model = lm()
    opt = FOAM(model.named_parameters(), lr=1e-2, state_format="int8")
    backward(model, 0)
    opt.step()
    sd = opt.state_dict()
    twin = copy.deepcopy(model)
    loaded = FOAM(twin.named_parameters(), lr=1e-2, state_format=into)
    loaded.load_state_dict(sd)
    assert loaded.param_groups[0].get("state_format", "fp32") == into
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        st, new = opt.state[p], loaded.state[q]
        want = (
            into
            if n not in ("embed.weight", "lm_head.weight")
            else FORMATS.get(f"{into}-sr", FORMATS[into]).name
        )
        assert format_of(new).name == want
        fmt_old, fmt_new = format_of(st), format_of(new)
        for key, kind in (("exp_avg", "signed"), ("exp_avg_sq", "square")):
            value = fmt_old.decode(st, key, kind, p)
            expected = fmt_new.encode(value, q, key, kind)
            for part, t in expected.items():
                assert torch.equal(new[part], t), (n, part)


def test_an_optimizer_built_without_the_option_takes_the_checkpoints_formats():
    """Resuming with FOAM(...) or convert(AdamW(...)) and no state_format: the checkpoint's
    formats (and group key) win, as torch's options do."""
    model = lm()
    opt = FOAM(model.named_parameters(), lr=1e-2, state_format="int4")
    backward(model, 0)
    opt.step()
    sd = opt.state_dict()
    for build in (
        lambda m: FOAM(m.named_parameters(), lr=1e-2),
        lambda m: foam_compile.convert(torch.optim.AdamW(m.parameters(), lr=1e-2)),
    ):
        twin = copy.deepcopy(model)
        loaded = build(twin)
        assert "state_format" not in loaded.param_groups[0]
        loaded.load_state_dict(copy.deepcopy(sd))
        assert loaded.param_groups[0]["state_format"] == "int4"
        assert formats_by_name(twin, loaded) == formats_by_name(model, opt)
        for p, q in zip(model.parameters(), twin.parameters()):
            for key, value in opt.state[p].items():
                if torch.is_tensor(value):
                    assert torch.equal(value, loaded.state[q][key])


def test_stock_checkpoint_loads_into_a_quantized_optimizer():
    model = lm()
    stock = torch.optim.AdamW(model.parameters(), lr=1e-2)
    backward(model, 0)
    stock.step()
    opt = FOAM(model.named_parameters(), lr=1e-2, state_format="int4")
    opt.load_state_dict(stock.state_dict())
    assert formats_by_name(model, opt) == {
        "embed.weight": "int4-sr",
        "proj.weight": "int4",
        "proj.bias": "int4",
        "lm_head.weight": "int4-sr",
    }
    backward(model, 1)
    opt.step()  # and it steps
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------ compiled


def test_compiled_stock_adamw_runs_with_int8_state(fresh_dynamo):
    """One small compile: backend(state_format='int8') converts a stock AdamW; the compiled
    steps follow eager FOAM with the same option, fed the same gradients.

    Inductor reorders the float32 math, so the two differ by roundings: per step and element,
    each side rounds ``p`` at most 4 times (decay factor, product, difference, store) and the
    update carries at most ``OPS`` roundings of its size (tests/float64_model.py); the codes
    store the same moments, so the difference is at most twice the sum of those.
    """
    from float64_model import OPS, unit_roundoff

    u = unit_roundoff(torch.float32)
    model = tiny_model()
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.02))
    eager = foam_compile.convert(
        torch.optim.AdamW(twin.parameters(), lr=torch.tensor(0.02)), state_format="int8"
    )

    @torch.compile(backend=foam_compile.backend(state_format="int8"))
    def step():
        opt.step()

    tol = [torch.zeros_like(q) for q in twin.parameters()]
    for x, y in batches(4):
        set_grads(model, x, y)
        before = [q.detach().clone() for q in twin.parameters()]
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        step()
        eager.step()
        for t, q, b in zip(tol, twin.parameters(), before):
            t += 2 * (4 * u * b.abs() + OPS * u * (q.detach() - b).abs())
    assert isinstance(opt, FOAM)
    assert fresh_dynamo["foam"]["fold_adam_states"] == 1
    assert opt.param_groups[0]["state_format"] == "int8"
    for p, q, t in zip(model.parameters(), twin.parameters(), tol):
        st = opt.state[p]
        assert st["foam_format"] == "int8"
        assert st["exp_avg"].dtype == torch.int8 and st["exp_avg_sq"].dtype == torch.uint8
        assert ((p - q).abs() <= t).all(), ((p - q).abs() - t).max()


# ------------------------------------------------------------------------------ level="auto"


def auto_steps(model, opt, steps: int) -> None:
    """``steps`` optimizer steps on fresh random tokens (level='auto' calibrates, then plans)."""
    for seed in range(steps):
        g = torch.Generator().manual_seed(seed)
        model.zero_grad(set_to_none=True)
        model(torch.randint(0, 64, (4, 9), generator=g)).square().mean().backward()
        opt.step()


def test_auto_plan_picks_formats_within_budget_and_keeps_sr_default():
    """formats= lets level='auto' choose (level, format); the budget (below what float32 state
    can reach: embedding and head stay at level 0) is met, and a quantized embedding/head is
    rounded stochastically."""
    torch.manual_seed(0)
    model = LM(vocab=64, dim=32)
    with pytest.raises(ValueError, match="least state possible"):  # float32 only: unreachable
        FOAM(model.named_parameters(), level="auto", budget=0.3, calibration_steps=2)
    opt = FOAM(
        model.named_parameters(),
        lr=1e-2,
        level="auto",
        budget=0.3,
        formats=("fp32", "int8"),
        calibration_steps=2,
    )
    auto_steps(model, opt, 3)
    got = formats_by_name(model, opt)
    assert got["embed.weight"] == "int8-sr" and got["lm_head.weight"] == "int8-sr"
    table = foam_compile.explain(opt, model)
    assert table.state_bytes <= 0.3 * table.adamw_bytes
    assert opt.foam_plan.formats["embed.weight"] == "int8"  # the plan's choice, rounded SR


@pytest.mark.parametrize("fmt", ["int8", "int8-sr"])
def test_auto_levels_budget_holds_for_the_stored_format(fmt):
    """state_format= with level='auto' and no formats=: the plan prices every parameter in the
    format it is stored in, so the budget is met by the stored bytes and nearly spent (priced
    as float32, int8 state ended at a third of the budget, folded far deeper than needed)."""
    torch.manual_seed(0)
    model = LM(vocab=64, dim=32)
    opt = FOAM(
        model.named_parameters(),
        lr=1e-2,
        level="auto",
        budget=0.3,
        state_format=fmt,
        calibration_steps=2,
    )
    auto_steps(model, opt, 3)
    table = foam_compile.explain(opt, model)
    assert table.state_bytes == opt.foam_plan.state_bytes
    assert 0.25 * table.adamw_bytes <= table.state_bytes <= 0.3 * table.adamw_bytes
    assert set(formats_by_name(model, opt).values()) <= {"int8", "int8-sr"}


def test_formats_option_is_checked_where_given():
    model = lm()
    for build in (
        lambda **kw: FOAM(model.parameters(), **kw),
        lambda **kw: foam_compile.convert(torch.optim.AdamW(model.parameters()), **kw),
        foam_compile.backend,
    ):
        with pytest.raises(ValueError, match="formats= choose the levels .* of level='auto' only"):
            build(formats=("fp32", "int8"))
        with pytest.raises(ValueError, match="formats: unknown state_format='int9'"):
            build(level="auto", budget=0.5, formats=("int9",))
        with pytest.raises(TypeError, match="formats must be a list of state formats"):
            build(level="auto", budget=0.5, formats="int8")
