"""A torchtitan-style decoder, small enough for a CPU test: ``tok_embeddings``, ``layers`` (a
ModuleDict of blocks with ``attention.wq/wk/wv/wo`` and ``feed_forward.w1/w2/w3``, RMSNorms),
``norm`` and the ``output`` head. ``w2``'s last dim (42) leaves a partial block of 2 at level 2;
its rows (and those of every weight) split evenly across 2 FSDP ranks."""

from __future__ import annotations

import torch
from torch import nn

VOCAB, DIM, HIDDEN, HEADS, LAYERS = 64, 32, 42, 4, 2


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm = nn.RMSNorm(DIM)
        self.attention = nn.ModuleDict(
            {k: nn.Linear(DIM, DIM, bias=False) for k in ("wq", "wk", "wv", "wo")}
        )
        self.ffn_norm = nn.RMSNorm(DIM)
        self.feed_forward = nn.ModuleDict(
            {
                "w1": nn.Linear(DIM, HIDDEN, bias=False),
                "w2": nn.Linear(HIDDEN, DIM, bias=False),
                "w3": nn.Linear(DIM, HIDDEN, bias=False),
            }
        )

    def forward(self, x):
        b, s, _ = x.shape
        h = self.attention_norm(x)
        q, k, v = (
            self.attention[w](h).view(b, s, HEADS, DIM // HEADS).transpose(1, 2)
            for w in ("wq", "wk", "wv")
        )
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attention["wo"](a.transpose(1, 2).reshape(b, s, DIM))
        h = self.ffn_norm(x)
        ff = self.feed_forward
        return x + ff["w2"](nn.functional.silu(ff["w1"](h)) * ff["w3"](h))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({str(i): Block() for i in range(LAYERS)})
        self.norm = nn.RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.output(self.norm(h))


def make_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def batches(n: int, batch: int = 4, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)
    )
