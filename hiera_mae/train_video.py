"""Video: Hiera on clips. MAE with space-time mask units, then motion classification, against the same
fine-tuning from random weights.

    python -m hiera_mae.train_video                      # the three runs below, about 6 minutes on 2 CPU cores
    python -m hiera_mae.train_video --no-scratch-control # MAE + fine-tuning only
    python -m hiera_mae.train_video --resume             # each stage continues from its last checkpoint

The same model.py as for images: the input's rank is the only switch. A clip is 8 frames x 32 x 32; the stem (a
3 x 7 x 7 convolution, stride 2 x 4 x 4) makes 4 x 8 x 8 tokens; pooling halves height and width but never
time; a mask unit is 1 x 4 x 4 tokens (2 frames x 16 x 16 px), so MAE hides whole space-time blocks and the
decoder reconstructs each 2 x 16 x 16 tubelet. The classes are motions (dataset.py: right, left, down, up, two
bounces, two rotations), so no single frame can tell them apart: left and right differ only in time's arrow.

Stages, each a normal run of its script (its own metrics.jsonl, loss.png, checkpoints, final/):
1. ``<out>/mae``: train_mae.py on moving-mnist.
2. ``<out>/finetune_mae``: train_finetune.py from stage 1's encoder.
3. ``<out>/finetune_scratch``: the same fine-tuning from random weights (``--no-scratch-control`` skips it).
Then ``<out>/video_summary.json`` holds the three summaries (each stage writes its own results.json).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.checkpoint import atomic_write_text
from common.cli import run_main
from common.errors import UserError

from .dataset import ClipConfig


@dataclass
class VideoConfig:
    """The three stages' budgets; everything else is the two scripts' moving-mnist defaults."""

    clips: ClipConfig = field(default_factory=ClipConfig)
    mae_iters: int = 1500  # MAE steps on the clips
    finetune_iters: int = 500  # fine-tuning steps, the same for the pretrained and the scratch run
    scratch_control: bool = True  # also fine-tune from random weights for the comparison
    batch_size: int = 64
    mae_lr: float = 2e-3
    finetune_lr: float = 2e-3
    dtype: str = "auto"
    device: str = "auto"
    threads: int = 0
    seed: int = 1234
    out_dir: str = "runs/hiera_mae/video"
    resume: bool = False


def run_stage(module: str, flags: dict) -> dict:
    """One stage as the user would run it (python -m ...); its train_summary.json back."""
    argv = [sys.executable, "-m", module]
    for k, v in flags.items():
        name = "--" + k.replace("_", "-")
        argv += ([name] if v is True else [f"--no-{k.replace('_', '-')}"] if v is False else [name, str(v)])
    print("$ " + " ".join(argv[1:]), flush=True)
    if subprocess.run(argv).returncode:
        raise UserError(f"the stage `{' '.join(argv[2:])}` failed (its error is above)")
    return json.loads((Path(flags["out_dir"]) / "train_summary.json").read_text())


def main(cfg: VideoConfig) -> dict:
    out = Path(cfg.out_dir)
    common = {"dataset": "moving-mnist", "batch_size": cfg.batch_size, "dtype": cfg.dtype, "device": cfg.device,
              "threads": cfg.threads, "seed": cfg.seed, "resume": cfg.resume,
              **{k: getattr(cfg.clips, k) for k in ("frames", "clip_size", "digit_size", "clips_per_digit", "speed",
                                                     "degrees", "digits")}}
    runs = {"mae": run_stage("hiera_mae.train_mae", {
        **common, "max_iters": cfg.mae_iters, "lr": cfg.mae_lr, "out_dir": out / "mae",
        "run_name": "video_mae_moving_mnist_cpu"})}
    for start in (["mae", "scratch"] if cfg.scratch_control else ["mae"]):
        runs[f"finetune_{start}"] = run_stage("hiera_mae.train_finetune", {
            **common, "max_iters": cfg.finetune_iters, "lr": cfg.finetune_lr, "init": out / "mae" / "final",
            "scratch": start == "scratch", "out_dir": out / f"finetune_{start}",
            "run_name": f"video_finetune_moving_mnist_{start}_cpu"})
    atomic_write_text(out / "video_summary.json", json.dumps(runs, indent=2) + "\n")
    acc = {k.removeprefix("finetune_"): v["heldout_accuracy"] for k, v in runs.items() if k.startswith("finetune_")}
    line = (f"video: MAE held-out loss {runs['mae']['final']['heldout_loss']:.4f} | fine-tuned from MAE "
            f"{100 * acc['mae']:.2f} %")
    if "scratch" in acc:
        line += f" | from scratch {100 * acc['scratch']:.2f} % (same {cfg.finetune_iters} steps)"
    print(line)
    return {"runs": runs, "accuracy": acc}


if __name__ == "__main__":
    run_main(main, VideoConfig)
