"""Which parameters fold, and how deep: the paper's recipe as the default policy.

FOAM folds the 2-d weights of attention and MLP blocks and keeps plain Adam (level 0) for
embeddings, the output head, norms and every 0-d/1-d parameter (ALGORITHM.md, "Which parameters
fold"). Names come from the model when given, else from the live modules that own the tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from torch import Tensor, nn

from .discovery import embedding_params, parameter_names
from .reference import effective_level

__all__ = ["KEEP_UNFOLDED", "choose_levels"]

# Name patterns kept at level 0 by default (matched with re.search on the qualified name).
# A top-level ``output``/``head`` is an output projection (Meta LLaMA, ViT); a nested one (BERT's
# ``attention.output.dense``) is an ordinary weight that folds.
KEEP_UNFOLDED = (r"embed", r"\bwte\b", r"\bwpe\b", r"lm_head", r"^head\.", r"^output\.", r"norm")


def choose_levels(
    params: Iterable[Tensor],
    level: int | Callable[[Tensor], int],
    *,
    model: nn.Module | None = None,
    levels: Mapping[str | Tensor, int] | None = None,
    keep_unfolded: Iterable[str] | None = KEEP_UNFOLDED,
) -> dict[int, int]:
    """``id(param) -> level``: explicit ``levels`` (by name or tensor) first, then the policy.

    ``level`` is the level of the parameters the policy folds, or a function of the parameter.
    """
    level_of = level if callable(level) else (lambda _p: level)
    params = list(params)
    names = parameter_names(params, model)
    embeddings = embedding_params(params, model)
    patterns = [re.compile(p) for p in (keep_unfolded or ())]
    by_tensor = {id(k): v for k, v in (levels or {}).items() if isinstance(k, Tensor)}
    by_name = {k: v for k, v in (levels or {}).items() if isinstance(k, str)}
    chosen = {}
    for p in params:
        name = names.get(id(p), "")
        explicit = by_tensor.get(id(p))
        if explicit is None:
            explicit = next((by_name[n] for n in name.split("|") if n in by_name), None)
        if explicit is not None:
            chosen[id(p)] = effective_level(p.shape, int(explicit))
        elif id(p) in embeddings or any(r.search(name) for r in patterns):
            chosen[id(p)] = 0
        else:
            chosen[id(p)] = effective_level(p.shape, level_of(p))
    return chosen
