"""A param group's hyperparameters, checked once: the one object every update path reads.

``Hyper.from_group(group)`` is built where a param group is made (``FOAM``, ``add_param_group``,
``convert``, the backend's options) and again at each step from the group as it stands then, so
that a value changed by hand between steps is checked before any tensor is written. Under
``torch.compile`` the checks run at trace time only. Adding an option is adding a field here.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .master_weights import check_option as check_master_weights

__all__ = [
    "GROUP_DEFAULTS",
    "MAX_LEVEL",
    "OP_KWARGS",
    "OP_SCALARS",
    "OP_SCHEMA_TAIL",
    "Hyper",
    "check_level",
    "check_options",
    "op_hyper",
    "op_kwargs",
    "op_scalars",
    "op_signature",
]

#: The step ops' keyword-only arguments and their types, one table for every op's schema: ``lr``,
#: then the scalar hyperparameters (:data:`OP_SCALARS`). Each op takes, last of its positional
#: arguments, ``Tensor? lr_tensor``, the learning rate when it is a tensor (it then wins over
#: ``lr``: op schemas have no union type; torch.library refuses keyword-only tensors).
OP_KWARGS = {
    "lr": float,
    "beta1": float,
    "beta2": float,
    "eps": float,
    "weight_decay": float,
    "decoupled_weight_decay": bool,
    "amsgrad": bool,
    "maximize": bool,
    "scale": float,
    "res_scale": float,
}
OP_SCALARS = tuple(OP_KWARGS)[1:]
#: The end of a step op's schema string: ``lr_tensor`` and :data:`OP_KWARGS`.
OP_SCHEMA_TAIL = "Tensor? lr_tensor, *, " + ", ".join(
    f"{kind.__name__} {name}" for name, kind in OP_KWARGS.items()
)


def op_signature(impl):
    """``impl`` (``def impl(<annotated tensor arguments>, lr_tensor, **kwargs)``) with the
    signature from which torch.library infers its op's schema: its own parameters, then
    :data:`OP_KWARGS` as keyword-only parameters."""
    sig = inspect.signature(impl)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    kw = inspect.Parameter.KEYWORD_ONLY
    tail = [inspect.Parameter(name, kw, annotation=t) for name, t in OP_KWARGS.items()]
    impl.__signature__ = sig.replace(parameters=[*own, *tail])
    return impl


def op_scalars(source) -> dict:
    """``{name: value}`` for :data:`OP_SCALARS`, read from a :class:`Hyper` or from a mapping
    (an op's keyword arguments), so that no op restates the list."""
    if isinstance(source, Mapping):
        return {name: source[name] for name in OP_SCALARS}
    return {name: getattr(source, name) for name in OP_SCALARS}


def op_kwargs(hp: Hyper) -> dict:
    """A step op's ``lr_tensor`` and :data:`OP_KWARGS` for ``hp`` (its lr a number or a tensor),
    as keyword arguments."""
    lr_tensor = hp.lr if isinstance(hp.lr, Tensor) else None
    lr = 0.0 if lr_tensor is not None else float(hp.lr)
    return dict(lr_tensor=lr_tensor, lr=lr, **op_scalars(hp))


def op_hyper(lr_tensor: Tensor | None, kwargs: Mapping) -> dict:
    """A step op's ``lr_tensor`` and keyword arguments (:data:`OP_KWARGS`) as the launchers and
    :class:`Hyper` take them: one ``lr`` (the tensor when given, else the number) and
    :data:`OP_SCALARS`."""
    lr = kwargs["lr"] if lr_tensor is None else lr_tensor
    return dict(lr=lr, **op_scalars(kwargs))


# Keys FOAM adds to a param group, with the values a converted stock optimizer gets.
GROUP_DEFAULTS = {
    "level": 2,
    "scale": 1.0,
    "res_scale": 1.0,
    "master_weights": None,
    "state_format": "fp32",  # state.DEFAULT_FORMAT (state imports update, which imports us)
}
# Deeper levels than this are never useful (a block of 65536 elements) and likely a typo.
MAX_LEVEL = 16


def _number(where: str, name: str, value) -> float:
    """``value`` as a float: a Python number or a one-element tensor (any number of dims)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{where}: {name} as a tensor must have one element, got shape {list(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: {name} must be a number, got {value!r}")
    return float(value)


def _or_default(group: dict, key: str):
    """``group[key]``, or its default when missing or ``None`` (not given)."""
    value = group.get(key)
    return GROUP_DEFAULTS[key] if value is None else value


def check_level(level, where: str = "FOAM", *, auto: bool = True) -> int | str:
    """An int level in ``[0, MAX_LEVEL]`` (or ``'auto'`` where allowed); raises otherwise."""
    if auto and level == "auto":
        return level
    if isinstance(level, bool) or not isinstance(level, numbers.Integral):
        level_ok = False
    else:
        level_ok = 0 <= level <= MAX_LEVEL
    if not level_ok:
        also = " or 'auto'" if auto else ""
        raise ValueError(
            f"{where}: invalid level={level!r}; use an int in [0, {MAX_LEVEL}] (0 = plain "
            f"AdamW, 2 = blocks of 4){also}"
        )
    return int(level)


@dataclass(frozen=True)
class Hyper:
    """The hyperparameters of one param group (torch.optim.AdamW's, plus FOAM's).

    ``lr`` stays a tensor when the group holds one (a scheduler then updates it in place and a
    compiled step does not recompile); every other field is a Python scalar. ``scale`` (alpha)
    applies to folded parameters only; ``res_scale`` is rho (ALGORITHM.md). ``master_weights``
    (``None``, ``"int8"``, ``"int16"``) gives bfloat16/float16 parameters correction bits
    (:mod:`foam_compile.master_weights`). ``state_format`` is the group's state format (a name
    registered in :mod:`foam_compile.state`); a parameter's own format, which may differ
    (``state_formats=``, the stochastic-rounding default of :mod:`foam_compile.policy`), is in
    its layout and its state: the update reads that one.
    """

    lr: float | Tensor
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    decoupled_weight_decay: bool = True
    amsgrad: bool = False
    maximize: bool = False
    level: int | str = GROUP_DEFAULTS["level"]
    scale: float = GROUP_DEFAULTS["scale"]
    res_scale: float = GROUP_DEFAULTS["res_scale"]
    master_weights: str | None = GROUP_DEFAULTS["master_weights"]
    state_format: str = GROUP_DEFAULTS["state_format"]

    def __post_init__(self) -> None:
        _check(self.as_dict(), "FOAM")

    @classmethod
    def from_group(
        cls, group: dict, where: str = "FOAM", *, decoupled_weight_decay: bool = True
    ) -> Hyper:
        """Read and check a param group of FOAM or of a stock ``Adam``/``AdamW``.

        Keys a stock group lacks take FOAM's defaults; ``decoupled_weight_decay`` is the
        default of the optimizer class the group belongs to (True for AdamW, False for Adam).
        """
        betas = group.get("betas", (0.9, 0.999))
        if len(betas) != 2:
            raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.numel() == 1 and not torch.compiler.is_compiling():
            if lr.device.type == "cpu" and lr.item() < 0:  # device values are not read per step
                raise ValueError(f"{where}: invalid lr={lr.item()}; use lr >= 0")
        values = dict(
            lr=lr,
            beta1=_number(where, "betas[0]", betas[0]),
            beta2=_number(where, "betas[1]", betas[1]),
            eps=_number(where, "eps", group.get("eps", 1e-8)),
            weight_decay=_number(where, "weight_decay", group.get("weight_decay", 0.0)),
            decoupled_weight_decay=bool(
                group.get("decoupled_weight_decay", decoupled_weight_decay)
            ),
            amsgrad=bool(group.get("amsgrad", False)),
            maximize=bool(group.get("maximize", False)),
            level=group.get("level", GROUP_DEFAULTS["level"]),
            scale=_number(where, "scale", group.get("scale", GROUP_DEFAULTS["scale"])),
            res_scale=_number(
                where, "res_scale", group.get("res_scale", GROUP_DEFAULTS["res_scale"])
            ),
            master_weights=group.get("master_weights", GROUP_DEFAULTS["master_weights"]),
            state_format=_or_default(group, "state_format"),
        )
        _check(values, where)  # with the caller's name in the message; __init__ re-checks
        return cls(**values)

    def as_dict(self) -> dict:
        """Field name -> value (``lr`` as it is, tensor or float)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def step_scale(self, level: int) -> float:
        """alpha for a parameter at ``level``: FOAM at level 0 is AdamW exactly (ALGORITHM.md)."""
        return self.scale if level > 0 else 1.0


