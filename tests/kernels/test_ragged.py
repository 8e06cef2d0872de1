"""Ragged tensors (last dim not a multiple of 2**level) through both kernels, against the float64
model of ALGORITHM.md (``tests/float64_model.py``).

The ragged path walks each row on its own: whole tiles of full blocks, then one masked tile
with the row's partial block, loaded through quad columns. The shapes here hit each piece: a
single row (the whole tensor is one partial block, or one full tile and a partial one), many
short rows, rows longer than a segment of the multi-tensor kernel (several programs per row),
a row whose length is below 4 (a quad that is mostly masked), bfloat16 and the other options.
Every case runs several steps from nonzero moments; guards around each tensor catch reads and
writes out of bounds (NaN gradients outside, sentinels after the outputs).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from foam_compile import kernels  # noqa: E402
from foam_compile.kernels import plans  # noqa: E402
from tests.float64_model import (  # noqa: E402
    Hyper,
    ParamModel,
    assert_param_matches,
    assert_state_matches,
    model_folded_shape,
    model_level,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SENTINEL = -777.0


def guarded(values: torch.Tensor, fill: float, guard: int = 5):
    """``values`` inside a buffer of ``fill`` (``guard`` elements each side; 5: misaligned)."""
    buf = torch.full((values.numel() + 2 * guard,), fill, dtype=values.dtype, device=DEVICE)
    view = buf[guard : guard + values.numel()].view(values.shape)
    view.copy_(values)
    return view, buf, guard


class Param:
    """A parameter, its folded moments (guarded by sentinels) and its float64 model."""

    def __init__(self, shape, level, dtype, gen):
        lvl = model_level(shape, level)
        fshape = model_folded_shape(shape, lvl)
        p0 = torch.randn(shape, generator=gen).to(dtype)
        m0 = 0.1 * torch.randn(fshape, generator=gen)
        v0 = 0.01 + 0.1 * torch.rand(fshape, generator=gen)
        self.level, self.dtype, self.gen = level, dtype, gen
        self.p, bp, _ = guarded(p0.to(DEVICE), SENTINEL)
        self.m, bm, _ = guarded(m0.to(DEVICE), SENTINEL)
        self.v, bv, _ = guarded(v0.to(DEVICE), SENTINEL)
        self.vmax, bx, _ = guarded(v0.clone().to(DEVICE), SENTINEL)
        self.bufs = [(bp, self.p), (bm, self.m), (bv, self.v), (bx, self.vmax)]
        self.model = ParamModel.create(p0, level)
        self.model.load_state(m0, v0, v0.clone())
        self.step = torch.tensor(0.0, device=DEVICE)

    def grad(self):
        g = torch.randn(self.p.shape, generator=self.gen).to(self.dtype)
        self.g, _, _ = guarded(g.to(DEVICE), float("nan"))
        return self.g

    def check(self, hp: Hyper):
        assert_param_matches(self.p.cpu(), self.model)
        state = dict(exp_avg=self.m.cpu(), exp_avg_sq=self.v.cpu(), step=self.model.t)
        state["max_exp_avg_sq"] = self.vmax.cpu()
        assert_state_matches(state, self.model, hp.amsgrad)
        for buf, x in self.bufs:
            assert (buf[:5] == SENTINEL).all() and (buf[5 + x.numel() :] == SENTINEL).all()


def run(shapes, hp: Hyper, *, grouped: bool, steps: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [Param(shape, level, dtype, gen) for shape, level, dtype in shapes]
    kw = {k: v for k, v in hp.reference_kwargs().items() if k != "lr"}
    for _ in range(steps):
        grads = [x.grad() for x in params]
        for x in params:
            x.step += 1
        if grouped:
            kernels.foam_adam_grouped_(
                [x.p for x in params],
                grads,
                [x.m for x in params],
                [x.v for x in params],
                [x.vmax for x in params],
                [x.step for x in params],
                [x.level for x in params],
                lr=hp.lr,
                **kw,
            )
        else:
            for x, g in zip(params, grads):
                kernels.foam_adam_step_(
                    x.p, g, x.m, x.v, x.vmax, lr=hp.lr, step=x.step, level=x.level, **kw
                )
        for x, g in zip(params, grads):
            x.model.step(g.cpu(), hp)
    for x in params:
        x.check(hp)


AMS = Hyper(amsgrad=True, scale=0.5, res_scale=0.8)


@pytest.mark.parametrize("grouped", [False, True], ids=["single", "grouped"])
@pytest.mark.parametrize(
    "shape, level",
    [
        ((1, 225), 8),  # one row, one partial block
        ((1, 1300), 8),  # one row: a full tile and a partial block
        ((3, 5461), 2),  # LLaMA-1B's down_proj row length
        ((7, 3), 2),  # rows shorter than a quad
        ((2, 3, 37), 3),  # 3-d
        ((5, 123), 1),  # B = 2: a quad is two blocks
        ((2, 16387), 2),  # a row longer than a multi-tensor segment (16384 elements)
    ],
    ids=str,
)
def test_ragged_matches_model(shape, level, grouped):
    run([(shape, level, torch.float32)], AMS, grouped=grouped)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_ragged_half_precision(dtype):
    run([((4, 5461), 2, dtype), ((3, 99), 5, dtype)], AMS, grouped=True, seed=1)


@pytest.mark.parametrize(
    "hp",
    [
        Hyper(maximize=True, decoupled_weight_decay=False, weight_decay=0.05),
        Hyper(weight_decay=0.0, res_scale=0.0),
        Hyper(betas=(0.5, 0.95), eps=1e-3, lr=3e-2, scale=0.25),
    ],
    ids=["maximize_coupled", "no_wd_rho0", "betas"],
)
def test_ragged_options(hp):
    run([((3, 5461), 2, torch.float32), ((4, 70), 4, torch.float32)], hp, grouped=True, seed=2)


def test_ragged_and_even_share_a_call():
    """One call, even and ragged tensors of one level: two launches, each with its own code."""
    shapes = [((4, 64), 2, torch.float32), ((4, 63), 2, torch.float32), ((6,), 2, torch.float32)]
    run(shapes, AMS, grouped=True, seed=3, steps=3)


def test_geometry_of_ragged_and_even_tensors():
    """Even tensors are one flat row; ragged ones keep their rows (so no tile crosses a row)."""
    assert plans.geometry((2048, 5461), 2) == (2048, 5461, 1366)
    assert plans.geometry((2048, 5460), 2) == (1, 2048 * 5460, 2048 * 1365)
    assert plans.geometry((3, 4, 10), 3) == (12, 10, 2)
    assert plans.geometry((3, 4, 10), 0) == (1, 120, 120)
    tables = plans.GroupTables([(2, 16387, 4097), (1, 4096, 1024)], 2, torch.device("cpu"))
    # 16387 elements at level 2: 4097 blocks a row, segments of 4096 blocks: 2 a row.
    assert tables.meta.tolist() == [[16387, 4097, 2, 2], [4096, 1024, 1, 1]]
    assert tables.chunks.tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]]
