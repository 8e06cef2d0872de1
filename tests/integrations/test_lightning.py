"""FOAM in Lightning: ``configure_optimizers`` returns FOAM (``PolicyFOAM`` or a converted
AdamW) with a scheduler dict; ``Trainer.fit`` runs 3 steps on CPU and a run resumed with
``ckpt_path`` from the checkpoint after step 2 takes the same step 3.

One batch per epoch (``reload_dataloaders_every_n_epochs=1``), chosen by the global step: a
resumed run sees the batch the uninterrupted run saw at that step, whatever epoch Lightning
counts after a restore (it re-enters the epoch an end-of-epoch checkpoint was written in). The
resumed step runs the same operations in the same order, so its loss and the weights are bitwise
equal.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "lightning", reason="needs the lightning extra: pip install 'foam-compile[lightning]'"
)

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

import foam_compile  # noqa: E402
from foam_compile.integrations import PolicyFOAM  # noqa: E402

from .common import check_levels  # noqa: E402
from .tiny_lm import batches, lm_loss, make_model  # noqa: E402

STEPS = 3
OPTIONS = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def policy_foam(module):
    # model=: names as in the model ("output.weight"), not under the LightningModule's attribute
    return PolicyFOAM(module.parameters(), model=module.model, level=2, scale=0.5, **OPTIONS)


def converted_adamw(module):
    return foam_compile.convert(
        torch.optim.AdamW(module.parameters(), **OPTIONS), level=2, scale=0.5, model=module.model
    )


class LitLM(L.LightningModule):
    def __init__(self, make_optimizer):
        super().__init__()
        self.model = make_model()
        self.make_optimizer = make_optimizer
        self.losses: dict[int, float] = {}

    def training_step(self, tokens, batch_idx):
        loss = lm_loss(self.model(tokens), tokens)
        self.losses[self.global_step + 1] = loss.item()
        return loss

    def configure_optimizers(self):
        opt = self.make_optimizer(self)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            [batches(STEPS)[self.trainer.global_step]], batch_size=None
        )


def fit(module, root, ckpt_path=None, callbacks=()):
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        reload_dataloaders_every_n_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=list(callbacks),
        enable_checkpointing=bool(callbacks),
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("make_optimizer", [policy_foam, converted_adamw])
def test_fit_with_foam_and_resume_from_checkpoint(make_optimizer, tmp_path):
    first = LitLM(make_optimizer)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
    trainer = fit(first, tmp_path, callbacks=[saver])
    assert sorted(first.losses) == [1, 2, 3]
    opt = trainer.optimizers[0]
    assert isinstance(opt, foam_compile.FOAM)
    check_levels(opt.state.__getitem__, first.model.named_parameters())
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == STEPS  # stepped per step

    ckpt = tmp_path / "epoch=1-step=2.ckpt"
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    levels = [st["foam_level"] for st in saved["state"].values()]
    assert 2 in levels and 0 in levels

    resumed = LitLM(make_optimizer)
    trainer = fit(resumed, tmp_path / "resumed", ckpt_path=ckpt)
    assert sorted(resumed.losses) == [3]
    assert resumed.losses[3] == first.losses[3], (first.losses, resumed.losses)
    for (name, a), b in zip(first.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    check_levels(trainer.optimizers[0].state.__getitem__, resumed.model.named_parameters())
