"""level='auto' through the backend: calibrate on real gradients, plan, fold, log the report."""

import logging

import torch
from torch import nn

import foam_compile
from foam_compile import FOAM


class TinyTransformer(nn.Module):
    def __init__(self, vocab=64, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=96, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, x):
        return self.lm_head(self.norm(self.block(self.embed(x))))


def test_auto_levels_through_the_backend(fresh_dynamo, caplog):
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # The planner is under test, not Inductor: aot_eager keeps the compile cheap on CI's 2 cores.
    inner = torch._dynamo.lookup_backend("aot_eager")
    backend = foam_compile.backend(level="auto", budget=0.6, calibration_steps=3, inner=inner)

    @torch.compile(backend=backend)
    def train_step(x):
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 64, (8, 1), generator=g)
    data = (base + torch.arange(12)) % 64  # a learnable pattern: next token = token + 1
    with caplog.at_level(logging.INFO, logger="foam_compile"):
        losses = [train_step(data).item() for _ in range(10)]

    assert isinstance(opt, FOAM)
    plan = opt.foam_plan
    reports = [r for r in caplog.records if "level='auto' plan" in r.getMessage()]
    assert len(reports) == 1 and plan.report() in reports[0].getMessage()
    assert losses[-1] < losses[0]
    levels = {n: opt.state[p]["foam_level"] for n, p in model.named_parameters()}
    assert levels["embed.weight"] == 0 and levels["lm_head.weight"] == 0
    assert any(lv > 0 for lv in levels.values())
    for name, level in plan.levels.items():
        assert levels[name] == level
    state_bytes = sum(
        st[k].nbytes for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq") if k in st
    )
    assert state_bytes == plan.state_bytes
    assert plan.state_bytes <= 0.6 * plan.adamw_state_bytes
