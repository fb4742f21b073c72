"""Position encodings: sinusoidal, learned and rotary (RoPE), RoPE written two ways, its relative-position
property and long-range decay, and what happens past the trained length.

    python -m appendix.positions                 # the tables, the decay plot, the extrapolation experiment
    python -m appendix.positions --decay-png doc/appendix_rope_decay.png

Attention by itself is blind to order: permute the tokens and the outputs permute with them. A model
learns order only through what is added to, or done to, each position:

    sinusoidal  PE[p, 2i] = sin(p / 10000^(2i/C)),  PE[p, 2i+1] = cos(p / 10000^(2i/C)), added to the input
                (Vaswani et al. 2017, sec. 3.5); defined for every p, so nothing stops it at any length
    learned     a trainable (max_len, C) table added to the input (BERT, GPT-2); a row never trained is noise
    RoPE        rotate every pair of q and k channels by the angle p * theta_i, theta_i = 10000^(-2i/D)
                (Su et al. 2021, RoFormer eq. 34): q_m . k_n then depends only on m - n

RoPE two ways. Treat the pair (x_2i, x_2i+1) as the complex number x_2i + j x_2i+1 and multiply by
e^{j p theta_i} (LLaMA's reference code, ``apply_rotary_emb`` with ``torch.view_as_complex``); or rotate
with real arithmetic, pairing channel i with channel i + D/2 (``rotate_half``: GPT-NeoX, ChatGLM-6B and
transformers' ``apply_rotary_pos_emb``). The two pair different channels, so they agree after the index
permutation [0, 2, 4, ..., 1, 3, 5, ...] - the one transformers' LLaMA conversion script applies to the
rows of W_q and W_k (``permute`` in convert_llama_weights_to_hf.py).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.cli import run_main
from common.data import evenly_spaced, subset_note
from common.log import RunLogger
from common.results import command_line, make_record
from common.runtime import seed_everything, set_threads

from .dataset import shakespeare_text

# ---------------------------------------------------------------------------------------------------
# 1) the three encodings
# ---------------------------------------------------------------------------------------------------

def sinusoidal_table(n_pos: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """(n_pos, dim): sin on even channels, cos on odd ones; wavelengths from 2 pi to base * 2 pi."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]  # (T, 1)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (C/2,)
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table


class LearnedPositions(nn.Module):
    """A trainable table, one row per position, added to the token embeddings (GPT-2's ``wpe``)."""

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(max_len, dim) * 0.02)

    def forward(self, T: int) -> torch.Tensor:
        if T > self.weight.shape[0]:
            raise ValueError(f"sequence of {T} positions is longer than the learned table ({self.weight.shape[0]})")
        return self.weight[:T]


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """theta_i = theta^(-2i/D), i = 0 .. D/2 - 1: the angle per position of each channel pair."""
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, D) in the rotate_half layout: the D/2 angles repeated twice, as transformers builds them."""
    angles = positions.float()[:, None] * rope_inv_freq(head_dim, theta)  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # channel i and i + D/2 share an angle
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Real-valued rotation (GPT-NeoX / ChatGLM-6B / transformers): x (B, H, T, D), cos/sin (T, D).
    Pair (x_i, x_{i+D/2}) -> (x_i cos - x_{i+D/2} sin,  x_{i+D/2} cos + x_i sin)."""
    return x * cos + rotate_half(x) * sin


