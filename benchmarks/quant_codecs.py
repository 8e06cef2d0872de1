"""Which 8-bit / 4-bit recipe stores Adam's moments best? Measured on real and synthetic moments.

Candidates (each cited where it comes from; written here from the papers' descriptions):

* ``flash``: FlashOptim (Ortiz et al., arXiv 2602.23349, Sec. 3.2): groups of 32 with an fp16
  absmax scale; ``m`` through the softsign compander ``y = 2x/(1+|x|)`` (``x = m/absmax``) into
  signed codes ``round(127 y)``; ``v`` as ``u = sqrt(v)`` linear in unsigned codes
  ``round(255 u/absmax(u))``. 4-bit: the same with 7 / 15 levels.
* ``ao``: torchao ``torchao/optim`` / bitsandbytes (Dettmers et al., arXiv 2110.02861): blocks of
  256 (8-bit) or 128 (4-bit), fp32 absmax, the dynamic-tree code maps of bitsandbytes'
  ``create_dynamic_map`` (signed for ``m``, unsigned for ``v``), nearest code. torchao's 4-bit
  ``v`` map is linear without zero, ``(1..16)/16`` (Li et al., arXiv 2309.01507: a zero code for
  ``v`` blows up ``m/sqrt(v)``).
* ``qadam``: Q-Adam-mini: asymmetric uint codes per group of 256 (128 at 4-bit) with an fp32
  scale ``(max - min)/L`` and zero ``min``, for both moments.
* ``lin``: plain absmax-linear codes (no compander), the baseline the companders improve on.

Variants: ``/g32`` group of 32, ``/s32`` fp32 scales, ``/nz`` a positive ``v`` never gets the
zero code (it takes code 1: a smaller step instead of ``m/eps``), ``/sr`` stochastic rounding,
unbiased in the moment's own domain (the two neighbouring codes' decoded values bracket ``x``; the
upper one is taken with probability ``(x - lo)/(hi - lo)``).

Sources of moments:

* ``lm``: a byte-level LLaMA (``examples/train_llama.py``'s model, dim 128, 2 layers) trained
  ``--steps`` steps with AdamW on Shakespeare. Alongside the run, every candidate keeps its own
  *quantized* EMAs of a few of the model's weights (the embedding, one attention matrix, one MLP
  matrix, the head), fed the same gradients and re-encoded every step, at level 0 and folded at
  level 2, for beta2 = 0.95 and 0.999 (beta1 = 0.9). "accumulated" compares those with the
  float32 EMAs (what quantized storage does over a run, staleness included); "one-shot" encodes
  the final float32 moments once.
* ``lm x1e-3``: the same final moments with ``m`` scaled by 1e-3 and ``v`` by 1e-6 (the
  per-element gradient size of large models), one-shot: scale-invariant codecs must not change.
* ``synthetic``: ``m`` heavy-tailed (Student-t, 3 dof) times a per-element size spanning decades
  (log-normal, sigma 1.5), ``v`` = size^2 times a Gamma(20)/20 spread, one-shot.

Metrics (relative L2 errors over the sampled tensors, lower is better):

* ``m``: ``||m' - m|| / ||m||``; ``v``: ``||v' - v|| / ||v||``;
* ``dir``: the Adam direction ``d = (m/bc1) / (sqrt(v/bc2) + 1e-8)``: ``||d' - d|| / ||d||``;
* ``dir max``: ``max |d' - d|`` (``|d|`` is about 1; large values are blow-ups).

    python benchmarks/quant_codecs.py                   # prints the tables (about 10 min, 2 cores)
    python benchmarks/quant_codecs.py --steps 100 --out table.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from foam_compile.reference import fold  # noqa: E402
from foam_compile.state import get_format  # noqa: E402

GEN = torch.Generator().manual_seed(0)  # the stochastic roundings' randomness


# ------------------------------------------------------------------------------ code maps
def dynamic_map(signed: bool, exp_bits: int, total_bits: int) -> Tensor:
    """The dynamic-tree code map (Dettmers, arXiv 1511.04561 / 2110.02861), sorted.

    Written from the description: for each exponent ``e`` (decades ``10**-(E-1) .. 1``) a linear
    fraction grid of ``2**(i + ...)`` midpoints in ``[0.1, 1]``; plus 0 and 1.
    """
    data = []
    body = total_bits - 1
    extra = 2 ** (body - exp_bits) - 1
    for i in range(exp_bits):
        k = 2 ** (i + body - exp_bits) + (0 if signed else 2 ** (i + body - exp_bits))
        edges = torch.linspace(0.1, 1, k + 1, dtype=torch.float64)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (-(exp_bits - 1) + i)
        data += mids.tolist() + ((-mids).tolist() if signed else [])
    if extra > 0:
        edges = torch.linspace(0.1, 1, extra + 1, dtype=torch.float64)
        mids = (edges[:-1] + edges[1:]) / 2  # the last exponent's decade again
        data += mids.tolist() + ((-mids).tolist() if signed else [])
    data += [0.0, 1.0]
    assert len(data) == 2**total_bits, (len(data), signed, exp_bits, total_bits)
    return torch.tensor(sorted(data), dtype=torch.float32)


# ---------------------------------------------------------------------------------- codecs
def grouped(x: Tensor, group: int) -> tuple[Tensor, int]:
    """``[rows, n]`` -> ``[rows, ceil(n/G), G]`` (zero-padded), and n."""
    rows, n = x.shape
    ng = -(-n // group)
    return torch.nn.functional.pad(x, (0, ng * group - n)).view(rows, ng, group), n


def to_scale(s: Tensor, dtype: torch.dtype) -> Tensor:
    """The group scale as stored: rounded up to ``dtype`` so that ``|x| / scale <= 1``."""
    t = s.to(dtype)
    up = t.float() < s
    if up.any():
        t = torch.where(up, torch.nextafter(t, torch.full_like(t, math.inf)), t)
    return t.float()


@dataclass
class Codec:
    """One moment's recipe. ``kind``: ``'abs'`` (absmax scale, ``levels`` codes per side through
    ``compand``), ``'map'`` (nearest entry of ``qmap`` after absmax scaling), ``'asym'``
    (min/max)."""

    kind: str
    levels: int = 255
    group: int = 32
    scale_dtype: torch.dtype = torch.float32
    signed: bool = True
    compand: str = "none"  # 'softsign' | 'sqrt' | 'none'
    qmap: Tensor | None = None
    no_zero: bool = False  # positive values never decode to 0 (v)
    bits: int = 8
    scale_bytes: int = field(default=4)

    def bytes_per_element(self) -> float:
        per_group = self.scale_bytes * (2 if self.kind == "asym" else 1)
        return self.bits / 8 + per_group / self.group

    # -- forward transform to [-1, 1] (or [0, 1]) given the group's scale, and back
    def _fwd(self, x: Tensor) -> Tensor:
        if self.compand == "softsign":
            return 2 * x / (1 + x.abs())
        return x

    def _inv(self, y: Tensor) -> Tensor:
        if self.compand == "softsign":
            return y / (2 - y.abs())
        return y

    def roundtrip(self, x: Tensor, stochastic: bool = False) -> Tensor:
        """Encode then decode ``x`` (``[rows, n]`` float32) with this recipe."""
        xg, n = grouped(x.float(), self.group)
        rows = x.shape[0]
        if self.kind == "asym":
            out = self._asym(xg, n, stochastic)
        else:
            base = xg.sqrt() if self.compand == "sqrt" else xg
            s = to_scale(base.abs().amax(-1, keepdim=True), self.scale_dtype)
            safe = torch.where(s > 0, s, torch.ones_like(s))
            t = base / safe
            if self.kind == "map":
                grid = self.qmap.to(x.device)
                idx = torch.bucketize(t.contiguous(), (grid[1:] + grid[:-1]) / 2)
                zero = int((grid == 0).nonzero()[0]) if (grid == 0).any() else None
            else:  # codes -L..L (signed) or 0..L: idx = code + offset
                off = self.levels if self.signed else 0
                grid = self._inv(
                    torch.arange(-off, self.levels + 1, device=x.device).float() / self.levels
                )
                idx = torch.round(self._fwd(t) * self.levels).long() + off
                zero = off
            if self.no_zero and zero is not None:
                idx = torch.where((idx == zero) & (t > 0), idx + 1, idx)
            out = self._value(grid[idx], s)
            if stochastic:
                out = self._stochastic(xg, idx, grid, s, zero)
        return out.reshape(rows, -1)[:, :n]

    def _stochastic(self, x, idx, grid, s, zero):
        """Unbiased in the moment's domain: bracket x by neighbouring codes' values."""
        near = self._value(grid[idx], s)
        lo_idx = torch.where(near > x, idx - 1, idx).clamp(0, len(grid) - 2)
        lo, hi = self._value(grid[lo_idx], s), self._value(grid[lo_idx + 1], s)
        width = hi - lo
        p = torch.where(width > 0, (x - lo) / torch.where(width > 0, width, 1), 0).clamp(0, 1)
        pick = torch.where(torch.rand(p.shape, generator=GEN) < p, lo_idx + 1, lo_idx)
        if self.no_zero and zero is not None:
            pick = torch.where((pick == zero) & (x > 0), pick + 1, pick)
        return self._value(grid[pick], s)

    def _value(self, t: Tensor, s: Tensor) -> Tensor:
        """Moment value of a decoded ``t`` in a group of scale ``s``."""
        if self.compand == "sqrt":
            return (t * s) ** 2
        return t * s

    def _asym(self, xg, n, stochastic):
        # padding must not move min/max: pad with the group's first element
        rows, ng, g = xg.shape
        last = n - (ng - 1) * g
        if last < g:
            xg = xg.clone()
            xg[:, -1, last:] = xg[:, -1, :1]
        lo = xg.amin(-1, keepdim=True)
        step = (xg.amax(-1, keepdim=True) - lo) / self.levels
        safe = torch.where(step > 0, step, torch.ones_like(step))
        z = (xg - lo) / safe
        q = torch.floor(z + torch.rand(z.shape, generator=GEN)) if stochastic else torch.round(z)
        return lo + q.clamp(0, self.levels) * step


class PackageCodec:
    """One moment stored in a format of the package (``foam_compile.formats``), same interface.

    Stochastic rounding goes through the format's own ``write_`` (its hash-based random numbers,
    a new step each call), nearest through ``encode``.
    """

    def __init__(self, name: str, kind: str):
        self.fmt, self.kind = get_format(name), kind
        self.key = "exp_avg" if kind == "signed" else "exp_avg_sq"
        self.calls = 0

    def bytes_per_element(self) -> float:
        return float(self.fmt.moment_bytes(1, 1024, 4)) / 1024

    def roundtrip(self, x: Tensor, stochastic: bool = False) -> Tensor:
        p = torch.empty(x.shape, device="meta")
        st = {"foam_level": 0, **self.fmt.encode(x, p, self.key, self.kind)}
        if stochastic or self.fmt.stochastic:
            self.calls += 1
            st["step"] = torch.tensor(float(self.calls))
            self.fmt.write_(st, self.key, self.kind, x)
        return self.fmt.decode(st, self.key, self.kind, p)


@dataclass
class Recipe:
    name: str
    m: Codec
    v: Codec

    def bytes_per_element(self) -> float:
        return self.m.bytes_per_element() + self.v.bytes_per_element()


def flash(bits, group=32, scale=torch.float16, no_zero=False, v="sqrt") -> Recipe:
    lm, lv = 2 ** (bits - 1) - 1, 2**bits - 1
    sb = torch.empty((), dtype=scale).element_size()
    common = dict(kind="abs", group=group, scale_dtype=scale, bits=bits, scale_bytes=sb)
    m = Codec(levels=lm, signed=True, compand="softsign", **common)
    vc = Codec(levels=lv, signed=False, compand=v, no_zero=no_zero, **common)
    return Recipe("", m, vc)


def ao(bits, group=None, no_zero=False) -> Recipe:
    if bits == 8:
        group = group or 256
        m = Codec("map", group=group, qmap=dynamic_map(True, 7, 8))
        vmap = dynamic_map(False, 7, 8)
        v = Codec("map", group=group, qmap=vmap, signed=False, no_zero=no_zero)
    else:
        group = group or 128
        m = Codec("map", group=group, qmap=dynamic_map(True, 3, 4), bits=4)
        vmap = torch.linspace(0, 1, 17)[1:]
        v = Codec("map", group=group, qmap=vmap, signed=False, bits=4)
    return Recipe("", m, v)


def qadam(bits, group=None) -> Recipe:
    group = group or (256 if bits == 8 else 128)
    c = dict(kind="asym", levels=2**bits - 1, group=group, bits=bits)
    return Recipe("", Codec(**c), Codec(**c))


def lin(bits, group=32) -> Recipe:
    c = dict(kind="abs", group=group, bits=bits)
    return Recipe(
        "",
        Codec(levels=2 ** (bits - 1) - 1, signed=True, **c),
        Codec(levels=2**bits - 1, signed=False, **c),
    )


def package(name: str) -> Recipe:
    return Recipe("", PackageCodec(name, "signed"), PackageCodec(name, "square"))


def recipes() -> dict[str, tuple[Recipe, bool, bool]]:
    """name -> (recipe, stochastic m, stochastic v)."""
    table = {
        "flash8": (flash(8), False, False),
        "flash8/nz": (flash(8, no_zero=True), False, False),
        "flash8/bf16/nz": (flash(8, scale=torch.bfloat16, no_zero=True), False, False),
        "flash8/s32": (flash(8, scale=torch.float32), False, False),
        "flash8/s32/nz": (flash(8, scale=torch.float32, no_zero=True), False, False),
        "flash8/s32/nz/sr": (flash(8, scale=torch.float32, no_zero=True), True, True),
        "flash8/s32/nz/srv": (flash(8, scale=torch.float32, no_zero=True), False, True),
        "flash8/s32/nz/g64": (flash(8, group=64, scale=torch.float32, no_zero=True), False, False),
        "ao8": (ao(8), False, False),
        "ao8/g32": (ao(8, 32), False, False),
        "ao8/nz": (ao(8, no_zero=True), False, False),
        "ao8/sr": (ao(8), True, True),
        "qadam8": (qadam(8), False, False),
        "lin8/s32": (lin(8), False, False),
        "flash4": (flash(4), False, False),
        "flash4/s32/nz": (flash(4, scale=torch.float32, no_zero=True), False, False),
        "flash4/s32/nz/sr": (flash(4, scale=torch.float32, no_zero=True), True, True),
        "flash4/s32/nz/srv": (flash(4, scale=torch.float32, no_zero=True), False, True),
        "ao4": (ao(4), False, False),
        "ao4/g32": (ao(4, 32), False, False),
        "ao4/sr": (ao(4), True, True),
        "qadam4": (qadam(4), False, False),
        "package int8": (package("int8"), False, False),
        "package int8-sr": (package("int8-sr"), True, True),
        "package int4": (package("int4"), False, False),
        "package int4-sr": (package("int4-sr"), True, True),
    }
    for name, (r, _, _) in table.items():
        r.name = name
    return table


# -------------------------------------------------------------------------------- metrics
EPS = 1e-8


def direction(m: Tensor, v: Tensor, t: int, b1: float, b2: float) -> Tensor:
    return (m / (1 - b1**t)) / ((v.clamp_min(0) / (1 - b2**t)).sqrt() + EPS)


def rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def metrics(pairs, t: int, b1: float, b2: float) -> dict[str, float]:
    """``pairs``: [(m', v', m, v)] over the sampled tensors (flattened together)."""
    cat = [torch.cat([p[i].flatten() for p in pairs]) for i in range(4)]
    mq, vq, m, v = cat
    dq, d = direction(mq, vq, t, b1, b2), direction(m, v, t, b1, b2)
    return {
        "m": rel(mq, m),
        "v": rel(vq, v),
        "dir": rel(dq, d),
        "dir max": float((dq - d).abs().max()),
    }


# ------------------------------------------------------------------------------ lm source
SAMPLED = (
    "tok_embeddings.weight",
    "attention.wq.weight",
    "feed_forward.w2.weight",
    "output.weight",
)


def lm_run(steps: int, table, betas2=(0.95, 0.999), levels=(0, 2), b1=0.9, log=print):
    """Train the example LLaMA with AdamW; keep quantized shadow EMAs of the sampled weights."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    from train_llama import Llama, causal_lm_loss, load_corpus, random_batch

    torch.manual_seed(0)
    data, _ = load_corpus(None)
    model = Llama(256, 128, 2, 4, 128)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    named = dict(model.named_parameters())
    # first matching parameter for each sampled suffix (layer 0 attention, layer 1 MLP)
    picks = [next(n for n in named if n.endswith(s)) for s in SAMPLED[:2]]
    picks += [[n for n in named if n.endswith(SAMPLED[2])][-1], SAMPLED[3]]
    gen = torch.Generator().manual_seed(1)

    def rows(x):
        return x.reshape(-1, x.shape[-1])

    ref = {(lv, b2): {n: [0, 0] for n in picks} for lv in levels for b2 in betas2}
    shadow = {
        (name, lv, b2): {n: [None, None] for n in picks}
        for name in table
        for lv in levels
        for b2 in betas2
    }
    for step in range(1, steps + 1):
        x, y = random_batch(data, 16, 128, gen)
        loss = causal_lm_loss(model, x, y)
        loss.backward()
        with torch.no_grad():
            for n in picks:
                g = rows(named[n].grad.float())
                for lv in levels:
                    gb, qb = fold(g, lv), fold(g * g, lv)
                    for b2 in betas2:
                        r = ref[(lv, b2)][n]
                        r[0] = b1 * r[0] + (1 - b1) * gb
                        r[1] = b2 * r[1] + (1 - b2) * qb
                        for name, (recipe, sr_m, sr_v) in table.items():
                            s = shadow[(name, lv, b2)][n]
                            m0 = 0 if s[0] is None else s[0]
                            v0 = 0 if s[1] is None else s[1]
                            s[0] = recipe.m.roundtrip(b1 * m0 + (1 - b1) * gb, sr_m)
                            s[1] = recipe.v.roundtrip(b2 * v0 + (1 - b2) * qb, sr_v)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps:
            log(f"  step {step}: loss {loss.item():.3f}")
    return ref, shadow, picks