def _check(values: dict, where: str) -> None:
    """Raise a ``ValueError`` naming the first bad field of ``values`` and its valid range."""

    def at_least_zero(name: str, use: str) -> None:
        value = _number(where, name, values[name])
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{where}: invalid {name}={value!r}; use {use}")

    lr = values["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(
                f"{where}: lr as a tensor must have one element, got shape {list(lr.shape)}"
            )
    else:
        at_least_zero("lr", "lr >= 0")
    for i, name in enumerate(("beta1", "beta2")):
        beta = _number(where, f"betas[{i}]", values[name])
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{where}: invalid betas[{i}]={beta}; each beta must be in [0, 1)")
    at_least_zero("eps", "eps >= 0")
    at_least_zero("weight_decay", "weight_decay >= 0")
    at_least_zero("res_scale", "a finite number >= 0")
    scale = _number(where, "scale", values["scale"])
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"{where}: invalid scale={scale!r}; use a finite number > 0 (it multiplies the step "
            "of folded parameters; 1.0 is the default, the paper uses 0.25)"
        )
    check_level(values["level"], where)
    check_master_weights(values["master_weights"], where)
    from .state import get_format  # not at the top: state -> update -> hyper

    get_format(values["state_format"], where)


def check_options(where: str, **options) -> None:
    """Check FOAM options given on their own (``convert(...)``, ``backend(...)``): any field of
    :class:`Hyper` by name; ``None`` means not given."""
    given = {k: v for k, v in options.items() if v is not None}
    unknown = set(given) - {f.name for f in fields(Hyper)}
    if unknown:
        raise TypeError(f"{where}: unknown option(s) {sorted(unknown)}")
    defaults = {f.name: f.default for f in fields(Hyper) if f.name != "lr"}
    _check({**defaults, "lr": 0.0, **given}, where)