def rope_freqs_cis(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """e^{j p theta_i} (T, D/2), complex64: LLaMA's ``precompute_freqs_cis``."""
    angles = positions.float()[:, None] * rope_inv_freq(head_dim, theta)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope_complex(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Complex multiplication (LLaMA): consecutive channels (x_2i, x_2i+1) form one complex number.
    x (B, H, T, D), freqs_cis (T, D/2)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, H, T, D/2) complex
    return torch.view_as_real(xc * freqs_cis).flatten(-2).type_as(x)


def interleaved_to_half(head_dim: int) -> torch.Tensor:
    """The permutation taking LLaMA's interleaved pairs to rotate_half's halves: [0, 2, 4, ..., 1, 3, 5, ...].
    apply_rope(x[..., perm]) == apply_rope_complex(x)[..., perm]."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def rope_decay_bound(head_dim: int, max_distance: int, theta: float = 10000.0) -> torch.Tensor:
    """RoFormer sec. 3.4.3: |sum_i h_i e^{j r theta_i}| <= (max_i |h_{i+1} - h_i|) * sum_{i<D/2} |S_{i+1}|,
    S_i = sum_{k<i} e^{j r theta_k}. Returns the relative upper bound (1/(D/2)) sum_i |S_i| for r = 0..max_distance."""
    r = torch.arange(max_distance + 1, dtype=torch.float64)[:, None]
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    partial = torch.cumsum(torch.polar(torch.ones_like(r * inv_freq), r * inv_freq), dim=1)  # (R, D/2): S_1 .. S_D/2
    return partial.abs().mean(dim=1)


# ---------------------------------------------------------------------------------------------------
# 2) the extrapolation experiment: train at one length, evaluate at longer ones
# ---------------------------------------------------------------------------------------------------

@dataclass
class PositionsConfig:
    """Four tiny causal character LMs differing only in their position encoding."""

    encodings: str = "none,sinusoidal,learned,rope"  # which to train ("none": no position signal at all, NoPE)
    dim: int = 64  # model width
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads
    train_len: int = 64  # characters per training sequence
    eval_lens: str = "64,128,256"  # evaluate on sequences this long; loss reported per block of train_len positions
    batch_size: int = 32  # sequences per step
    max_iters: int = 1000  # steps per model
    lr: float = 3e-3  # AdamW, cosine to 10 %
    n_chars: int = 1_100_000  # Shakespeare characters; 90 % train, 10 % valid
    eval_batches: int = 0  # batches of valid windows per length, evenly spaced (0: every window tiling the split)
    seed: int = 1337  # same data order and init for every encoding
    threads: int = 0  # CPU threads (0: torch's default)
    decay_png: str = "runs/appendix/rope_decay.png"  # the decay plot (the README's: doc/appendix_rope_decay.png)
    out_dir: str = "runs/appendix/positions"  # extrapolation.json, results.json; <encoding>/metrics.jsonl, loss.png


class Block(nn.Module):
    """Pre-norm transformer block; RoPE (when used) rotates q and k inside attention."""

    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Characters -> embeddings (+ absolute positions) -> blocks (RoPE inside) -> logits."""

    def __init__(self, vocab: int, cfg: PositionsConfig, encoding: str, max_len: int):
        super().__init__()
        if encoding not in ("none", "sinusoidal", "learned", "rope"):
            raise ValueError(f"encoding must be none, sinusoidal, learned or rope; got {encoding!r}")
        self.encoding, self.head_dim = encoding, cfg.dim // cfg.n_head
        self.embed = nn.Embedding(vocab, cfg.dim)
        self.learned = LearnedPositions(max_len, cfg.dim) if encoding == "learned" else None
        self.register_buffer("sin_table", sinusoidal_table(max_len, cfg.dim), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f, self.head = nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        x = self.embed(ids)
        if self.encoding == "sinusoidal":
            x = x + self.sin_table[:T]
        elif self.encoding == "learned":
            x = x + self.learned(T)
        rope = rope_cos_sin(torch.arange(T), self.head_dim) if self.encoding == "rope" else None
        for block in self.blocks:
            x = block(x, rope)
        return self.head(self.ln_f(x))


def tiling_windows(src: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every non-overlapping window of T tokens of ``src``, in order: inputs (N, T) = src[i*T : (i+1)*T] and
    next-token targets (N, T), N = (len(src) - 1) // T; together they predict src[1 : N*T + 1], each once."""
    n = (len(src) - 1) // T
    return src[: n * T].view(n, T), src[1: n * T + 1].view(n, T)


@torch.no_grad()
def per_position_loss(model: nn.Module, src: torch.Tensor, T: int, batch_size: int,
                      max_windows: int = 0) -> tuple[torch.Tensor, int, int]:
    """The mean next-token cross-entropy at each position 0 .. T-1 of the windows ``tiling_windows`` cuts from
    ``src``: over all of them (max_windows 0), else over ``max_windows`` evenly spaced ones. No random
    generator is used. Returns (loss per position (T,), windows scored, windows in src)."""
    x, y = tiling_windows(src, T)
    picked = torch.tensor(evenly_spaced(len(x), max_windows), dtype=torch.long)
    total = torch.zeros(T, dtype=torch.float64)
    for i in range(0, len(picked), batch_size):
        rows = picked[i: i + batch_size]
        total += F.cross_entropy(model(x[rows]).transpose(1, 2), y[rows], reduction="none").sum(0).double()
    return (total / len(picked)).float(), len(picked), len(x)


def run_extrapolation(cfg: PositionsConfig) -> list[dict]:
    """Train one TinyLM per encoding at ``train_len``; evaluate the loss per block of positions at each
    of ``eval_lens``, on the non-overlapping windows of that length that tile the whole valid split (110 k
    characters at the default: 1,718 windows of 64; or ``eval_batches * batch_size`` of them, evenly
    spaced). The learned table has max(eval_lens) rows, so rows past train_len exist but were never
    trained: that is what a learned table offers beyond its training length."""
    text = shakespeare_text(cfg.n_chars)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text])
    split = int(len(ids) * 0.9)
    train, valid = ids[:split], ids[split:]
    eval_lens = [int(n) for n in cfg.eval_lens.split(",")]

    def windows(src: torch.Tensor, n: int, T: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(len(src) - T - 1, (n,), generator=g).tolist()
        return (torch.stack([src[s: s + T] for s in starts]), torch.stack([src[s + 1: s + T + 1] for s in starts]))

    rows = []
    for enc in cfg.encodings.split(","):
        seed_everything(cfg.seed)
        model = TinyLM(len(chars), cfg, enc, max(eval_lens))
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cfg.max_iters))))
        logger = RunLogger(Path(cfg.out_dir) / enc, cfg.max_iters, log_every=max(cfg.max_iters // 4, 1))
        t0 = time.perf_counter()
        for step in range(cfg.max_iters):
            x, y = windows(train, cfg.batch_size, cfg.train_len, cfg.seed * 100_003 + step)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            logger.step(step + 1, loss.item(), sched.get_last_lr()[0], x.numel(), encoding=enc)
        wall = time.perf_counter() - t0
        logger.close()  # <out_dir>/<encoding>/metrics.jsonl and loss.png
        model.eval()
        row = {"encoding": enc, "train_loss": loss.item(), "train_s": wall}
        notes = []
        for T in eval_lens:
            per_pos, k, n = per_position_loss(model, valid, T, cfg.batch_size, cfg.eval_batches * cfg.batch_size)
            for lo in range(0, T, cfg.train_len):  # positions [lo, lo + train_len)
                row[f"len{T}_pos{lo}"] = per_pos[lo: lo + cfg.train_len].mean().item()
            row[f"len{T}"] = per_pos.mean().item()
            row[f"len{T}_windows"] = k
            notes.append(subset_note(k, n, "windows"))
        print(f"  {enc:<10} trained {cfg.max_iters} steps in {wall:.0f} s | " +
              " | ".join(f"len {T}: {row[f'len{T}']:.3f}{note}" for T, note in zip(eval_lens, notes)), flush=True)
        rows.append(row)
    return rows


def draw_decay(png: str, head_dim: int = 128, max_distance: int = 256) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bound = rope_decay_bound(head_dim, max_distance)
    fig, ax = plt.subplots(figsize=(5, 3), dpi=90)
    ax.plot(bound.numpy())
    ax.set_xlabel("relative distance m - n")
    ax.set_ylabel("relative upper bound")
    ax.set_title(f"RoPE long-range decay (D = {head_dim}, theta = 10000)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


def main(cfg: PositionsConfig) -> dict:
    set_threads(cfg.threads)
    # a) RoPE two ways agree, and agree with transformers
    torch.manual_seed(cfg.seed)
    D, T = 16, 12
    x = torch.randn(2, 3, T, D)
    pos = torch.arange(T)
    perm = interleaved_to_half(D)
    real = apply_rope(x[..., perm], *rope_cos_sin(pos, D))
    two_ways = real - apply_rope_complex(x, rope_freqs_cis(pos, D))[..., perm]
    print(f"RoPE: rotate_half(x[perm]) vs complex(x)[perm], max |difference| {two_ways.abs().max():.1e}")
    # b) relative position: shift both positions by s, the score stays
    q, k = torch.randn(D), torch.randn(D)
    cos, sin = rope_cos_sin(torch.arange(200), D)

    def score(m: int, n: int) -> float:
        return float(apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n]))

    shifts = [abs(score(m, n) - score(m + s, n + s)) for m, n, s in ((5, 2, 100), (9, 9, 37), (3, 40, 150))]
    print(f"RoPE: q_m.k_n - q_(m+s).k_(n+s), max over three (m, n, s): {max(shifts):.1e}")
    draw_decay(cfg.decay_png)
    print(f"decay plot: {cfg.decay_png}")
    # c) extrapolation
    print(f"extrapolation: trained at {cfg.train_len} characters, evaluated at {cfg.eval_lens} (valid loss, nats/char"
          + (", every non-overlapping window of the valid split)" if cfg.eval_batches <= 0 else ")"))
    rows = run_extrapolation(cfg)
    lens = [int(n) for n in cfg.eval_lens.split(",")]
    longest = max(lens)
    blocks = list(range(0, longest, cfg.train_len))
    print("\n| encoding | " + " | ".join(f"len {n}" for n in lens) + " | " +
          " | ".join(f"pos {lo}-{lo + cfg.train_len - 1} (len {longest})" for lo in blocks) + " |")
    print("|---" * (1 + len(lens) + len(blocks)) + "|")
    for r in rows:
        print(f"| {r['encoding']} | " + " | ".join(f"{r[f'len{n}']:.3f}" for n in lens) + " | " +
              " | ".join(f"{r[f'len{longest}_pos{lo}']:.3f}" for lo in blocks) + " |")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "extrapolation.json").write_text(json.dumps(rows, indent=2) + "\n")
    # doc/results.json: each encoding's loss at each length, against the same model at its training length
    cmd = command_line("appendix.positions")
    records = [make_record("appendix", f"positions_{r['encoding']}_train{cfg.train_len}_len{n}", "valid_loss",
                           r[f"len{n}"], f"len{cfg.train_len}", r[f"len{cfg.train_len}"], r["train_s"], cmd)
               for r in rows for n in lens if n != cfg.train_len]
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    return {"rows": rows, "two_ways_max_diff": two_ways.abs().max().item(), "shift_max_diff": max(shifts)}


if __name__ == "__main__":
    run_main(main, PositionsConfig)