# ------------------------------------------------------------------------------- synthetic
def synthetic(rows=256, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = torch.exp(1.5 * torch.randn(rows, n, generator=g))
    size = size * torch.exp(torch.randn(rows, 1, generator=g))  # per-row level
    t3 = torch.distributions.StudentT(3.0).sample((rows, n))
    m = 0.3 * size * t3.clamp(-50, 50)
    gamma = torch.distributions.Gamma(20.0, 20.0).sample((rows, n))
    v = size**2 * gamma
    return m * 1e-3, v * 1e-6


# ----------------------------------------------------------------------------------- main
def table_rows(results, columns):
    head = ["recipe", "B/elem (m+v)", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, (bpe, vals) in results.items():
        cells = [name, f"{bpe:.3f}"] + [f"{x:.2e}" for x in vals]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the tables as Markdown here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = recipes()
    out = []

    def say(s=""):
        print(s, flush=True)
        out.append(s)

    say(
        f"quant_codecs.py --steps {args.steps}: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    ref, shadow, picks = lm_run(args.steps, table, log=print)
    t = args.steps
    for lv in (0, 2):
        for b2 in (0.95, 0.999):
            acc, once = {}, {}
            for name, (recipe, sr_m, sr_v) in table.items():
                pairs_acc, pairs_once = [], []
                for n in picks:
                    m, v = ref[(lv, b2)][n]
                    mq, vq = shadow[(name, lv, b2)][n]
                    pairs_acc.append((mq, vq, m, v))
                    once = (recipe.m.roundtrip(m, sr_m), recipe.v.roundtrip(v, sr_v))
                    pairs_once.append((*once, m, v))
                a, o = metrics(pairs_acc, t, 0.9, b2), metrics(pairs_once, t, 0.9, b2)
                acc[name] = (
                    recipe.bytes_per_element(),
                    [
                        o["m"],
                        o["v"],
                        o["dir"],
                        o["dir max"],
                        a["m"],
                        a["v"],
                        a["dir"],
                        a["dir max"],
                    ],
                )
            say(f"\n### lm, level {lv}, beta2 {b2}, after {t} steps ({', '.join(picks)})\n")
            say(
                table_rows(
                    acc,
                    [
                        "m once",
                        "v once",
                        "dir once",
                        "dir max once",
                        "m acc.",
                        "v acc.",
                        "dir acc.",
                        "dir max acc.",
                    ],
                )
            )
    # scale invariance and synthetic: one-shot
    for label, pairs_src, b2 in (
        (
            "lm x1e-3 (m) / x1e-6 (v), level 0, beta2 0.999",
            [(ref[(0, 0.999)][n][0] * 1e-3, ref[(0, 0.999)][n][1] * 1e-6) for n in picks],
            0.999,
        ),
        ("synthetic (heavy-tailed m, v over decades), beta2 0.999", [synthetic()], 0.999),
    ):
        res = {}
        for name, (recipe, sr_m, sr_v) in table.items():
            pairs = [
                (recipe.m.roundtrip(m, sr_m), recipe.v.roundtrip(v, sr_v), m, v)
                for m, v in pairs_src
            ]
            o = metrics(pairs, t, 0.9, b2)
            res[name] = (recipe.bytes_per_element(), [o["m"], o["v"], o["dir"], o["dir max"]])
        say(f"\n### {label}, one-shot\n")
        say(table_rows(res, ["m", "v", "dir", "dir max"]))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
