"""Host-side checks of the FOAM launchers: every input is validated before anything is written.

This module imports nothing from the rest of foam_compile.
"""

from __future__ import annotations

import math
import operator
import struct
from collections.abc import Sequence

import torch
from torch import Tensor

from .tile import HP_FIELDS

# Weight-decay modes (a constexpr of the kernels, so the unused branch is compiled out).
WD_NONE, WD_DECOUPLED, WD_COUPLED = 0, 1, 2
# A tile holds at least one whole block; past B = 1024 a block no longer fits the register budget
# of one program comfortably. ALGORITHM.md's levels in use are 0..8.
MAX_LEVEL = 10
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def run_level(shape: Sequence[int], level: int) -> int:
    """ALGORITHM.md: 0-d and 1-d parameters never fold (they run at level 0)."""
    return level if len(shape) >= 2 else 0


def state_shape(shape: Sequence[int], level: int) -> tuple[int, ...]:
    """The folded state's shape ``[..., ceil(n / 2**level)]`` at the level ``shape`` runs at."""
    shape = tuple(shape)
    level = run_level(shape, level)
    if level == 0:
        return shape
    return (*shape[:-1], -(-shape[-1] // (1 << level)))


def split_f32(x: float) -> tuple[float, float]:
    """``x`` as float32 hi + lo, so a kernel can rebuild it in float64 from float32 arguments."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


_HP_ORDER = operator.itemgetter(*HP_FIELDS)
#: The launchers' scalar keyword arguments and their defaults (torch.optim.AdamW's betas and eps,
#: no weight decay, FOAM's alpha = rho = 1), in :class:`KernelHyper`'s order.
HYPER_DEFAULTS = {
    "beta1": 0.9,
    "beta2": 0.999,
    "eps": 1e-8,
    "weight_decay": 0.0,
    "decoupled_weight_decay": True,
    "amsgrad": False,
    "maximize": False,
    "scale": 1.0,
    "res_scale": 1.0,
}


class KernelHyper:
    """Checked hyperparameters and the scalar kernel arguments derived from them once."""

    def __init__(
        self,
        *,
        beta1,
        beta2,
        eps,
        weight_decay,
        decoupled_weight_decay,
        amsgrad,
        maximize,
        scale,
        res_scale,
        where,
    ):
        for name, value in (
            ("beta1", beta1),
            ("beta2", beta2),
            ("eps", eps),
            ("weight_decay", weight_decay),
            ("scale", scale),
            ("res_scale", res_scale),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}: {name} must be a Python number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{where}: {name} must be finite, got {value!r}")
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{where}: {name}={value!r} must be in [0, 1)")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.b1_hi, self.b1_lo = split_f32(self.beta1)
        self.b2_hi, self.b2_lo = split_f32(self.beta2)
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.scale, self.rho = float(scale), float(res_scale)
        self.amsgrad, self.maximize = bool(amsgrad), bool(maximize)
        if weight_decay == 0:
            self.wd_mode = WD_NONE
        else:
            self.wd_mode = WD_DECOUPLED if decoupled_weight_decay else WD_COUPLED

    def scalars(self, level: int, lr: float, bc1: float, sqrt_bc2: float) -> tuple:
        """The kernels' ``hp`` argument: a tuple in the order of :data:`.tile.HP_FIELDS`."""
        return _HP_ORDER(
            dict(
                lr=lr,
                bc1=bc1,
                sqrt_bc2=sqrt_bc2,
                b1_hi=self.b1_hi,
                b1_lo=self.b1_lo,
                b2_hi=self.b2_hi,
                b2_lo=self.b2_lo,
                one_minus_beta1=1.0 - self.beta1,
                one_minus_beta2=1.0 - self.beta2,
                eps=self.eps,
                weight_decay=self.weight_decay,
                # alpha scales folded parameters only: level 0 is AdamW exactly (ALGORITHM.md).
                scale=self.scale if level > 0 else 1.0,
                rho=self.rho,
            )
        )


def host_bias_corrections(t: float, beta1: float, beta2: float) -> tuple[float, float]:
    if not (t >= 1 and float(t).is_integer()):
        raise ValueError(f"step must be the new step count, a whole number >= 1; got {t!r}")
    return 1.0 - beta1**t, math.sqrt(1.0 - beta2**t)


def check_lr(lr, device: torch.device, where: str):
    """Return ``(lr_value, lr_tensor_or_None)``; a device tensor is read by the kernel."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}: lr as a tensor must have one element, got {list(lr.shape)}")
        if lr.device == device:
            return 0.0, lr
        if lr.device.type == "cpu":
            return float(lr), None
        raise ValueError(f"{where}: lr is on {lr.device}, the parameters on {device}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
        raise ValueError(f"{where}: lr must be a finite number or a 1-element tensor, got {lr!r}")
    return float(lr), None


def check_step(step, device: torch.device, where: str):
    """Return ``(step_value_or_None, step_tensor_or_None)``."""
    if isinstance(step, Tensor):
        if step.numel() != 1:
            raise ValueError(
                f"{where}: step as a tensor must have one element, got {list(step.shape)}"
            )
        if step.device == device:
            return None, step
        if step.device.type == "cpu":
            return float(step), None
        raise ValueError(f"{where}: step is on {step.device}, the parameters on {device}")
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        raise ValueError(f"{where}: step must be a number or a 1-element tensor, got {step!r}")
    return float(step), None


def check_level(level, where: str) -> int:
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"{where}: level={level!r} must be an int in [0, {MAX_LEVEL}]")
    return level


def check_param_grad(p, grad, where) -> None:
    """The parameter and its gradient: tensors of a supported dtype, the same shape."""
    if not isinstance(p, Tensor):
        raise ValueError(f"{where}: param must be a tensor, got {type(p).__name__}")
    if p.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{where}: param dtype {p.dtype} is not supported; use one of "
            f"{[str(d) for d in SUPPORTED_DTYPES]}"
        )
    if not isinstance(grad, Tensor) or grad.shape != p.shape:
        got = list(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
        raise ValueError(
            f"{where}: grad must be a tensor of the param's shape {list(p.shape)}, got {got}"
        )
    if grad.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{where}: grad dtype {grad.dtype} is not supported; use one of "
            f"{[str(d) for d in SUPPORTED_DTYPES]}"
        )


def check_tensors(p, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, level, amsgrad, where) -> int:
    """Validate one parameter's tensors; return the level it runs at."""
    check_param_grad(p, grad, where)
    level = run_level(p.shape, check_level(level, where))
    fshape = state_shape(p.shape, level)
    named = [("param", p), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)]
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError(f"{where}: amsgrad=True needs max_exp_avg_sq")
        named.append(("max_exp_avg_sq", max_exp_avg_sq))
    for name, x in named:
        if not isinstance(x, Tensor):
            raise ValueError(f"{where}: {name} must be a tensor, got {type(x).__name__}")
        if x.device != p.device:
            raise ValueError(f"{where}: {name} is on {x.device}, param on {p.device}")
        if not x.is_contiguous():
            raise ValueError(
                f"{where}: {name} must be contiguous (shape {list(x.shape)}, "
                f"strides {list(x.stride())}); call .contiguous() first"
            )
        if name in ("param", "grad"):
            continue
        if x.dtype != torch.float32:
            raise ValueError(f"{where}: {name} must be float32, got {x.dtype}")
        if tuple(x.shape) != fshape:
            raise ValueError(
                f"{where}: {name} has shape {list(x.shape)}; a param of shape "
                f"{list(p.shape)} at level {level} needs {list(fshape)}"
            )
    return level


def grouped_shapes(fshape: tuple[int, ...], bits: int, group: int) -> tuple[tuple, tuple]:
    """``(codes shape, scales shape)`` of a moment of folded shape ``fshape`` in a grouped format
    (``foam_compile/formats/grouped.py``'s layout, restated here)."""
    if not fshape:
        return (), ()
    *lead, n = fshape
    codes = n if bits == 8 else -(-n // 2)
    return (*lead, codes), (*lead, -(-n // group))


def check_quant_tensors(p, grad, moments, bits, level, where, group: int = 32) -> int:
    """Validate a parameter whose moments are grouped codes: ``moments`` is ``[(codes, scales)]``
    (``exp_avg``, ``exp_avg_sq``, then ``max_exp_avg_sq`` with amsgrad). Returns the run level."""
    if bits not in (4, 8):
        raise ValueError(f"{where}: bits must be 8 or 4, got {bits!r}")
    check_param_grad(p, grad, where)
    for name, x in (("param", p), ("grad", grad)):
        if x.device != p.device or not x.is_contiguous():
            raise ValueError(
                f"{where}: {name} must be a contiguous tensor on {p.device}; call "
                ".contiguous() first"
            )
    level = run_level(p.shape, check_level(level, where))
    codes_shape, scales_shape = grouped_shapes(state_shape(p.shape, level), bits, group)
    names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    for k, (codes, scales) in enumerate(moments):
        name = names[k]
        dtype = torch.int8 if bits == 8 and k == 0 else torch.uint8
        for label, x, want_dtype, want_shape in (
            (name, codes, dtype, codes_shape),
            (f"{name}_scale", scales, torch.float32, scales_shape),
        ):
            if not isinstance(x, Tensor):
                raise ValueError(f"{where}: {label} must be a tensor, got {type(x).__name__}")
            if x.device != p.device or not x.is_contiguous():
                raise ValueError(
                    f"{where}: {label} must be a contiguous tensor on {p.device} (got "
                    f"{x.device}, strides {list(x.stride())}); call .contiguous() first"
                )
            if x.dtype != want_dtype or tuple(x.shape) != tuple(want_shape):
                raise ValueError(
                    f"{where}: {label} is {x.dtype} {list(x.shape)}; a param of shape "
                    f"{list(p.shape)} at level {level} in {bits}-bit codes needs {want_dtype} "
                    f"{list(want_shape)}"
                )
    return level
