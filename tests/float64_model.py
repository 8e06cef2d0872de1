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
from dataclasses import dataclass, replace

import torch

F64 = torch.float64


def unit_roundoff(dtype: torch.dtype) -> float:
    """Largest relative error of one round-to-nearest in ``dtype`` (half its machine epsilon)."""
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
            lr=self.lr,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
            amsgrad=self.amsgrad,
            maximize=self.maximize,
            decoupled_weight_decay=self.decoupled_weight_decay,
            scale=self.scale,
            res_scale=self.res_scale,
        )

    def reference_kwargs(self) -> dict:
        """The package's names for these (everything but ``level``): keyword arguments of
        ``reference_step``, of the Triton launchers and of ``foam_compile.hyper.Hyper``."""
        return dict(
            lr=self.lr,
            beta1=self.betas[0],
            beta2=self.betas[1],
            eps=self.eps,
            weight_decay=self.weight_decay,
            amsgrad=self.amsgrad,
            maximize=self.maximize,
            decoupled_weight_decay=self.decoupled_weight_decay,
            scale=self.scale,
            res_scale=self.res_scale,
        )


def model_grad(p: torch.Tensor, grad: torch.Tensor, hp: Hyper) -> torch.Tensor:
    """The gradient the moments see: negated for maximize, plus Adam's coupled decay."""
    g = grad.detach().to(F64)
    if hp.maximize:
        g = -g
    if not hp.decoupled_weight_decay and hp.weight_decay != 0:
        g = g + hp.weight_decay * p.to(F64)
    return g


def model_step(p, grad, m, v, vmax, t: int, level: int, hp: Hyper):
    """One step of ALGORITHM.md in float64: ``(p, m, v, vmax)`` after step ``t`` (1-based).

    ``level`` is the requested level (0-d and 1-d parameters run at 0); ``m``, ``v`` and ``vmax``
    have the folded shape; ``vmax`` comes back unchanged without amsgrad. Inputs are not modified.
    """
    b1, b2 = hp.betas
    p = p.detach().to(F64)
    lvl = model_level(p.shape, level)
    n = p.shape[-1] if p.dim() else 1
    g = model_grad(p, grad, hp)
    if hp.decoupled_weight_decay:
        p = p * (1 - hp.lr * hp.weight_decay)

    gb = model_fold(g, lvl)
    qb = model_fold(g * g, lvl)
    r = g - model_unfold(gb, lvl, n)
    m = b1 * m.to(F64) + (1 - b1) * gb
    v = b2 * v.to(F64) + (1 - b2) * qb
    if hp.amsgrad:
        vmax = torch.maximum(vmax.to(F64), v)
        v_use = vmax
    else:
        v_use = v
    rho = hp.res_scale
    big_m = model_unfold(m, lvl, n) + rho * r
    big_v = model_unfold(v_use, lvl, n) + rho**2 * r * r
    alpha = hp.scale if lvl > 0 else 1.0
    bc1 = 1 - b1**t
    bc2 = 1 - b2**t
    p = p - (hp.lr * alpha / bc1) * big_m / (big_v.sqrt() / math.sqrt(bc2) + hp.eps)
    return p, m, v, vmax


def model_update_size(p, grad, m, v_use, t: int, level: int, hp: Hyper) -> torch.Tensor:
    """Per element, the size the update's roundings are relative to: ``step_size * (|M's
    terms|) / denominator``, i.e. ``|m| + rho * |r|`` where ``M = m + rho * r`` (the two can
    cancel, leaving the update itself far smaller than what its operations round against).
    ``m``/``v_use`` are the new folded moments (``v_use``: ``vmax`` with amsgrad)."""
    p = p.detach().to(F64)
    lvl = model_level(p.shape, level)
    n = p.shape[-1] if p.dim() else 1
    g = model_grad(p, grad, hp)
    r = g - model_unfold(model_fold(g, lvl), lvl, n)
    rho = hp.res_scale
    terms = model_unfold(m.to(F64).abs(), lvl, n) + abs(rho) * r.abs()
    big_v = model_unfold(v_use.to(F64), lvl, n) + rho**2 * r * r
    alpha = hp.scale if lvl > 0 else 1.0
    b1, b2 = hp.betas
    step_size = hp.lr * alpha / (1 - b1**t)
    return step_size * terms / (big_v.sqrt() / math.sqrt(1 - b2**t) + hp.eps)


