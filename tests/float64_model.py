"""An independent float64 model of ALGORITHM.md, for the tests.

Written from the text of ``/work/shared/ALGORITHM.md`` and nothing else: it imports nothing from
``foam_compile``. Where the package pads and reshapes, this model scatters with a block index
(``i // B``) and divides by per-block element counts, so a shared mistake is unlikely.

One reading choice, stated once: FOAM's ``scale`` (alpha) multiplies the step of folded
parameters only. ALGORITHM.md: "At level 0 ... the step is exactly torch.optim.AdamW
(alpha = 1)" and the paper's recipe applies alpha "on folded parameters"; level 0 (including
0-d and 1-d parameters, which never fold) therefore takes AdamW's step unscaled.

Tolerance helpers live here too, derived from the dtypes' machine epsilons, so no test carries a
magic number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

F64 = torch.float64

# Unit roundoff (half the machine epsilon) of each dtype a test runs in.
EPS32 = torch.finfo(torch.float32).eps
EPSBF16 = torch.finfo(torch.bfloat16).eps


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


# ----------------------------------------------------------------------------- folding
def model_level(shape, level: int) -> int:
    """ALGORITHM.md: 0-d and 1-d parameters use level 0."""
    return level if len(tuple(shape)) >= 2 else 0


def model_num_blocks(n: int, level: int) -> int:
    block = 2**level
    return (n + block - 1) // block


def model_folded_shape(shape, level: int) -> tuple[int, ...]:
    shape = tuple(shape)
    if level == 0 or not shape:
        return shape
    return (*shape[:-1], model_num_blocks(shape[-1], level))


def _block_index(n: int, level: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.long) // (2**level)


def model_fold(x: torch.Tensor, level: int) -> torch.Tensor:
    """Block means over the elements that exist (scatter-add by block index / element counts)."""
    x = x.to(F64)
    if level == 0:
        return x.clone()
    n = x.shape[-1]
    nb = model_num_blocks(n, level)
    idx = _block_index(n, level)
    sums = torch.zeros(*x.shape[:-1], nb, dtype=F64).index_add_(x.dim() - 1, idx, x)
    counts = torch.bincount(idx, minlength=nb).to(F64)
    return sums / counts


def model_unfold(y: torch.Tensor, level: int, n: int) -> torch.Tensor:
    """``out[..., i] = y[..., i // 2**level]`` by gather."""
    y = y.to(F64)
    if level == 0:
        return y.clone()
    return y.index_select(y.dim() - 1, _block_index(n, level))


# -------------------------------------------------------------------------------- step
@dataclass
class Hyper:
    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    amsgrad: bool = False
    maximize: bool = False
    decoupled_weight_decay: bool = True
    scale: float = 1.0
    res_scale: float = 1.0

    def foam_kwargs(self) -> dict:
        """Keyword arguments for ``foam_compile.FOAM`` (everything but ``level``)."""
        return dict(
            lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
            amsgrad=self.amsgrad, maximize=self.maximize,
            decoupled_weight_decay=self.decoupled_weight_decay, scale=self.scale,
            res_scale=self.res_scale,
        )

    def reference_kwargs(self) -> dict:
        """Keyword arguments for ``foam_compile.reference.reference_step`` (but ``level``)."""
        return dict(
            lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
            weight_decay=self.weight_decay, amsgrad=self.amsgrad, maximize=self.maximize,
            decoupled_weight_decay=self.decoupled_weight_decay, scale=self.scale,
            res_scale=self.res_scale,
        )


@dataclass
class ParamModel:
    """One parameter and its FOAM state, all float64."""

    p: torch.Tensor
    level: int
    t: int = 0
    m: torch.Tensor | None = None
    v: torch.Tensor | None = None
    vmax: torch.Tensor | None = None
    last_update: float = 0.0  # max |p_new - p_old| of the last step
    max_abs_p: float = field(default=0.0)

    @classmethod
    def create(cls, p: torch.Tensor, level: int) -> ParamModel:
        p64 = p.detach().to(F64).clone()
        lvl = model_level(p64.shape, level)
        shape = model_folded_shape(p64.shape, lvl)
        return cls(
            p=p64, level=lvl, m=torch.zeros(shape, dtype=F64), v=torch.zeros(shape, dtype=F64),
            vmax=torch.zeros(shape, dtype=F64), max_abs_p=float(p64.abs().max()) if p64.numel() else 0.0,
        )

    def step(self, grad: torch.Tensor, hp: Hyper, lr: float | None = None) -> None:
        lr = hp.lr if lr is None else float(lr)
        b1, b2 = hp.betas
        lvl = self.level
        n = self.p.shape[-1] if self.p.dim() else 1
        old = self.p.clone()

        g = grad.detach().to(F64)
        if hp.maximize:
            g = -g
        p = self.p
        if hp.decoupled_weight_decay:
            p = p * (1 - lr * hp.weight_decay)
        elif hp.weight_decay != 0:
            g = g + hp.weight_decay * self.p
        self.t += 1
        t = self.t

        gb = model_fold(g, lvl)
        qb = model_fold(g * g, lvl)
        r = g - model_unfold(gb, lvl, n)
        self.m = b1 * self.m + (1 - b1) * gb
        self.v = b2 * self.v + (1 - b2) * qb
        if hp.amsgrad:
            self.vmax = torch.maximum(self.vmax, self.v)
            v_use = self.vmax
        else:
            v_use = self.v
        rho = hp.res_scale
        big_m = model_unfold(self.m, lvl, n) + rho * r
        big_v = model_unfold(v_use, lvl, n) + rho**2 * r * r
        alpha = hp.scale if lvl > 0 else 1.0
        bc1 = 1 - b1**t
        bc2 = 1 - b2**t
        self.p = p - (lr * alpha / bc1) * big_m / (big_v.sqrt() / math.sqrt(bc2) + hp.eps)

        if self.p.numel():
            self.last_update = max(self.last_update, float((self.p - old).abs().max()))
            self.max_abs_p = max(self.max_abs_p, float(self.p.abs().max()))


# ------------------------------------------------------------------------ tolerances
def float_tolerance(
    model: ParamModel, steps: int, dtype: torch.dtype, math_dtype: torch.dtype = torch.float32
) -> float:
    """Absolute error allowed after ``steps`` steps of a ``dtype`` parameter, math in ``math_dtype``.

    Per step the parameter is rounded once to ``dtype`` (unit roundoff ``u`` of ``|p|``) and the
    ``math_dtype`` update carries a few roundings of its own size (``|p|`` and the largest
    update). Errors add up over the steps (decoupled decay multiplies an earlier error by <= 1,
    and the update itself depends on the gradients only). ``OPS`` bounds the float32 operations
    of one update chain (fold, moments, unfold, sqrt, divide, multiply, subtract), each one
    rounding once.
    """
    OPS = 16
    u_param = unit_roundoff(dtype)
    u_math = unit_roundoff(math_dtype)
    per_step = u_param * model.max_abs_p + OPS * u_math * (model.max_abs_p + model.last_update)
    return steps * per_step
