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
scheduler does not recompile; the schedulers then still report float lrs:
:mod:`foam_compile.tensor_lr`).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Iterable

import torch
from torch import fx

from . import compile_hooks
from .convert import convert, stock_name
from .discovery import optimizers_owning
from .families import family_of, supported_names
from .hyper import check_options
from .optimizer import FOAM, check_autotune, check_levels, check_state_formats
from .passes.fold_adam_states import fold_adam_states, graph_tensors, updates_params

__all__ = ["backend", "foam_backend", "FoamBackend"]

log = logging.getLogger("foam_compile")
_warned: set[tuple[int, str]] = set()
# The options the backend hands to ``convert`` (its own ``tensor_lr`` default differs).
_CONVERT_OPTIONS = {
    name
    for name, param in inspect.signature(convert).parameters.items()
    if param.kind is inspect.Parameter.KEYWORD_ONLY and name != "tensor_lr"
}


def _warn_once(opt: torch.optim.Optimizer, kind: str, message: str) -> None:
    if (id(opt), kind) not in _warned:
        _warned.add((id(opt), kind))
        warnings.warn(message, stacklevel=3)


class FoamBackend:
    """A configured ``"foam"`` backend; see :func:`backend` for the options."""

    def __init__(
        self,
        *,
        tensor_lr: bool = True,
        optimizers: Iterable[torch.optim.Optimizer] | None = None,
        inner=None,
        **convert_options,
    ):
        # ``convert_options``: every option of ``convert`` but ``tensor_lr``, checked here, when
        # the backend is built, rather than at the first compile.
        where = "foam_compile.backend"
        unknown = set(convert_options) - _CONVERT_OPTIONS
        if unknown:
            raise TypeError(
                f"{where}: unknown option(s) {sorted(unknown)}; the options are "
                f"{sorted(_CONVERT_OPTIONS | {'tensor_lr', 'optimizers', 'inner'})}"
            )
        names = ("level", "scale", "res_scale", "master_weights", "state_format")
        given = {k: convert_options.get(k) for k in names}
        check_options(where, **given)
        if "levels" in convert_options:
            convert_options["levels"] = check_levels(convert_options["levels"], where)
        if "state_formats" in convert_options:
            convert_options["state_formats"] = check_state_formats(
                convert_options["state_formats"], where
            )
        check_autotune(
            where,
            auto=given["level"] == "auto",
            budget=convert_options.get("budget"),
            max_error=convert_options.get("max_error"),
            calibration_steps=convert_options.get("calibration_steps", 8),
            formats=convert_options.get("formats"),
        )
        self.convert_options = convert_options
        self.tensor_lr = tensor_lr
        self.optimizers = list(optimizers) if optimizers is not None else None
        self.inner = inner

    def __call__(self, gm: fx.GraphModule, example_inputs):
        compile_hooks.install()  # torch._dynamo.reset() clears the callbacks
        tensors = list(graph_tensors(gm, example_inputs).values())
        if self.optimizers is not None:
            ids = {id(t) for t in tensors}
            found = [
                o
                for o in self.optimizers
                if any(id(p) in ids for g in o.param_groups for p in g["params"])
            ]
        else:
            found = optimizers_owning(tensors)
        self._check(found, gm, example_inputs)
        rewritten = fold_adam_states(gm, example_inputs, found, **self.convert_options)
        if rewritten and self.tensor_lr:
            compile_hooks.make_lrs_tensors_after_this_compile(rewritten)
        for opt in rewritten:
            log.info("foam: converted %s to FOAM\n%s", stock_name(opt), _explain(opt))
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

    def _check(self, found: list[torch.optim.Optimizer], gm, example_inputs) -> None:
        """Say once, per optimizer, when FOAM cannot take over its step."""
        for opt in found:
            if isinstance(opt, FOAM):
                continue
            name = type(opt).__name__
            known = family_of(opt) is not None
            if known and any(g.get("fused") for g in opt.param_groups):
                _warn_once(
                    opt,
                    "fused",
                    f"backend='foam': torch.optim.{name}(fused=True) is never traced by "
                    "torch.compile, so its step still runs plain Adam. Fix: call "
                    "foam_compile.convert(optimizer) once after creating it.",
                )
            elif not known and (opt.state or updates_params(gm, example_inputs, opt)):
                # A stateless step (plain SGD) shows up as in-place updates of its parameters.
                _warn_once(
                    opt,
                    "unknown",
                    f"backend='foam': no FOAM rewrite for {name} (only {supported_names()}); "
                    "its step is compiled unchanged by Inductor.",
                )
            elif known:
                _remind_if_stepped_eagerly(opt)


def _remind_if_stepped_eagerly(opt: torch.optim.Optimizer) -> None:
    """Its parameters are in a 'foam' graph but its step may run outside: warn if it does."""
    if getattr(opt, "_foam_eager_hook", None) is not None:
        return

    def hook(optimizer, args, kwargs):
        if torch.compiler.is_compiling() or isinstance(optimizer, FOAM):
            return
        _warn_once(
            optimizer,
            "eager",
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
    the rewritten graph, Inductor by default); ``state_format`` (``"fp32"``, ``"int8"``,
    ``"int4"``, ``"int8-sr"``, ``"int4-sr"``) and ``state_formats`` (per name or tensor) store
    the moments quantized; ``master_weights`` (``"int8"``/``"int16"``) gives bf16/fp16
    parameters correction bits (see :class:`foam_compile.FOAM`); ``level="auto"`` with
    ``budget`` and/or ``max_error`` (and ``calibration_steps``) picks each parameter's level
    from the first real gradients (see :class:`foam_compile.FOAM`).

        step = torch.compile(step, backend=foam_compile.backend(level=2, scale=0.25))
    """
    return FoamBackend(**options)


def foam_backend(gm: fx.GraphModule, example_inputs):
    """The ``"foam"`` backend with default options (the entry point's target)."""
    return FoamBackend()(gm, example_inputs)


compile_hooks.install()
