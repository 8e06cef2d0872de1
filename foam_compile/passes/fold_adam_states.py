"""fold_adam_states: rewrite a captured ``torch.optim.AdamW``/``Adam`` step into FOAM's update.

Matches: in a Dynamo graph, the optimizer update of a live, stock (non-fused) ``Adam``/``AdamW``,
found by *tensor identity*: the graph's ``get_attr`` nodes and example inputs are the very tensors
in ``opt.state`` and ``opt.param_groups`` (and the gradients). The update is every node that
depends on the optimizer's state tensors (``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``), every in-place op on one of its parameters, and the nodes that only feed
those. No op spelling is matched, so the for-loop and foreach implementations, capturable steps,
tensor lr and the spellings of different torch versions (``lerp_`` vs ``addcmul_``, ``fma``) are
all the same to this pass.

Which optimizers, which state keys seed the match, and which update replaces it come from the
families table (:mod:`foam_compile.families`).

Guarantees: the optimizer is converted to FOAM (:func:`foam_compile.convert`: it owns the folded
state), the matched nodes are replaced by one call of the family's update (for Adam/AdamW
:func:`foam_compile.functional.foam_adam_`) per param group that reads and writes the folded
state tensors (registered as buffers of ``gm``, the same objects as in ``opt.state``), and the
full-size moment buffers are deleted from ``gm``. The
graph is linted and recompiled. Counters: ``counters["foam"]["fold_adam_states"]`` (updates
rewritten) and ``counters["foam"]["folded_params"]``.

Leaves alone: everything that is not such an update (forward, backward, other optimizers, user
ops on gradients), and an update whose values escape it (an output or a non-update node uses
them): that one is refused with a warning and the graph is not changed.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import Tensor, fx
from torch._dynamo.utils import counters

from .. import master_weights
from ..checkpoint import describe
from ..convert import convert
from ..families import family_of
from ..optimizer import FOAM
from ..state import format_of

__all__ = ["fold_adam_states", "find_adam_updates", "AdamUpdate", "graph_tensors", "updates_params"]


@dataclass
class AdamUpdate:
    """One optimizer's update found in a graph."""

    optimizer: torch.optim.Optimizer
    nodes: set[fx.Node]
    tensor_nodes: dict[int, fx.Node]  # id(tensor) -> the node that holds it
    params: list[Tensor] = field(default_factory=list)  # parameters with a gradient


def graph_tensors(gm: fx.GraphModule, example_inputs: Sequence) -> dict[fx.Node, Tensor]:
    """The real tensor behind each ``get_attr`` and ``placeholder`` node."""
    values: dict[fx.Node, Tensor] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, Tensor):
            values[node] = value
    for node in gm.graph.find_nodes(op="get_attr"):
        value = _fetch(gm, node.target)
        if isinstance(value, Tensor):
            values[node] = value
    return values


