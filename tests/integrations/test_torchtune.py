"""FOAM from a torchtune recipe config: ``optimizer: _component_: ...`` built by torchtune's own
``config.instantiate``, as one optimizer or one per parameter (``optimizer_in_bwd``, with
``register_optim_in_bwd_hooks`` and the ``OptimizerInBackwardWrapper`` that checkpoints them).

The loop is the one of ``recipes/full_finetune_single_device.py`` (forward, loss, backward,
step, zero_grad, scheduler step) on a tiny ``llama3`` from torchtune's builders; the checkpoint
holds what that recipe saves (model, optimizer or wrapper state, step) and the resumed run
rebuilds the optimizer and the scheduler (``last_epoch=step - 1``) as the recipe does. The same
operations run in the same order, so resumed losses and weights must be bitwise equal.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from .common import check_levels, folded


def _import_torchtune():
    try:
        from omegaconf import OmegaConf
        from torchtune import config, training
        from torchtune.models.llama3 import llama3
    except ImportError as e:  # e.g. a torchao without torchao.dtypes.nf4tensor
        pytest.skip(
            f"needs the torchtune extra (pip install 'foam-compile[torchtune]'): {e}",
            allow_module_level=True,
        )
    return OmegaConf, config, training, llama3


OmegaConf, config, training, llama3 = _import_torchtune()

STEPS, SAVE = 4, 2
RECIPE = """
optimizer:
  _component_: {component}
  lr: 1e-2
  betas: [0.9, 0.95]
  weight_decay: 0.01
  level: 2
  scale: 0.25
lr_scheduler:
  _component_: torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup
  num_warmup_steps: 1
"""
POLICY = "foam_compile.integrations.PolicyFOAM"
PLAIN = "foam_compile.FOAM"


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return llama3(
        vocab_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=32,
        max_seq_len=32,
        intermediate_dim=64,
    )


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (4, 16), generator=g) for _ in range(STEPS)]


class Recipe:
    """What the single-device recipe sets up: the optimizer(s), the scheduler, the loop."""

    def __init__(self, component: str, in_bwd: bool, ckpt: dict | None = None):
        cfg = OmegaConf.create(RECIPE.format(component=component))
        self.model = make_model()
        self.in_bwd = in_bwd
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
        if in_bwd:
            self.optim_dict = {
                p: config.instantiate(cfg.optimizer, [p]) for p in self.model.parameters()
            }
            training.register_optim_in_bwd_hooks(model=self.model, optim_dict=self.optim_dict)
            self.wrapper = training.create_optim_in_bwd_wrapper(
                model=self.model, optim_dict=self.optim_dict
            )
            if ckpt is not None:
                self.wrapper.load_state_dict(ckpt["optimizer"])
            first = next(iter(self.wrapper.optim_map.values()))
        else:
            self.optimizer = config.instantiate(cfg.optimizer, self.model.parameters())
            if ckpt is not None:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            first = self.optimizer
        self.step = ckpt["step"] if ckpt is not None else 0
        self.lr_scheduler = config.instantiate(
            cfg.lr_scheduler, first, num_training_steps=STEPS, last_epoch=self.step - 1
        )
        if in_bwd:
            self.wrapper.set_lr_scheduler(self.lr_scheduler)

    def train(self, until: int) -> dict[int, float]:
        losses = {}
        for tokens in batches()[self.step : until]:
            logits = self.model(tokens)
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)
            )
            loss.backward()  # with optimizer_in_bwd each parameter stepped in its grad hook
            if not self.in_bwd:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.lr_scheduler.step()
            self.step += 1
            losses[self.step] = loss.item()
        return losses

    def checkpoint(self) -> dict:
        opt = self.wrapper if self.in_bwd else self.optimizer
        return {"model": self.model.state_dict(), "optimizer": opt.state_dict(), "step": self.step}

    def state_of(self, p):
        return (self.optim_dict[p] if self.in_bwd else self.optimizer).state[p]


def run_and_resume(component: str, in_bwd: bool, tmp_path):
    first = Recipe(component, in_bwd)
    losses = first.train(SAVE)
    torch.save(first.checkpoint(), tmp_path / "recipe_state.pt")
    losses.update(first.train(STEPS))
    resumed = Recipe(component, in_bwd, torch.load(tmp_path / "recipe_state.pt", weights_only=True))
    return first, losses, resumed, resumed.train(STEPS)


@pytest.mark.parametrize("in_bwd", [False, True], ids=["one_optimizer", "optimizer_in_bwd"])
@pytest.mark.parametrize("component", [POLICY, PLAIN])
def test_recipe_config_trains_folded_and_resumes_identically(component, in_bwd, tmp_path):
    first, losses, resumed, resumed_losses = run_and_resume(component, in_bwd, tmp_path)
    for recipe in (first, resumed):  # FOAM ran: the attention and MLP weights are folded
        for p in (recipe.model.layers[0].attn.q_proj.weight, recipe.model.layers[1].mlp.w2.weight):
            st = recipe.state_of(p)
            assert st["foam_level"] == 2 and st["exp_avg"].shape == folded(p.shape, 2)
            assert float(st["step"]) == STEPS
    if in_bwd:
        assert len(first.optim_dict) == len(list(first.model.parameters()))
    for step in range(SAVE + 1, STEPS + 1):
        assert resumed_losses[step] == losses[step], (step, losses, resumed_losses)
    for (name, a), b in zip(first.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("in_bwd", [False, True], ids=["one_optimizer", "optimizer_in_bwd"])
@pytest.mark.parametrize("component", [POLICY, PLAIN])
def test_recipe_config_keeps_embedding_head_and_norms_unfolded(component, in_bwd):
    recipe = Recipe(component, in_bwd)
    recipe.train(1)
    levels = check_levels(recipe.state_of, recipe.model.named_parameters())
    assert levels["tok_embeddings.weight"] == levels["output.weight"] == 0
    assert levels["layers.0.attn.output_proj.weight"] == 2  # a nested "output" folds
