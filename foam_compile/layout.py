"""Per-parameter layout choices: how a parameter's state is laid out once it is created.

FOAM creates a parameter's state on its first real gradient, as torch.optim does; a frozen
parameter never gets any. How that state will be laid out is chosen earlier, when the parameter
enters the optimizer (the folding policy, ``levels=``, ``set_levels``, the ``level='auto'``
plan), and must survive until then. The choice is kept in the parameter's param group:

    group["foam_layout"] = {index in group["params"]: {"level": 0}, ...}

- an entry ``{"level": l}`` pins the parameter's fold level (the policy keeps an embedding at
  0, ``levels=`` or the ``level='auto'`` plan chose one); a parameter without an entry runs at
  its group's ``level``. More keys are more choices of the same kind: ``"format"``, its state
  format (``state_formats=``, the ``level='auto'`` plan; default: the group's
  ``state_format``), and ``"stochastic": True``, the policy's mark on embeddings and the
  output head: with a quantized group format they take its stochastic-rounding variant
  (``"int8"`` -> ``"int8-sr"``, :func:`foam_compile.policy.stochastic_variant`). The mark is a
  bool, not a string: ``torch.testing.assert_close`` compares state dicts with bools, not
  strings, and a default (fp32) run should keep its state dicts comparable.
- only choices are stored, so the saved layout does not depend on when the policy ran (torch's
  contract: equal optimizers have equal state dicts).

Positions, not tensors, key the choices, as in torch's own ``state_dict``. So they survive
``state_dict``/``load_state_dict`` (param groups are saved as they are), deepcopy and pickle
(``Optimizer.__getstate__`` keeps the param groups), and the parameter swap of accelerate's
FSDP2 path, which replaces the tensors of ``group["params"]`` in place.
"""

from __future__ import annotations

from torch import Tensor

from .hyper import GROUP_DEFAULTS, check_level
from .policy import stochastic_variant
from .reference import effective_level

__all__ = ["CHOICES", "LAYOUT_KEY", "choice", "format_for", "level_for", "record"]

LAYOUT_KEY = "foam_layout"
#: The choices an entry may hold.
CHOICES = ("level", "format", "stochastic")


def entries(group: dict) -> dict[int, dict]:
    """The group's layout entries (created empty if missing)."""
    return group.setdefault(LAYOUT_KEY, {})


def choice(group: dict, index: int) -> dict:
    """The choices recorded for parameter ``index`` of ``group`` (empty: none)."""
    return (group.get(LAYOUT_KEY) or {}).get(index) or {}


def record(group: dict, index: int, **choices) -> None:
    """Record choices for parameter ``index``; ``None`` drops one (``level=None``: the group's)."""
    unknown = set(choices) - set(CHOICES)
    if unknown:
        raise TypeError(f"foam_layout: unknown choice(s) {sorted(unknown)}; use {CHOICES}")
    entry = dict(choice(group, index))
    for key, value in choices.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = check_level(value, "foam_layout", auto=False) if key == "level" else value
    if entry:
        entries(group)[index] = entry
    else:
        entries(group).pop(index, None)


def group_level(group: dict) -> int:
    """The level a group's unpinned parameters run at now (``'auto'``: 0 until planned)."""
    level = group.get("level", GROUP_DEFAULTS["level"])
    return 0 if level == "auto" else int(level)


def level_for(group: dict, index: int, p: Tensor) -> int:
    """The level parameter ``index`` of ``group`` runs at: its pinned level or its group's,
    as :func:`~foam_compile.reference.effective_level` of its shape."""
    level = choice(group, index).get("level")
    return effective_level(p.shape, group_level(group) if level is None else level)


def format_for(group: dict, index: int, default: str) -> str:
    """The state format parameter ``index`` of ``group`` is (to be) stored in: its own format
    if one was chosen, else its group's (the stochastic variant where the policy asks for it)."""
    entry = choice(group, index)
    if entry.get("format"):
        return entry["format"]
    name = group.get("state_format") or default
    return stochastic_variant(name) if entry.get("stochastic") else name
