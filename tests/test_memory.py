"""``foam_compile.memory_report`` against bytes counted by hand."""

from __future__ import annotations

import json

import torch
from torch import nn

from foam_compile import FOAM, memory_report, release_gradients

BF16 = torch.bfloat16
# Linear(10, 24) + Linear(24, 6): weights [24, 10], [24], [6, 24], [6]
N = 240 + 24 + 144 + 6  # 414 parameters


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.Linear(24, 6)).to(BF16)


def step_once(model, opt):
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


# FOAM at level 2, float32 moments (two each), a 4-byte step per tensor:
#   [24, 10] -> [24, 3]: 72 * 4 * 2 = 576;  [24]: 24 * 4 * 2 = 192
#   [6, 24]  -> [6, 6]:  36 * 4 * 2 = 288;  [6]:   6 * 4 * 2 = 48;  steps 4 * 4 = 16
FOAM_STATE = 576 + 192 + 288 + 48 + 16
ADAMW = {
    "weights": 2 * N,
    "master weights": 4 * N,  # a float32 copy of each bf16 weight
    "gradients": 2 * N,  # in the weights' dtype
    "optimizer state": 8 * N + 4 * 4,
}


def test_foam_with_int8_correction_by_hand():
    model = make_model()
    opt = FOAM(model.parameters(), level=2, master_weights="int8")
    step_once(model, opt)
    report = memory_report(model, opt)
    assert report.params == N
    assert report.bytes == {
        "weights": 2 * N,
        "master weights": N,  # one int8 per element
        "gradients": 2 * N,  # live bf16 gradients
        "optimizer state": FOAM_STATE,
    }
    assert report.adamw_bytes == ADAMW
    d = json.loads(json.dumps(report.as_dict()))
    assert d["total_bytes"] == 2 * N + N + 2 * N + FOAM_STATE
    assert d["rows"]["master weights"]["bytes_per_param"] == 1.0
    assert d["adamw_total_bytes_per_param"] == (16 * N + 16) / N
    text = str(report)
    for row in ("weights", "master weights", "gradients", "optimizer state", "total"):
        assert row in text
    assert "int8 correction bits" in text and "AdamW column" in text


def test_released_gradients_count_one_transient():
    model = make_model()
    release = release_gradients(model, lambda ps: FOAM(ps, level=2, master_weights="int8"))
    x = torch.randn(4, 10).to(BF16)
    model(x).float().sum().backward()
    report = memory_report(model, release)
    assert report.bytes["gradients"] == 0
    assert report.transient_gradient_bytes == 240 * 2  # the largest gradient, [24, 10] bf16
    assert report.bytes["master weights"] == N
    assert report.bytes["optimizer state"] == FOAM_STATE
    # without release, a missing gradient counts as one of the weight's dtype (the peak)
    opt = FOAM(model.parameters(), level=2)
    assert memory_report(model, opt).bytes["gradients"] == 2 * N


def test_adamw_with_float32_master_copies_matches_its_column():
    model = make_model()
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    opt = torch.optim.AdamW(masters)
    for m in masters:
        m.grad = torch.randn_like(m)
    opt.step()
    for m in masters:
        m.grad = None  # the mixed-precision loop copies bf16 gradients in and drops them
    report = memory_report(model, opt)
    assert report.bytes == ADAMW  # the AdamW column describes exactly this run
    assert "4 tensors stepped outside the model" in report.details["master weights"]


def test_tied_and_frozen_parameters():
    torch.manual_seed(0)
    emb = nn.Embedding(12, 8)
    head = nn.Linear(8, 12, bias=False)
    head.weight = emb.weight  # tied: one tensor
    norm = nn.LayerNorm(8)
    norm.requires_grad_(False)  # frozen: no gradient, no state
    model = nn.ModuleDict(dict(emb=emb, head=head, norm=norm))
    opt = FOAM([emb.weight], level=0)
    step_once(nn.ModuleList([emb]), opt)
    report = memory_report(model, opt)
    assert report.params == 96 + 16
    assert report.bytes["weights"] == 4 * (96 + 16)
    assert report.bytes["gradients"] == 4 * 96
    assert report.bytes["optimizer state"] == 2 * 4 * 96 + 4
    assert report.adamw_bytes["gradients"] == 4 * 96
    assert report.adamw_bytes["master weights"] == 0  # float32 weights are their own master
    assert report.adamw_bytes["optimizer state"] == 8 * 96 + 4


# int8 state (codes 1 B an element, a float32 scale per group of 32 along the stored last dim),
# two moments each, level 2:
#   [24, 10] -> [24, 3]: 2 * (72 + 24 * 4) = 336;  [24]: 2 * (24 + 1 * 4) = 56
#   [6, 24]  -> [6, 6]:  2 * (36 + 6 * 4) = 120;   [6]:  2 * (6 + 1 * 4) = 20;  steps 16
INT8_STATE = 336 + 56 + 120 + 20 + 16
# int4: two codes a byte, rounded up per stored row
#   [24, 3] -> 24 * 2 bytes; [24] -> 12; [6, 6] -> 6 * 3; [6] -> 3
INT4_STATE = 2 * (48 + 96) + 2 * (12 + 4) + 2 * (18 + 24) + 2 * (3 + 4) + 16


def test_quantized_state_with_correction_and_release_by_hand():
    for fmt, state_bytes in (("int8", INT8_STATE), ("int4", INT4_STATE)):
        model = make_model()
        release = release_gradients(
            model,
            lambda ps, fmt=fmt: FOAM(
                [{"params": ps, "state_format": fmt}], level=2, master_weights="int8"
            ),
        )
        model(torch.randn(4, 10).to(BF16)).float().sum().backward()
        report = memory_report(model, release)
        assert all(st["foam_format"] == fmt for st in release.optimizer.state.values())
        assert report.bytes == {
            "weights": 2 * N,
            "master weights": N,
            "gradients": 0,
            "optimizer state": state_bytes,
        }, fmt
        assert report.transient_gradient_bytes == 240 * 2
