"""Which model should a fixed budget of CPU time train? Chinchilla's question asked on a laptop.

    python -m gpt_minimind.sweep                         # the grid below, 4 minutes of training each
    python -m gpt_minimind.sweep --budget-s 480 --points w256_l4 w192_l4

Hoffmann et al. (2022) fixed the compute and asked which size and how many tokens give the lowest loss:
too small a model stops learning, too large a one sees too few tokens. Here the budget is wall-clock
seconds of the training loop on this machine, with this machine's precision (train_pretrain's
``--dtype auto``). Each point of the grid (a width, a depth, a micro-batch) is first timed for a few
steps on random tokens; its step count is the budget over that time (so the warmup + cosine schedule
ends when the budget does), then it trains with train_pretrain.main on the real data and is scored on
the whole validation split. The picture: validation loss against parameters and against tokens seen,
the bigram and trigram counting tables as horizontal lines. The chapter's default (PRESETS["cpu"]) is
one of its points.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.cli import run_main
from common.results import command_line, make_record
from common.runtime import autocast, pick_device, pick_dtype, set_threads

from . import engine
from .model import MiniMindConfig, MiniMindForCausalLM

# name -> (hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, batch_size[, vocab_size]);
# heads of 32; vocab_size 0 or absent: the tokenizer in --tokenizer-dir (6,400 tokens), else a BPE of that size
# trained for the point (the vocabulary's share of the parameters: 6,400 x 128 is two thirds of w128_l2)
GRID = {
    "w96_l4": (96, 4, 3, 1, 16),
    "w128_l2": (128, 2, 4, 2, 16),
    "w128_l2_v3200": (128, 2, 4, 2, 16, 3200),
    "w128_l2_v12800": (128, 2, 4, 2, 16, 12800),
    "w128_l4": (128, 4, 4, 2, 16),
    "w128_l6": (128, 6, 4, 2, 16),
    "w128_l4_b32": (128, 4, 4, 2, 32),
    "w192_l4": (192, 4, 6, 2, 16),
    "w256_l2": (256, 2, 8, 2, 16),
    "w256_l4": (256, 4, 8, 2, 16),
    "w256_l4_b8": (256, 4, 8, 2, 8),
    "w384_l4": (384, 4, 12, 4, 16),
    "w256_l6": (256, 6, 8, 2, 16),
}


def point_vocab(name: str) -> int:
    """The point's own vocabulary size, 0 for the default tokenizer's."""
    return GRID[name][5] if len(GRID[name]) > 5 else 0


def point_tokenizer_dir(name: str, cfg: SweepConfig) -> Path:
    """Where the point's tokenizer lives: the default one, or out_dir/tokenizer_v<size> (trained once, shared)."""
    v = point_vocab(name)
    return Path(cfg.tokenizer_dir) if v == 0 else Path(cfg.out_dir) / f"tokenizer_v{v}"


@dataclass
class SweepConfig:
    """Train several model sizes for the same wall-clock budget; plot loss against size."""

    points: list[str] = field(default_factory=lambda: list(GRID))  # names of GRID to run
    budget_s: float = 240.0  # seconds of training loop per point (the time the schedule is fitted to)
    seq_len: int = 256  # tokens per sequence (train_pretrain's --max-position-embeddings)
    loss_chunk_size: int = 256  # as train_pretrain's default
    tokenizer_dir: str = "runs/gpt_minimind/tokenizer"  # as train_pretrain's default (trained here if missing)
    timing_steps: int = 10  # steps timed on random tokens to fit the step count to the budget
    out_dir: str = "runs/gpt_minimind/sweep"  # one run directory per point, sweep.json, sweep.png
    png: str = ""  # also draw the picture here (the README's: doc/gpt_minimind_sweep.png)
    mark_run: str = ""  # a train_summary.json to mark on the picture too (the default run, with its own budget)
    dtype: str = "auto"  # as train_pretrain
    threads: int = 0  # CPU threads (0 = torch's default), as the demo runs
    seed: int = 1234


