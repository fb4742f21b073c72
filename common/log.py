"""One log-line format, a tqdm bar, ``metrics.jsonl`` and a loss-curve PNG for every run.

    step 120/2000 | loss 3.412 | lr 3.0e-04 | 12.3k tok/s | 1.2 GB
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .bench import peak_memory_bytes


def format_line(step: int, total: int, loss: float, lr: float, tok_per_s: float, mem_bytes: int) -> str:
    """The fixed log line every chapter prints."""
    return (f"step {step}/{total} | loss {loss:.3f} | lr {lr:.1e} | "
            f"{tok_per_s / 1e3:.1f}k tok/s | {mem_bytes / 2**30:.1f} GB")


class RunLogger:
    """Writes one JSON record per call to ``out_dir/metrics.jsonl`` and draws ``loss.png`` on close.

    Only rank 0 writes (pass ``enabled=False`` on the other ranks). With ``resume=True`` the existing
    metrics file is kept and records past ``start_step`` are dropped, so a resumed run's file reads
    as if the run had never stopped.
    """

    def __init__(self, out_dir: str | os.PathLike, total_steps: int, start_step: int = 0,
                 resume: bool = False, enabled: bool = True, log_every: int = 10, device=None):
        self.out_dir = Path(out_dir)
        self.total = total_steps
        self.enabled = enabled
        self.log_every = log_every
        self.device = device
        self.path = self.out_dir / "metrics.jsonl"
        self._tokens = 0
        self._t0 = time.perf_counter()
        if not enabled:
            self.bar = None
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True,
                        disable=os.environ.get("TQDM_DISABLE") == "1")

    def log(self, record: dict[str, Any]) -> None:
        """Append a record (any JSON-able values) to metrics.jsonl."""
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def step(self, step: int, loss: float, lr: float, tokens: int, **extra: Any) -> None:
        """Call once per optimizer step; logs the fixed line every ``log_every`` steps."""
        self._tokens += tokens
        if not self.enabled:
            return
        self.bar.update(1)
        if step % self.log_every and step != self.total:
            return
        dt = time.perf_counter() - self._t0
        tok_s = self._tokens / max(dt, 1e-9)
        mem = peak_memory_bytes(self.device)
        if self.device is not None and torch.device(self.device).type == "cuda":  # what the card must hold
            extra = {"mem_reserved_bytes": torch.cuda.max_memory_reserved(self.device), **extra}
        self.log({"step": step, "loss": loss, "lr": lr, "tok_per_s": tok_s, "mem_bytes": mem, **extra})
        self.bar.write(format_line(step, self.total, loss, lr, tok_s, mem))
        self.bar.set_postfix(loss=f"{loss:.3f}")
        self._tokens, self._t0 = 0, time.perf_counter()

    def write(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar else print)(text)

    def close(self) -> Path | None:
        """Close the bar and draw the loss curve; returns the PNG's path."""
        if not self.enabled:
            return None
        self.bar.close()
        return plot_metrics(self.path, self.out_dir / "loss.png")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Train loss (and any ``valid_loss`` records) against step, as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    if not train and not valid:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if valid:
        ax.plot(*zip(*valid), "o-", label="valid loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
