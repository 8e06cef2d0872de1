"""Which parameters fold, and how deep: the paper's recipe as the default policy.

FOAM folds the 2-d weights of attention and MLP blocks and keeps plain Adam (level 0) for
embeddings, the output head, norms and every 0-d/1-d parameter (docs/algorithm.md, "Which
parameters fold"). One policy serves every way parameters enter FOAM (``FOAM(...)``,
``add_param_group``, ``convert``, the ``"foam"`` backend). It needs names:

- named parameters (``FOAM(model.named_parameters())``, torch's ``param_names``) give them;
- else ``model=`` gives them (and which modules are embeddings);
- else the live root module that owns each tensor does (``discovery.owner_roots``; the names
  read as in the user's model, through torch.compile/DDP/FSDP wrappers).

A tensor that no live module owns has no name: only the shape rule applies to it (0-d/1-d at
level 0), so every 2-d+ such tensor folds at its group's level.

State formats follow the same route: ``state_formats={name or tensor: format}`` pins a
parameter's format; otherwise it takes its group's ``state_format``, except that embeddings and
the output head take the format's stochastic-rounding variant (``"int8"`` -> ``"int8-sr"``).
Issue 12 asks for unbiased rounding "on by default for embeddings and the output head": a
token's embedding row gets a gradient only when the token occurs, so its moments decay over many
steps without one; round-to-nearest can then hold a moment still (the step's change is under half
a code) where stochastic rounding keeps its expectation (tests/formats: staleness).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from torch import Tensor, nn

from .discovery import embedding_params, parameter_names
from .reference import effective_level
from .state import FORMATS

__all__ = [
    "KEEP_UNFOLDED",
    "STOCHASTIC_ROUNDING",
    "choose_levels",
    "overrides",
    "stochastic_variant",
]

# Name patterns kept at level 0 by default (matched with re.search on the qualified name).
# A top-level ``output``/``head`` is an output projection (Meta LLaMA, ViT); a nested one (BERT's
# ``attention.output.dense``) is an ordinary weight that folds.
KEEP_UNFOLDED = (r"embed", r"\bwte\b", r"\bwpe\b", r"lm_head", r"^head\.", r"^output\.", r"norm")
# Names of embeddings and output heads (KEEP_UNFOLDED but norms): with a quantized state format
# they round stochastically.
STOCHASTIC_ROUNDING = (r"embed", r"\bwte\b", r"\bwpe\b", r"lm_head", r"^head\.", r"^output\.")


def stochastic_variant(name: str) -> str:
    """The stochastic-rounding variant of state format ``name`` (``"int8"`` -> ``"int8-sr"``),
    or ``name`` itself when it has none (``"fp32"``, or already stochastic)."""
    return f"{name}-sr" if f"{name}-sr" in FORMATS else name


def nearest_variant(name: str) -> str:
    """The round-to-nearest format of ``name`` (``"int8-sr"`` -> ``"int8"``): the same bytes
    and layout, which is what the cost model prices."""
    return name[: -len("-sr")] if name.endswith("-sr") and name[: -len("-sr")] in FORMATS else name


def overrides(
    params: Iterable[Tensor],
    *,
    names: Mapping[int, str] | None = None,
    model: nn.Module | None = None,
    levels: Mapping[str | Tensor, int] | None = None,
    keep_unfolded: Iterable[str] | None = KEEP_UNFOLDED,
    explicit: set[int] | None = None,
    formats: Mapping[str | Tensor, str] | None = None,
    chosen_formats: dict[int, str] | None = None,
    stochastic: set[int] | None = None,
) -> dict[int, int | None]:
    """``id(param) -> level`` the policy pins it to, or ``None``: it follows its group's level.

    Explicit ``levels`` (by tensor or name) come first, then the policy: embeddings and names
    matching ``keep_unfolded`` are pinned to level 0. ``names`` (``id -> name``) are used as
    given; without them names come from ``model`` or the owning modules, looked up only for the
    2-d+ tensors whose choices they can change. ``explicit``, if given, collects the ids pinned
    by ``levels``; ``chosen_formats`` the ``id -> format`` pinned by ``formats`` (by tensor or
    name); ``stochastic`` the ids of embeddings and output heads (names matching
    :data:`STOCHASTIC_ROUNDING`), which round stochastically in a quantized format.
    """
    params = list(params)
    by_tensor = {id(k): v for k, v in (levels or {}).items() if isinstance(k, Tensor)}
    by_name = {k: v for k, v in (levels or {}).items() if isinstance(k, str)}
    fmt_tensor = {id(k): v for k, v in (formats or {}).items() if isinstance(k, Tensor)}
    fmt_name = {k: v for k, v in (formats or {}).items() if isinstance(k, str)}
    patterns = [re.compile(p) for p in (keep_unfolded or ())]
    sr_patterns = [re.compile(p) for p in STOCHASTIC_ROUNDING] if stochastic is not None else []
    wants_names = bool(patterns or by_name or fmt_name or sr_patterns)
    unknown = [  # the tensors whose choices a name can change
        p
        for p in params
        if fmt_name or (p.dim() >= 2 and (id(p) not in by_tensor or stochastic is not None))
    ]
    names = dict(names or {})
    embeddings: set[int] = set()
    lookup = [p for p in unknown if id(p) not in names]
    if lookup:
        if wants_names:
            names.update(parameter_names(lookup, model))
        embeddings = embedding_params(lookup, model)
    chosen: dict[int, int | None] = {}
    for p in params:
        name = names.get(id(p), "")
        parts = name.split("|")
        fmt = fmt_tensor.get(id(p)) or next((fmt_name[n] for n in parts if n in fmt_name), None)
        if fmt is not None and chosen_formats is not None:
            chosen_formats[id(p)] = fmt
        if stochastic is not None and p.dim() >= 2:
            if id(p) in embeddings or any(r.search(name) for r in sr_patterns):
                stochastic.add(id(p))
        level = by_tensor.get(id(p))
        if level is None:
            level = next((by_name[n] for n in parts if n in by_name), None)
        if level is not None:
            chosen[id(p)] = int(level)
            if explicit is not None:
                explicit.add(id(p))
        elif id(p) in embeddings or any(r.search(name) for r in patterns):
            chosen[id(p)] = 0
        else:
            chosen[id(p)] = None
    return chosen


def choose_levels(
    params: Iterable[Tensor],
    level: int | Callable[[Tensor], int],
    *,
    model: nn.Module | None = None,
    levels: Mapping[str | Tensor, int] | None = None,
    keep_unfolded: Iterable[str] | None = KEEP_UNFOLDED,
    names: Mapping[int, str] | None = None,
) -> dict[int, int]:
    """``id(param) -> level``: :func:`overrides`, and ``level`` (an int, or a function of the
    parameter) for the parameters the policy leaves to their group."""
    level_of = level if callable(level) else (lambda _p: level)
    params = list(params)
    pinned = overrides(params, names=names, model=model, levels=levels, keep_unfolded=keep_unfolded)
    return {
        id(p): effective_level(p.shape, level_of(p) if pinned[id(p)] is None else pinned[id(p)])
        for p in params
    }