@dataclass
class ParamModel:
    """One parameter and its FOAM state, all float64, plus error bookkeeping for tolerances.

    The bookkeeping (not part of the algorithm) is what the tolerance helpers below need:
    ``abs_p_sum`` = sum over steps of ``max(|p_old|, |p_new|)`` per element, ``update_sum`` = sum
    over steps of the largest ``|p_new - p_old|`` or update size (:func:`model_update_size`),
    ``bc_sum`` = the same times the bias corrections' condition, ``m_scale`` / ``v_scale`` = sums
    over steps of the sizes each moment update rounds against, per block:
    ``|m| + (1 - b1) * fold(|g|)`` and ``v + (1 - b2) * fold(g**2)`` (g after maximize and
    coupled decay).
    """

    p: torch.Tensor
    level: int
    m: torch.Tensor
    v: torch.Tensor
    vmax: torch.Tensor
    t: int = 0
    abs_p_sum: torch.Tensor | None = None
    update_sum: float = 0.0
    bc_sum: float = 0.0
    m_scale: torch.Tensor | float = 0.0
    v_scale: torch.Tensor | float = 0.0

    @classmethod
    def create(cls, p: torch.Tensor, level: int) -> ParamModel:
        p64 = p.detach().to(F64).clone()
        lvl = model_level(p64.shape, level)
        shape = model_folded_shape(p64.shape, lvl)
        zeros = lambda: torch.zeros(shape, dtype=F64)  # noqa: E731
        return cls(
            p=p64, level=lvl, m=zeros(), v=zeros(), vmax=zeros(), abs_p_sum=torch.zeros_like(p64)
        )

    def load_state(self, exp_avg, exp_avg_sq, max_exp_avg_sq=None, step=0) -> None:
        """Start from given (folded) moments, e.g. an optimizer's after a checkpoint load."""
        self.m = exp_avg.detach().to(F64).clone()
        self.v = exp_avg_sq.detach().to(F64).clone()
        if max_exp_avg_sq is not None:
            self.vmax = max_exp_avg_sq.detach().to(F64).clone()
        self.t = int(step)

    def resync(self, p: torch.Tensor) -> None:
        """Take the optimizer's parameter as the model's and reset the error bookkeeping."""
        self.p = p.detach().to(F64).clone()
        self.abs_p_sum = torch.zeros_like(self.p)
        self.update_sum = 0.0
        self.bc_sum = 0.0

    def step(self, grad: torch.Tensor, hp: Hyper, lr: float | None = None) -> None:
        hp = hp if lr is None else replace(hp, lr=float(lr))
        b1, b2 = hp.betas
        old = self.p
        g = model_grad(self.p, grad, hp)
        self.t += 1
        self.p, self.m, self.v, vmax = model_step(
            self.p, grad, self.m, self.v, self.vmax, self.t, self.level, hp
        )
        if hp.amsgrad:
            self.vmax = vmax

        self.abs_p_sum = self.abs_p_sum + torch.maximum(old.abs(), self.p.abs())
        v_use = self.vmax if hp.amsgrad else self.v
        size = max(
            _amax(self.p - old),
            _amax(model_update_size(old, grad, self.m, v_use, self.t, self.level, hp)),
        )
        self.update_sum += size
        b1t, b2t = b1**self.t, b2**self.t
        self.bc_sum += size * (b1t / (1 - b1t) + 0.5 * b2t / (1 - b2t))
        self.m_scale = self.m_scale + self.m.abs() + (1 - b1) * model_fold(g.abs(), self.level)
        self.v_scale = self.v_scale + self.v + (1 - b2) * model_fold(g * g, self.level)


def _amax(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


# ------------------------------------------------------------------------ tolerances
# ``OPS`` bounds the roundings of one step's chain relative to the size it is measured against:
# block sums (pairwise, <= log2(256) = 8 levels at level 8), the mean's divide, the moment
# updates, unfold, residual, sqrt, bias corrections, divide, multiply.
OPS = 16


def param_tolerance(
    model: ParamModel, dtype: torch.dtype, math_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-element error allowed for a ``dtype`` parameter updated with ``math_dtype`` math.

    Each step rounds ``p`` three times in ``math_dtype`` (the decay factor, the decayed product,
    the difference) and once when stored as ``dtype``; the update carries at most ``OPS``
    roundings of the largest update. Errors add up over steps: decoupled decay multiplies an
    earlier error by at most 1 and the update depends on the gradients only.
    """
    u_store = unit_roundoff(dtype) if dtype != math_dtype else 0.0
    u_math = unit_roundoff(math_dtype)
    tol = (u_store + 3 * u_math) * model.abs_p_sum + OPS * u_math * model.update_sum
    if math_dtype == F64:
        # float64 math takes 1 - beta**t from a float64 pow, whose last-bit error the
        # subtraction amplifies by beta**t / (1 - beta**t) (~500 / t for beta2 = 0.999); float32
        # math rounds corrections computed in float64, which this does not reach.
        tol = tol + u_math * model.bc_sum
    return tol


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol, what: str) -> None:
    __tracebackhide__ = True
    err = (actual.detach().to(F64) - expected).abs()
    tol = torch.as_tensor(tol, dtype=F64).expand_as(err)
    bad = err > tol
    if bad.any():
        i = int((err - tol).flatten().argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements outside tolerance; worst: "
            f"|err| {err.flatten()[i]:.3e} > tol {tol.flatten()[i]:.3e} "
            f"(got {actual.detach().to(F64).flatten()[i]:.9g}, "
            f"expected {expected.flatten()[i]:.9g})"
        )


def assert_param_matches(p, model, math_dtype=torch.float32, what="parameter") -> None:
    __tracebackhide__ = True
    assert_within(p, model.p, param_tolerance(model, p.dtype, math_dtype), what)


def assert_state_matches(
    state: dict, model: ParamModel, amsgrad: bool, math_dtype: torch.dtype = torch.float32
) -> None:
    """Folded shapes, and moments within ``OPS`` roundings per step of what they are built from."""
    __tracebackhide__ = True
    u = unit_roundoff(math_dtype)
    assert tuple(state["exp_avg"].shape) == tuple(model.m.shape)
    assert tuple(state["exp_avg_sq"].shape) == tuple(model.v.shape)
    assert_within(state["exp_avg"], model.m, OPS * u * model.m_scale, "exp_avg")
    assert_within(state["exp_avg_sq"], model.v, OPS * u * model.v_scale, "exp_avg_sq")
    if amsgrad:
        assert tuple(state["max_exp_avg_sq"].shape) == tuple(model.vmax.shape)
        assert_within(
            state["max_exp_avg_sq"], model.vmax, OPS * u * model.v_scale, "max_exp_avg_sq"
        )
    assert float(state["step"]) == model.t
