"""The ``"foam"`` torch.compile backend: FOAM for a stock AdamW/Adam step, Inductor for the rest.

``torch.compile(step, backend="foam")`` finds this module through the ``torch_dynamo_backends``
entry point (no import needed). For each captured graph the backend

1. finds the live optimizers whose tensors the graph holds (by identity, see ``discovery``),
2. rewrites each stock AdamW/Adam update with the ``fold_adam_states`` pass, which converts the
   optimizer to FOAM (it owns the folded state from then on), and
3. hands the graph to Inductor; a graph whose compile converted an optimizer runs once, as the
   rewritten FX graph, without Inductor.

After the conversion Dynamo re-traces the step once (the optimizer's class changed), this time
tracing FOAM's own step, which Inductor compiles; from then on the steady state has no
recompiles (use a tensor lr, or ``tensor_lr=True`` which is the backend's default, so that a
scheduler does not recompile).
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, fx, nn

from .convert import SUPPORTED, convert
from .discovery import live_optimizers, optimizers_owning
from .optimizer import FOAM
from .passes.fold_adam_states import fold_adam_states, graph_tensors
from .policy import KEEP_UNFOLDED

__all__ = ["backend", "foam_backend", "FoamBackend"]

log = logging.getLogger("foam_compile")
_warned: set[tuple[int, str]] = set()


def _warn_once(opt: torch.optim.Optimizer, kind: str, message: str) -> None:
    if (id(opt), kind) not in _warned:
        _warned.add((id(opt), kind))
        warnings.warn(message, stacklevel=3)


class FoamBackend:
    """A configured ``"foam"`` backend; see :func:`backend` for the options."""

    def __init__(
        self,
        *,
        level: int | str | None = None,
        scale: float | None = None,
        res_scale: float | None = None,
        levels: Mapping[str | Tensor, int] | None = None,
        model: nn.Module | None = None,
        keep_unfolded: Iterable[str] | None = KEEP_UNFOLDED,
        tensor_lr: bool = True,
        optimizers: Iterable[torch.optim.Optimizer] | None = None,
        inner=None,
        budget: float | None = None,
        max_error: float | None = None,
        calibration_steps: int = 8,
    ):
        self.convert_options = dict(
            level=level, scale=scale, res_scale=res_scale, levels=levels, model=model,
            keep_unfolded=keep_unfolded, budget=budget, max_error=max_error,
            calibration_steps=calibration_steps,
        )
        self.tensor_lr = tensor_lr
        self.optimizers = list(optimizers) if optimizers is not None else None
        self.inner = inner

    def __call__(self, gm: fx.GraphModule, example_inputs):
        _install_compile_start_hook()  # torch._dynamo.reset() clears it
        tensors = list(graph_tensors(gm, example_inputs).values())
        if self.optimizers is not None:
            ids = {id(t) for t in tensors}
            found = [o for o in self.optimizers if any(id(p) in ids for g in o.param_groups for p in g["params"])]
        else:
            found = optimizers_owning(tensors)
        self._check(found)
        rewritten = fold_adam_states(gm, example_inputs, found, **self.convert_options)
        if rewritten and self.tensor_lr:
            _TENSOR_LR_PENDING.update(rewritten)
            _convert_lrs_when_this_compile_ends()
        for opt in rewritten:
            log.info("foam: converted %s to FOAM\n%s", type(opt).__name__, _explain(opt))
        if rewritten and self.inner is None:
            # This graph runs once: the optimizer's class just changed, so Dynamo's type guard
            # fails on the next call and re-traces FOAM's own step, which Inductor compiles then.
            # Compiling this one too would double the cold-start time for a single step.
            return gm.forward
        return self._inner(gm, example_inputs)

    def _inner(self, gm, example_inputs):
        if self.inner is not None:
            return self.inner(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    def _check(self, found: list[torch.optim.Optimizer]) -> None:
        """Say once, per optimizer, when FOAM cannot take over its step."""
        for opt in found:
            if isinstance(opt, FOAM):
                continue
            name = type(opt).__name__
            if isinstance(opt, SUPPORTED) and any(g.get("fused") for g in opt.param_groups):
                _warn_once(
                    opt, "fused",
                    f"backend='foam': torch.optim.{name}(fused=True) is never traced by "
                    "torch.compile, so its step still runs plain Adam. Fix: call "
                    "foam_compile.convert(optimizer) once after creating it.",
                )
            elif not isinstance(opt, SUPPORTED) and opt.state:
                _warn_once(
                    opt, "unknown",
                    f"backend='foam': no FOAM rewrite for {name} (only torch.optim.AdamW and "
                    "Adam); its step is compiled unchanged by Inductor.",
                )
            elif isinstance(opt, SUPPORTED):
                _remind_if_stepped_eagerly(opt)


def _remind_if_stepped_eagerly(opt: torch.optim.Optimizer) -> None:
    """Its parameters are in a 'foam' graph but its step may run outside: warn if it does."""
    if getattr(opt, "_foam_eager_hook", None) is not None:
        return

    def hook(optimizer, args, kwargs):
        if torch.compiler.is_compiling() or isinstance(optimizer, FOAM):
            return
        _warn_once(
            optimizer, "eager",
            f"backend='foam': this {type(optimizer).__name__} stepped outside the compiled "
            "function, so it ran plain Adam. Fix: call optimizer.step() inside the function "
            "compiled with backend='foam', or foam_compile.convert(optimizer) once.",
        )

    opt._foam_eager_hook = opt.register_step_pre_hook(hook)


def _explain(opt) -> str:
    from .convert import explain

    return str(explain(opt))


def backend(**options) -> FoamBackend:
    """A ``"foam"`` backend with non-default options, for ``torch.compile(backend=...)``.

    Options: ``level`` (default 2), ``scale`` (alpha, on folded parameters), ``res_scale`` (rho),
    ``levels`` (per parameter name or tensor), ``model`` (names for the policy; by default the
    owning modules are found), ``keep_unfolded`` (name patterns left at level 0; the paper's
    embeddings/head/norms by default), ``tensor_lr`` (default True: float lrs become tensors so
    schedulers do not recompile), ``optimizers`` (restrict to these), ``inner`` (the compiler for
    the rewritten graph, Inductor by default); ``level="auto"`` with ``budget`` and/or
    ``max_error`` (and ``calibration_steps``) picks each parameter's level from the first real
    gradients (see :class:`foam_compile.FOAM`).

        step = torch.compile(step, backend=foam_compile.backend(level=2, scale=0.25))
    """
    return FoamBackend(**options)


def foam_backend(gm: fx.GraphModule, example_inputs):
    """The ``"foam"`` backend with default options (the entry point's target)."""
    return FoamBackend()(gm, example_inputs)


# ---------------------------------------------------------------------------------------------
# Resuming a FOAM checkpoint in an unchanged script: a stock AdamW that loaded folded state
# would be traced by Dynamo with its stock step and fail on the folded shapes before any backend
# runs. Dynamo runs start callbacks before it traces a frame; there we convert such optimizers,
# so the trace sees FOAM's step. Registered when this module is imported, which the entry point
# does when ``backend="foam"`` is looked up.


# Dynamo builds the guards of a graph from the live objects *after* the backend returns, so the
# backend must not turn a float lr into a tensor while it compiles (a float guard would meet a
# tensor). It does so when the compile ends: the next call fails the lr guard once and traces a
# tensor lr, and from then on a scheduler's in-place update of the tensor recompiles nothing.
_TENSOR_LR_PENDING: weakref.WeakSet = weakref.WeakSet()


def _make_lrs_tensors() -> None:
    for opt in list(_TENSOR_LR_PENDING):
        for group in opt.param_groups:
            if not isinstance(group["lr"], Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
        _TENSOR_LR_PENDING.discard(opt)


@torch.compiler.disable  # runs inside Dynamo's callback lock: Dynamo must not trace it
def on_compile_start(*_args) -> None:
    convert_stock_optimizers_holding_folded_state()


def convert_stock_optimizers_holding_folded_state() -> list[torch.optim.Optimizer]:
    converted = []
    for opt in live_optimizers():
        if isinstance(opt, FOAM) or not isinstance(opt, SUPPORTED):
            continue
        if any("foam_level" in st for st in opt.state.values()):
            levels = {p: st["foam_level"] for p, st in opt.state.items() if "foam_level" in st}
            convert(opt, levels=levels)  # group options come from the loaded param groups
            log.warning(
                "foam: %s held FOAM's folded state (a FOAM checkpoint loaded into a stock "
                "optimizer); converted it to FOAM before tracing.", type(opt).__name__,
            )
            converted.append(opt)
    return converted


def _install_compile_start_hook() -> None:
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:  # pragma: no cover - older torch: the unchanged-script rescue is off
        return
    if on_compile_start not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(on_compile_start)


def _convert_lrs_when_this_compile_ends() -> None:
    from torch._dynamo.callback import callback_handler

    @torch.compiler.disable
    def once(*_args):
        _make_lrs_tensors()
        if once in callback_handler.end_callbacks:
            callback_handler.end_callbacks.remove(once)

    callback_handler.register_end_callback(once)


_install_compile_start_hook()
