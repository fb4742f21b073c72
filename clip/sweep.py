"""InfoNCE against the sigmoid loss as the batch shrinks: the table of the README.

    python -m clip.sweep                                  # both losses x batch 16, 32, 64, 128, 38,400 pairs each
    python -m clip.sweep --batch-sizes 32 128 --pairs 76800

A softmax over the batch (CLIP's InfoNCE) has batch - 1 negatives for each picture: at batch 16 a caption only
has to beat 15 others, and the loss it is trained on is an easier task than retrieval among 1,000. The sigmoid
loss (SigLIP) scores every pair on its own, so it depends less on the batch (Zhai et al. 2023, fig. 2 and
sec. 4.2, measured there from batch 512 up; this sweep asks the question at the other end). Every cell trains
from the same start on the same number of pictures (``--pairs``: steps = pairs / batch, 10 % of them warmup),
with train_clip.py's default recipe otherwise, and is scored on the 1,000 test pictures.
Writes runs/clip/sweep/sweep.json and sweep.md; each cell's results.json is picked up by ``make results``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import run_main
from common.errors import UserError

KEYS = ("zero_shot_shape_acc", "zero_shot_color_acc", "zero_shot_joint_acc", "i2t_recall_at_1", "t2i_recall_at_1",
        "i2t_recall_at_10", "t2i_recall_at_10")


@dataclass
class SweepConfig:
    """Train one model per (loss, batch size) on the same number of pictures and tabulate the test scores."""

    losses: list[str] = field(default_factory=lambda: ["infonce", "siglip"])
    batch_sizes: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    pairs: int = 38_400  # pictures seen by every cell (300 steps at batch 128, 2,400 at batch 16) (>= 1)
    out_dir: str = "runs/clip/sweep"
    threads: int = 0


def cell_command(loss: str, batch_size: int, cfg: SweepConfig) -> list[str]:
    """The train_clip.py command of one cell (a fresh process each: nothing carries over between cells)."""
    if cfg.pairs % batch_size:
        raise UserError(f"--pairs {cfg.pairs}: expected a multiple of every batch size (not of {batch_size})")
    steps = cfg.pairs // batch_size
    flags = {"loss": loss, "batch-size": batch_size, "max-iters": steps, "warmup-iters": max(1, steps // 10),
             "eval-every": steps, "save-every": steps, "log-every": max(1, steps // 12), "threads": cfg.threads,
             "out-dir": Path(cfg.out_dir) / f"{loss}_b{batch_size}",
             "run-name": f"clip_{loss}_b{batch_size}_{cfg.pairs // 1000}k_pairs_cpu"}
    return [sys.executable, "-m", "clip.train_clip"] + [a for k, v in flags.items() for a in (f"--{k}", str(v))]


def table(rows: list[dict]) -> str:
    lines = ["| loss | batch | steps | zero-shot shape | colour | shape+colour | R@1 image->text | R@1 text->image | "
             "R@10 i->t / t->i | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['loss']} | {r['batch_size']} | {r['steps']} | {r['zero_shot_shape_acc']:.1%} | "
                     f"{r['zero_shot_color_acc']:.1%} | {r['zero_shot_joint_acc']:.1%} | {r['i2t_recall_at_1']:.3f} | "
                     f"{r['t2i_recall_at_1']:.3f} | {r['i2t_recall_at_10']:.3f} / {r['t2i_recall_at_10']:.3f} | "
                     f"{r['train_wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(cfg: SweepConfig) -> dict:
    cells = [(loss, b) for loss in cfg.losses for b in cfg.batch_sizes]
    commands = [cell_command(loss, b, cfg) for loss, b in cells]  # all checked before the first one trains
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for (loss, b), cmd in zip(cells, commands):
        cell_dir = Path(cmd[cmd.index("--out-dir") + 1])
        print(f"sweep | {loss}, batch {b} -> {cell_dir}", flush=True)
        subprocess.run(cmd, check=True)
        summary = json.loads((cell_dir / "train_summary.json").read_text())
        rows.append({"loss": loss, "batch_size": b, "steps": summary["steps"], "train_wall_s": summary["train_wall_s"],
                     **{k: summary["final"][k] for k in KEYS}})
        (out / "sweep.json").write_text(json.dumps({"pairs": cfg.pairs, "rows": rows}, indent=2) + "\n")
        (out / "sweep.md").write_text(table(rows))
    print(table(rows) + f"sweep done in {time.perf_counter() - t0:.0f} s -> {out / 'sweep.md'}")
    return {"rows": rows}


if __name__ == "__main__":
    run_main(main, SweepConfig)
