"""Small shared builders for the compiled-path tests (no test logic here)."""

import torch
from torch import nn


def tiny_model(seed: int = 0) -> nn.Module:
    """Two linears; the first weight's last dim (10) is not a multiple of 4: a partial block."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 6))


def batches(n: int, seed: int = 1):
    """Inputs with learnable labels (a fixed random linear teacher), so a loss can fall."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(10, 6, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(16, 10, generator=g)
        out.append((x, (x @ teacher).argmax(-1)))
    return out


def loss_fn(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def set_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss_fn(model, x, y).backward()
