"""The fold_adam_states pass on Dynamo-captured graphs alone (no backend, no Inductor)."""

import copy

import pytest
import torch

from foam_compile import FOAM
from foam_compile.passes.fold_adam_states import fold_adam_states
from foam_compile.reference import folded_shape
from tests.helpers import batches, set_grads, tiny_model


def capture(fn, run=False):
    """Dynamo-capture ``fn``'s graphs; an optimizer step is not run (its graph returns nothing)."""
    graphs = []

    def recorder(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return copy.deepcopy(gm).forward if run else (lambda *args: ())

    torch.compile(fn, backend=recorder)()
    return graphs


OPTIONS = [
    dict(weight_decay=0.1),
    dict(amsgrad=True, weight_decay=0.05),
    dict(maximize=True),
    dict(lr=torch.tensor(0.01), foreach=False),
    dict(capturable=True),
]


@pytest.mark.parametrize(
    "options", OPTIONS, ids=["wd", "amsgrad", "maximize", "tensor_lr", "capturable"]
)
@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_rewrites_stock_step_into_foam(cls, foreach, options, fresh_dynamo):
    options = dict(options)
    options.setdefault("foreach", foreach)
    lr = options.pop("lr", 0.01)
    model, ref_model = tiny_model(), tiny_model()
    opt = cls(model.parameters(), lr=lr, **options)
    x, y = batches(1)[0]
    set_grads(model, x, y)
    set_grads(ref_model, x, y)

    graphs = capture(lambda: opt.step())
    assert len(graphs) == 1
    gm, inputs = graphs[0]
    full_before = {
        id(t) for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim()
    }

    rewritten = fold_adam_states(gm, inputs, [opt], level=2)

    assert rewritten == [opt] and isinstance(opt, FOAM) and isinstance(opt, cls)
    assert fresh_dynamo["foam"]["fold_adam_states"] == 1
    assert fresh_dynamo["foam"]["folded_params"] == 2  # the two weights; biases stay at level 0
    calls = [
        n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "foam_adam_"
    ]
    assert len(calls) == 1
    # No full-size moment survives in the graph module.
    held = {id(t) for t in list(gm.buffers()) + list(gm.parameters())}
    leftovers = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    assert not (held & (full_before - {id(t) for t in leftovers}))
    for p, st in opt.state.items():
        assert tuple(st["exp_avg"].shape) == folded_shape(p.shape, st["foam_level"])

    gm(*inputs)  # run the rewritten graph eagerly: one FOAM step

    decoupled = cls is torch.optim.AdamW
    ref = FOAM(
        ref_model.parameters(),
        lr=float(lr),
        level=2,
        decoupled_weight_decay=decoupled,
        weight_decay=options.get("weight_decay", 1e-2 if decoupled else 0.0),
        amsgrad=options.get("amsgrad", False),
        maximize=options.get("maximize", False),
    )
    ref.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-6, atol=1e-9)
        assert float(opt.state[p]["step"]) == 1.0


def test_graph_without_optimizer_update_is_unchanged(fresh_dynamo):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x, y = batches(1)[0]
    graphs = capture(lambda: model(x).relu().sum(), run=True)
    gm, inputs = graphs[0]
    code = gm.code
    assert fold_adam_states(gm, inputs, [opt]) == []
    assert gm.code == code
    assert not isinstance(opt, FOAM)
    assert fresh_dynamo["foam"]["fold_adam_states"] == 0


def test_other_optimizers_are_left_alone(fresh_dynamo):
    model = tiny_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    set_grads(model, *batches(1)[0])
    sgd.step()  # momentum buffers exist
    gm, inputs = capture(lambda: sgd.step())[0]
    code = gm.code
    assert fold_adam_states(gm, inputs, [sgd]) == []
    assert gm.code == code


def test_refuses_when_update_values_escape(fresh_dynamo):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, foreach=False)
    set_grads(model, *batches(1)[0])
    opt.step()
    gm, inputs = capture(lambda: opt.step())[0]
    # Make the graph return an intermediate of the update (a denominator): it escapes.
    denom = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "add_")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((denom,),)
    gm.recompile()
    code = gm.code
    before = copy.deepcopy(opt.state_dict())
    with pytest.warns(UserWarning, match="not folding"):
        assert fold_adam_states(gm, inputs, [opt]) == []
    assert gm.code == code and not isinstance(opt, FOAM)
    after = opt.state_dict()
    for pid, st in before["state"].items():
        for key, value in st.items():
            assert torch.equal(after["state"][pid][key], value)