def step_seconds(mcfg: MiniMindConfig, batch: int, seq: int, dtype: torch.dtype, chunk: int, steps: int) -> float:
    """The median time of one training step (forward, backward, AdamW) on random tokens of this shape."""
    device = torch.device("cpu")
    model = engine.ChunkedLossCausalLM(mcfg, chunk) if chunk else MiniMindForCausalLM(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(3, mcfg.vocab_size, (batch, seq + 1))
    times = []
    for _ in range(steps + 1):  # the first step allocates Adam's state: not timed
        t0 = time.perf_counter()
        with autocast(device, dtype):
            loss = model(x[:, :-1], labels=x[:, 1:])["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def run_point(name: str, cfg: SweepConfig) -> dict:
    """Time the point, fit its step count to the budget, then train it with train_pretrain (a subprocess,
    as a user would run it) and read its summary."""
    from transformers import AutoTokenizer

    from .tokenizer import build_tokenizer

    C, L, H, H_kv, batch = GRID[name][:5]
    tok_dir = point_tokenizer_dir(name, cfg)
    if not (tok_dir / "tokenizer.json").is_file():
        build_tokenizer(tok_dir, **({"vocab_size": point_vocab(name)} if point_vocab(name) else {}))
    vocab_size = len(AutoTokenizer.from_pretrained(tok_dir))
    dtype = pick_dtype(cfg.dtype, pick_device("cpu"), cpu_bf16=True)
    mcfg = MiniMindConfig(vocab_size=vocab_size, hidden_size=C, num_hidden_layers=L, num_attention_heads=H,
                          num_key_value_heads=H_kv, max_position_embeddings=cfg.seq_len,
                          attn_impl="math" if dtype == torch.bfloat16 else "sdpa")  # as train_pretrain picks
    step_s = step_seconds(mcfg, batch, cfg.seq_len, dtype, cfg.loss_chunk_size, cfg.timing_steps)
    iters = max(20, int(0.92 * cfg.budget_s / step_s))  # (0.92: the evaluations inside the loop)
    print(f"sweep | {name}: {step_s * 1000:.0f} ms per step -> {iters} steps for {cfg.budget_s:.0f} s", flush=True)
    out = Path(cfg.out_dir) / name
    # evaluation during the run costs loop time too: four evaluations of 64 blocks; the warmup a tenth
    argv = ["--hidden-size", C, "--num-hidden-layers", L, "--num-attention-heads", H, "--num-key-value-heads", H_kv,
            "--max-position-embeddings", cfg.seq_len, "--batch-size", batch, "--max-iters", iters,
            "--warmup-iters", max(10, iters // 10), "--eval-every", max(iters // 4, 1), "--save-every", iters,
            "--eval-blocks", 64, "--log-every", max(iters // 10, 1), "--loss-chunk-size", cfg.loss_chunk_size,
            "--dtype", cfg.dtype, "--threads", cfg.threads, "--seed", cfg.seed, "--tokenizer-dir", tok_dir,
            "--out-dir", out, "--run-name", f"sweep_{name}", "--samples"]
    proc = subprocess.run([sys.executable, "-m", "gpt_minimind.train_pretrain", *map(str, argv)],
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    (out / "sweep_log.txt").write_text(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: train_pretrain failed:\n{proc.stdout[-2000:]}")
    s = json.loads((out / "train_summary.json").read_text())
    (out / "results.json").unlink(missing_ok=True)  # the sweep's own results.json names the points with their budget
    return {"name": name, "hidden_size": C, "num_hidden_layers": L, "batch_size": batch, "n_params": s["n_params"],
            "step_s_timed": step_s, "steps": s["steps"], "train_wall_s": s["train_wall_s"],
            "tokens_seen": s["train_tokens_seen"], "valid_loss": s["valid_loss"],
            "bigram_valid_loss": s["bigram_valid_loss"], "trigram_valid_loss": s["trigram_valid_loss"],
            "unigram_valid_loss": s["unigram_valid_loss"], "dtype": s["dtype"], **per_char(s, vocab_size)}


def per_char(summary: dict, vocab_size: int) -> dict:
    """What compares across vocabularies: nats per character of the valid split (a token's loss does not)."""
    return {"vocab_size": vocab_size, **{k: summary[k] for k in ("valid_nats_per_char", "bigram_nats_per_char",
                                                                 "trigram_nats_per_char")}}


def vocabulary_family(rows: list[dict]) -> list[dict]:
    """The rows that differ only in their vocabulary (the vocabulary points and the default-vocabulary row of
    their shape), by vocabulary size; empty when the grid has no vocabulary point."""
    shapes = {GRID[r["name"]][:5] for r in rows if point_vocab(r["name"])}
    return sorted((r for r in rows if GRID[r["name"]][:5] in shapes), key=lambda r: r["vocab_size"])


def draw(rows: list[dict], path: Path, budget_s: float, mark: dict | None = None) -> None:
    """Loss against parameters and against tokens seen (the default vocabulary's points, nats/token), and,
    when the grid has vocabulary points, nats per character against the vocabulary size at one shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    same_vocab = [r for r in rows if point_vocab(r["name"]) == 0]
    vocab_rows = vocabulary_family(rows)
    fig, axes = plt.subplots(1, 3 if vocab_rows else 2, figsize=(15 if vocab_rows else 10, 4))
    axes[1].sharey(axes[0])
    for ax, key, label in ((axes[0], "n_params", "parameters (M)"), (axes[1], "tokens_seen", "tokens seen (M)")):
        for r in same_vocab:
            ax.scatter(r[key] / 1e6, r["valid_loss"], color={16: "C0", 8: "C2", 32: "C4"}[r["batch_size"]])
            ax.annotate(r["name"], (r[key] / 1e6, r["valid_loss"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        for base, color in (("bigram", "C3"), ("trigram", "C1")):
            ax.axhline(same_vocab[0][f"{base}_valid_loss"], color=color, linestyle="--", linewidth=1,
                       label=f"{base} counts {same_vocab[0][f'{base}_valid_loss']:.2f}")
        if mark is not None:
            ax.scatter(mark[key] / 1e6, mark["valid_loss"], marker="*", s=120, color="k")
            ax.annotate(mark["name"], (mark[key] / 1e6, mark["valid_loss"]), fontsize=7, xytext=(4, -9),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(label)
    axes[0].set_ylabel("held-out loss (nats/token)")
    axes[0].legend(fontsize=8)
    if vocab_rows:  # per character: each vocabulary has its own tokens, so its own counting tables
        ax = axes[2]
        v = [r["vocab_size"] for r in vocab_rows]
        ax.plot(v, [r["valid_nats_per_char"] for r in vocab_rows], "o-", color="C0", label="model")
        for base, color in (("bigram", "C3"), ("trigram", "C1")):
            ax.plot(v, [r[f"{base}_nats_per_char"] for r in vocab_rows], "_--", color=color, markersize=12,
                    linewidth=1, label=f"{base} counts (same tokens)")
        for r in vocab_rows:
            share = r["vocab_size"] * r["hidden_size"] / r["n_params"]
            ax.annotate(f"{r['n_params'] / 1e6:.2f} M, embedding {share:.0%}", (r["vocab_size"],
                        r["valid_nats_per_char"]), fontsize=7, xytext=(3, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xticks(v, [f"{x:,}" for x in v])
        ax.minorticks_off()
        ax.set_xlabel(f"vocabulary ({vocab_rows[0]['hidden_size']} wide x {vocab_rows[0]['num_hidden_layers']})")
        ax.set_ylabel("held-out loss (nats/character)")
        ax.legend(fontsize=8)
    fig.suptitle(f"the same {budget_s / 60:.0f} minutes of CPU training for every point ({rows[0]['dtype']}); "
                 "batch 16 blue, 8 green, 32 purple", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(cfg: SweepConfig) -> dict:
    set_threads(cfg.threads)
    unknown = sorted(set(cfg.points) - set(GRID))
    if unknown:
        raise SystemExit(f"--points {unknown}: not in the grid ({', '.join(GRID)})")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done_file = out / "sweep.json"
    rows = json.loads(done_file.read_text())["rows"] if done_file.exists() else []
    rows = [r for r in rows if r["name"] in cfg.points]  # a re-run keeps the points already measured
    for r in rows:  # rows measured before the per-character figures were kept: read them from the run's summary
        if "valid_nats_per_char" not in r:
            r.update(per_char(json.loads((out / r["name"] / "train_summary.json").read_text()),
                              json.loads((out / r["name"] / "final" / "config.json").read_text())["vocab_size"]))
    for name in cfg.points:
        if any(r["name"] == name for r in rows):
            continue
        rows.append(run_point(name, cfg))
        done_file.write_text(json.dumps({"budget_s": cfg.budget_s, "rows": rows}, indent=2) + "\n")
    rows.sort(key=lambda r: r["n_params"])
    print(f"\n{'point':12s} {'params':>8s} {'steps':>6s} {'tokens':>8s} {'valid':>7s} {'vs bigram':>9s}")
    for r in rows:
        print(f"{r['name']:12s} {r['n_params'] / 1e6:7.2f}M {r['steps']:6d} {r['tokens_seen'] / 1e6:7.2f}M "
              f"{r['valid_loss']:7.3f} {r['valid_loss'] - r['bigram_valid_loss']:+9.3f}")
    best = min((r for r in rows if point_vocab(r["name"]) == 0), key=lambda r: r["valid_loss"])  # same tokens
    print(f"best for {cfg.budget_s:.0f} s: {best['name']} (valid {best['valid_loss']:.3f}; bigram "
          f"{best['bigram_valid_loss']:.3f}, trigram {best['trigram_valid_loss']:.3f})")
    mark = None
    if cfg.mark_run:
        m = json.loads(Path(cfg.mark_run).read_text())
        mark = {"name": f"default: {m['steps']} steps, {m['train_wall_s'] / 60:.1f} min", "n_params": m["n_params"],
                "tokens_seen": m["train_tokens_seen"], "valid_loss": m["valid_loss"]}
    draw(rows, out / "sweep.png", cfg.budget_s, mark)
    if cfg.png:
        draw(rows, Path(cfg.png), cfg.budget_s, mark)
    cmd = command_line("gpt_minimind.sweep")
    records = [make_record("gpt_minimind", f"sweep_{r['name']}_{cfg.budget_s:.0f}s", "valid_loss", r["valid_loss"],
                           "bigram_counts", r["bigram_valid_loss"], r["train_wall_s"], cmd) for r in rows]
    records += [make_record("gpt_minimind", f"sweep_{r['name']}_{cfg.budget_s:.0f}s", "valid_nats_per_char",
                            r["valid_nats_per_char"], "bigram_counts_same_tokens", r["bigram_nats_per_char"],
                            r["train_wall_s"], cmd) for r in vocabulary_family(rows)]
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    return {"rows": rows, "best": best["name"]}


if __name__ == "__main__":
    run_main(main, SweepConfig)