def _fetch(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _flat_nodes(arg) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(arg, out.append)
    return out


def _is_inplace(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        if node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
            return True
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            return schema.is_mutable
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    return False


def updates_params(
    gm: fx.GraphModule, example_inputs: Sequence, opt: torch.optim.Optimizer
) -> bool:
    """Whether ``gm`` updates any parameter of ``opt`` in place (its step is in this graph)."""
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    nodes = {n for n, t in graph_tensors(gm, example_inputs).items() if id(t) in params}
    return any(
        _is_inplace(node) and node.args and set(_flat_nodes(node.args[0])) & nodes
        for node in gm.graph.nodes
    )


def find_adam_updates(
    gm: fx.GraphModule, example_inputs: Sequence, optimizers: Sequence[torch.optim.Optimizer]
) -> list[AdamUpdate]:
    """The update of each of ``optimizers`` present in ``gm`` (see the module docstring)."""
    from ..discovery import optimizer_tensors

    values = graph_tensors(gm, example_inputs)
    by_id: dict[int, fx.Node] = {}
    for node, t in values.items():
        by_id.setdefault(id(t), node)
    dataflow = nx.DiGraph()
    for node in gm.graph.nodes:
        dataflow.add_node(node)
        for src in node.all_input_nodes:
            dataflow.add_edge(src, node)

    updates = []
    for opt in optimizers:
        roles = optimizer_tensors(opt)
        keys = family_of(opt).state_keys
        seeds = [by_id[i] for i, (role, _) in roles.items() if role in keys and i in by_id]
        if not seeds:
            continue
        params = {by_id[i] for i, (role, _) in roles.items() if role == "param" and i in by_id}
        nodes: set[fx.Node] = set()
        for seed in seeds:
            nodes |= nx.descendants(dataflow, seed)
        for node in gm.graph.nodes:
            if _is_inplace(node) and node.args and set(_flat_nodes(node.args[0])) & params:
                nodes.add(node)
                nodes |= nx.descendants(dataflow, node)
        # Absorb the pure computations that only feed the update (e.g. grad * grad).
        changed = True
        while changed:
            changed = False
            for node in gm.graph.nodes:
                if (
                    node not in nodes
                    and node.op in ("call_function", "call_method")
                    and node.users
                    and not _is_inplace(node)
                    and all(u in nodes for u in node.users)
                ):
                    nodes.add(node)
                    changed = True
        nodes = {n for n in nodes if n.op in ("call_function", "call_method", "call_module")}
        tensor_nodes = {i: by_id[i] for i in roles if i in by_id}
        with_grad = [
            p
            for g in opt.param_groups
            for p in g["params"]
            if p.grad is not None and id(p) in tensor_nodes and id(p.grad) in tensor_nodes
        ]
        updates.append(AdamUpdate(opt, nodes, tensor_nodes, with_grad))
    return updates


def _refusal(update: AdamUpdate) -> str | None:
    opt = update.optimizer
    escaping = [u for n in update.nodes for u in n.users if u not in update.nodes]
    if escaping:
        return f"values of the {type(opt).__name__} update are used outside it ({escaping[0]})"
    stepped = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if len(update.params) != len(stepped):
        return (
            f"{len(stepped) - len(update.params)} parameters with gradients of the "
            f"{type(opt).__name__} are missing from the graph"
        )
    return None


def fold_adam_states(
    gm: fx.GraphModule,
    example_inputs: Sequence,
    optimizers: Sequence[torch.optim.Optimizer],
    **convert_options,
) -> list[torch.optim.Optimizer]:
    """Rewrite the update of each stock Adam/AdamW in ``optimizers`` found in ``gm`` into FOAM.

    ``convert_options`` go to :func:`foam_compile.convert` (level, scale, levels, model, ...).
    Returns the optimizers rewritten (now converted). Refused updates warn and stay as they are.
    """
    candidates = [
        o
        for o in optimizers
        if family_of(o) is not None
        and not isinstance(o, FOAM)
        and not any(g.get("fused") for g in o.param_groups)
    ]
    rewritten = []
    for update in find_adam_updates(gm, example_inputs, candidates):
        reason = _refusal(update)
        if reason:
            warnings.warn(
                f"foam: not folding this step ({reason}); it runs unchanged.", stacklevel=2
            )
            continue
        # Where each full-size moment sat in the graph, so its folded successor inherits the
        # Dynamo source (the same ``opt.state[p][key]`` slot).
        slots = {
            (id(p), key): update.tensor_nodes[id(value)].target
            for p, st in update.optimizer.state.items()
            for key, value in st.items()
            if isinstance(value, Tensor)
            and id(value) in update.tensor_nodes
            and update.tensor_nodes[id(value)].op == "get_attr"
        }
        opt = convert(update.optimizer, **convert_options)
        _replace_update(gm, update, opt, slots)
        rewritten.append(opt)
        counters["foam"]["fold_adam_states"] += 1
        counters["foam"]["folded_params"] += sum(
            1 for p in update.params if opt.state[p]["foam_level"] > 0
        )
    if rewritten:
        _drop_unused_attrs(gm)
        gm.graph.lint()
        gm.recompile()
    return rewritten


def _replace_update(
    gm: fx.GraphModule, update: AdamUpdate, opt: torch.optim.Optimizer, slots: dict
) -> None:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = max(update.nodes, key=order.__getitem__)
    top = next(n for n in graph.nodes if n.op != "placeholder")
    calls = []
    family = opt.foam_family
    for gi, group in enumerate(opt.param_groups):
        params = [p for p in group["params"] if any(p is q for q in update.params)]
        if not params:
            continue
        hyper = family.hyper(group).as_dict()
        states = []
        with graph.inserting_before(top):  # new state buffers are read from the start
            for pi, p in enumerate(params):
                st = opt.state[p]
                # This graph calls the update directly, not FOAM.step, which would give a
                # bfloat16/float16 weight its correction bits (master_weights) first.
                where = describe(p, gi, next(i for i, q in enumerate(group["params"]) if q is p))
                master_weights.reconcile_(p, st, hyper["master_weights"], where)
                nodes = {
                    key: _attr_node(
                        gm, value, f"foam_g{gi}_p{pi}_{key}", update, slots.get((id(p), key))
                    )
                    for key, value in st.items()
                    if isinstance(value, Tensor)
                }
                states.append(
                    {**nodes, "foam_level": st["foam_level"], "foam_format": format_of(st).name}
                )
            if isinstance(hyper["lr"], Tensor):
                hyper["lr"] = _attr_node(gm, hyper["lr"], f"foam_g{gi}_lr", update)
        args = (
            [update.tensor_nodes[id(p)] for p in params],
            [update.tensor_nodes[id(p.grad)] for p in params],
            states,
        )
        calls.append((family.update, args, hyper))
    # After the last update node every tensor the update read is defined; nothing after it
    # reads an update value (checked by _refusal), so the new calls can take its place.
    anchor = last
    for fn, args, kwargs in calls:
        with graph.inserting_after(anchor):
            anchor = graph.call_function(fn, args=args, kwargs=kwargs)
    for node in sorted(update.nodes, key=order.__getitem__, reverse=True):
        graph.erase_node(node)


def _attr_node(
    gm: fx.GraphModule, tensor: Tensor, name: str, update: AdamUpdate, slot: str | None = None
) -> fx.Node:
    """A ``get_attr`` node for ``tensor``: the existing one if the graph has it, else a buffer.

    A Dynamo graph records where each buffer came from (``_param_name_to_source``, read by
    AOTAutograd); a new buffer takes the source of the ``slot`` it replaces, or a fresh one.
    """
    node = update.tensor_nodes.get(id(tensor))
    if node is not None and node.op == "get_attr":
        return node
    gm.register_buffer(name, tensor)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        from torch._dynamo.source import ConstantSource

        sources[name] = sources.pop(slot, None) if slot else None
        if sources[name] is None:
            sources[name] = ConstantSource(f"foam_{name}_{id(tensor)}")
    node = gm.graph.get_attr(name)
    update.tensor_nodes[id(tensor)] = node
    return node


def _drop_unused_attrs(gm: fx.GraphModule) -> None:
    """Delete ``get_attr`` nodes nobody uses any more, and the tensors they held (the full-size
    moments), so that the compiled module does not keep them alive."""
    for node in list(gm.graph.find_nodes(op="get_attr")):
        if not node.users:
            target = node.target
            gm.graph.erase_node(node)
            if not any(n.target == target for n in gm.graph.find_nodes(op="get_attr")):
                owner, _, name = target.rpartition(".")
                module = gm.get_submodule(owner) if owner else gm
                module._buffers.pop(name, None)
                module._parameters.pop(name, None)
                module.__dict__.pop(name, None)
                getattr(gm, "_param_name_to_source", {}).pop(target, None)
