"""``set_levels``: refolding the state to another level."""

from __future__ import annotations

import pytest
import torch
from float64_model import (
    Hyper,
    ParamModel,
    assert_param_matches,
    assert_state_matches,
    assert_within,
    model_fold,
    model_folded_shape,
    model_unfold,
)

from foam_compile import FOAM

from .common import (
    OPTIONS,
    _fold_tolerance,
    generator,
    param,
    randn,
    run,
)


# --------------------------------------------------------------- (10) set_levels refolds
def _full_moments(shape, gen):
    """Full-size positive 'moments' whose folds at each level set the expected state."""
    return {k: randn(shape, gen).abs() + 0.1 for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}


@pytest.mark.parametrize("old, new", [(0, 2), (1, 3), (2, 2), (2, 5), (0, 8), (3, 8)])
@pytest.mark.parametrize("shape", [(3, 37), (2, 2, 13)], ids=str)
def test_set_levels_deeper_keeps_block_means(shape, old, new):
    """Refolding ``fold(X, old)`` to a deeper level gives ``fold(X, new)``: the new blocks are
    unions of old ones and each old block mean is weighted by how many elements it holds."""
    gen = generator("deeper", shape, old, new)
    p = param(shape, gen)
    opt = FOAM([p], level=old, amsgrad=True)
    p.grad = randn(shape, gen)
    opt.step()
    full = _full_moments(shape, gen)
    for k, x in full.items():
        opt.state[p][k] = model_fold(x, old).float()
    step_before = float(opt.state[p]["step"])
    opt.set_levels({p: new})
    st = opt.state[p]
    assert st["foam_level"] == new and float(st["step"]) == step_before
    for k, x in full.items():
        assert st[k].dtype == torch.float32 and st[k].is_contiguous()
        assert_within(st[k], model_fold(x, new), 2 * _fold_tolerance(x, new), k)


@pytest.mark.parametrize("old, new", [(3, 1), (2, 0), (8, 2), (5, 4)])
def test_set_levels_shallower_spreads_block_means(old, new):
    shape = (3, 37)
    gen = generator("shallower", old, new)
    p = param(shape, gen)
    opt = FOAM([p], level=old, amsgrad=True)
    p.grad = randn(shape, gen)
    opt.step()
    before = {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    opt.set_levels({p: new})
    for k, y in before.items():
        expected = model_fold(model_unfold(y, old, shape[-1]), new)
        assert tuple(opt.state[p][k].shape) == model_folded_shape(shape, new)
        assert_within(opt.state[p][k], expected, _fold_tolerance(y, new), k)


@pytest.mark.parametrize("old, new", [(2, 4), (4, 1)])
def test_set_levels_then_steps_match_model(old, new):
    hp = OPTIONS["everything"]
    gen = generator("set-levels-step", old, new)
    ps = [param((4, 37), gen), param((9,), gen)]
    opt = FOAM(ps, level=old, **hp.foam_kwargs())
    run(opt, ps, [ParamModel.create(p, old) for p in ps], hp, 2, gen)
    opt.set_levels({ps[0]: new, ps[1]: new})
    assert opt.state[ps[1]]["foam_level"] == 0  # 1-d stays unfolded
    models = []
    for p in ps:
        st = opt.state[p]
        m = ParamModel.create(p, new)
        m.load_state(st["exp_avg"], st["exp_avg_sq"], st["max_exp_avg_sq"], step=st["step"])
        models.append(m)
    run(opt, ps, models, hp, 3, gen)
    for p, m in zip(ps, models):
        assert opt.state[p]["exp_avg"].shape == model_folded_shape(p.shape, m.level)
        assert_param_matches(p, m)
        assert_state_matches(opt.state[p], m, amsgrad=True)


def test_set_levels_before_first_step_creates_state_at_that_level():
    gen = generator("set-levels-fresh")
    p = param((3, 37), gen)
    hp = Hyper()
    opt = FOAM([p], level=2, **hp.foam_kwargs())
    opt.set_levels({p: 4})
    assert not opt.state.get(p)  # state comes with the first gradient, at the level set (issue 14)
    model = ParamModel.create(p, 4)
    run(opt, [p], [model], hp, 2, gen)
    assert opt.state[p]["foam_level"] == 4
    assert opt.state[p]["exp_avg"].shape == (3, 3)
    assert_param_matches(p, model)
