"""``PolicyFOAM``: FOAM that keeps embeddings, the output head and norms at level 0 when it is
given bare tensors, as trainers give them.

Trainers build optimizers from tensors without names: the HF Trainer's decay/no-decay groups,
torchtune's ``config.instantiate(cfg.optimizer, model.parameters())`` (and one optimizer per
parameter with ``optimizer_in_bwd``), torchtitan's ``optimizer_cls(model.parameters())``.
``foam_compile.FOAM`` folds every 2-d tensor of a group at the group's level, embeddings and the
head included. ``PolicyFOAM`` applies the policy of ``foam_compile.convert`` and the ``"foam"``
backend instead (``foam_compile/policy.py``): names come from ``model`` or else from the live
module that owns the tensors.

Levels are chosen when a parameter first needs state, not in ``__init__``: accelerate's FSDP2
path builds the optimizer and then swaps its parameters for sharded DTensors
(``fsdp2_switch_optimizer_parameters``), so state keyed by the first tensors would be orphaned.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ..discovery import root_modules
from ..hyper import GROUP_DEFAULTS
from ..optimizer import FOAM
from ..policy import KEEP_UNFOLDED, choose_levels

__all__ = ["PolicyFOAM"]

# parameter -> weakref to the root module that owns it. torchtune's optimizer_in_bwd builds one
# optimizer per parameter; without this cache each would scan the heap for its owner
# (0.3 s per scan with torchtune imported, measured on the CI machine).
_ROOT_OF: WeakIdKeyDictionary = WeakIdKeyDictionary()
_NO_MODULE = nn.Module()  # names nothing: a tensor no module owns folds at its group's level


class PolicyFOAM(FOAM):
    """:class:`foam_compile.FOAM` with the default folding policy for parameters given as tensors.

    Takes every argument of ``FOAM`` plus ``model`` (where names come from; by default the live
    module that owns the parameters), ``levels`` (``{name or tensor: level}`` overrides) and
    ``keep_unfolded`` (name patterns kept at level 0; the paper's embeddings, head and norms).
    A parameter's level is fixed when it first gets state and is saved with the checkpoint.
    """

    def __init__(
        self,
        params,
        *args,
        model: nn.Module | None = None,
        levels: Mapping[str | Tensor, int] | None = None,
        keep_unfolded: Iterable[str] | None = KEEP_UNFOLDED,
        **foam_options,
    ):
        # ``args``: FOAM's positional ones (lr, betas, eps, weight_decay), with its defaults.
        super().__init__(params, *args, **foam_options)
        self.foam_policy = dict(model=model, levels=levels, keep_unfolded=keep_unfolded)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._foam_policy_pending = True

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._foam_policy_pending = True  # parameters the checkpoint has no state for

    @torch.no_grad()
    def step(self, closure=None):
        # Before the closure: Lightning passes one that runs forward and backward, so on the first
        # step no parameter has a gradient yet. Parameters without one get state here too. A
        # flag, not a scan, after that: a compiled step guards on it and does not break.
        if getattr(self, "_foam_policy_pending", True):
            self._apply_policy()
        return super().step(closure)

    @torch.compiler.disable  # Python bookkeeping, once per new parameter
    def _apply_policy(self) -> None:
        pending: dict[Tensor, int] = {}
        for group in self.param_groups:
            level = group.get("level", GROUP_DEFAULTS["level"])
            if level == "auto":  # FOAM's own calibration decides these
                continue
            for p in group["params"]:
                if not self.state.get(p):
                    pending[p] = level
        self._foam_policy_pending = False
        if not pending:
            return
        policy = getattr(self, "foam_policy", {})  # absent after pickling, which drops attributes
        chosen = policy_levels(
            list(pending),
            pending.__getitem__,
            model=policy.get("model"),
            levels=policy.get("levels"),
            keep_unfolded=policy.get("keep_unfolded", KEEP_UNFOLDED),
        )
        self.set_levels({p: chosen[id(p)] for p in pending})


def policy_levels(
    params: list[Tensor],
    level_of,
    *,
    model: nn.Module | None = None,
    levels: Mapping[str | Tensor, int] | None = None,
    keep_unfolded: Iterable[str] | None = KEEP_UNFOLDED,
) -> dict[int, int]:
    """``id(p) -> level`` by ``choose_levels``, with each parameter's owning root module as the
    model when none is given (found once per root, then cached)."""
    options = dict(levels=levels, keep_unfolded=keep_unfolded)
    if model is not None:
        return choose_levels(params, level_of, model=model, **options)
    roots = _roots_of(params)
    by_root: dict[int, tuple[nn.Module, list[Tensor]]] = {}
    for p in params:
        root = roots[id(p)]
        by_root.setdefault(id(root), (root, []))[1].append(p)
    chosen: dict[int, int] = {}
    for root, group in by_root.values():
        chosen.update(choose_levels(group, level_of, model=root, **options))
    return chosen


def _roots_of(params: list[Tensor]) -> dict[int, nn.Module]:
    """``id(p) -> root module``: from the cache, else one heap scan for all the misses."""

    def cached(p):
        ref = _ROOT_OF.get(p)
        return ref() if ref is not None else None

    missing = [p for p in params if cached(p) is None]
    if missing:
        for root in root_modules({id(p) for p in missing}, unwrap=True):
            ref = weakref.ref(root)
            for q in root.parameters():
                _ROOT_OF[q] = ref
    roots = {id(p): cached(p) for p in params}
    return {k: _NO_MODULE if root is None else root for k, root in roots.items()}
