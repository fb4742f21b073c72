"""The stage-2 table: full fine-tuning, LoRA and QLoRA (and the blind control) from the same stage-1 projector,
each with its trainable parameters, peak memory, step time and held-out exact match.

    python -m llava.bench --run        # trains what is missing, one run after the other (~15 minutes each), and
                                       # scores stage 1 alone (infer.py --eval)
    python -m llava.bench              # prints the table from the runs already there
    python -m llava.bench --probe      # where the tower keeps the shape: linear probes on its CLS and its patches

Every row is one ``python -m llava.train_stage2`` (the command is in each run's results.json) with the defaults
but for the flags of ``RUNS``; the row's figures come from its ``train_summary.json``: ``train_wall_s`` over the
steps (evaluations excluded), ``peak_rss_mb`` (the process's peak resident memory, the frozen base included),
and the final evaluation on the same evenly spread held-out questions. Stage 1 is ``make demo-llava``'s.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.cli import run_main

# name -> (out dir, extra flags of train_stage2); "stage1" is train_stage1's default run
RUNS = {
    "stage1": ("runs/llava/stage1", None),
    "lora": ("runs/llava/stage2", []),
    "qlora": ("runs/llava/stage2_qlora", ["--mode", "qlora", "--run-name", "stage2_qlora_cpu"]),
    "full": ("runs/llava/stage2_full", ["--mode", "full", "--lr", "1e-4", "--run-name", "stage2_full_cpu"]),
    "blind": ("runs/llava/stage2_blind", ["--blind", "--run-name", "stage2_lora_cpu_blind"]),
}


ALONE = "stage1_alone_cpu"  # python -m llava.infer --ckpt runs/llava/stage1/final --eval --run-name stage1_alone_cpu


@dataclass
class BenchConfig:
    """Train (with --run) and tabulate the stage-2 variants."""

    run: bool = False  # train the rows whose train_summary.json is missing
    only: str = ""  # comma-separated names of RUNS to train (default: all)
    tokens: int = 0  # instead: tokens per training question, one per row and packed, over this many pictures
    probe: bool = False  # instead: linear probes of shape and colour on the tower's features (--vision)
    vision: str = "runs/clip/hf"  # the tower --probe reads


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    """Held-out accuracy of a softmax regression (features standardised on the training set, L2 1e-3, L-BFGS)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    torch.manual_seed(0)
    lin = torch.nn.Linear(x_train.shape[1], int(y_train.max()) + 1)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x_train), y_train) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (lin(x_test).argmax(1) == y_test).float().mean().item()


def probe(vision: str) -> dict:
    """What the projector can read where: the frozen tower's hidden states on easy-VQA's 4,000 training and 1,000
    test pictures, probed for the shape and the colour of the stage-1 captions. The CLS vector, the 64 patches
    flattened, the 16 patches of --pool 2 flattened, and the mean patch, at every layer."""
    from .dataset import COLORS, SHAPES, easy_vqa_captions, load_images, pixel_values
    from .loading import load_vision_tower

    tower, processor = load_vision_tower(vision)
    data = {}
    for split in ("train", "test"):
        px = pixel_values(load_images(split), processor)
        with torch.no_grad():
            chunks = [tower(px[i:i + 500], output_hidden_states=True).hidden_states for i in range(0, len(px), 500)]
        words = [e.turns[0][1].split() for e in easy_vqa_captions(split)]  # "a red triangle"
        data[split] = ([torch.cat(h) for h in zip(*chunks)],
                       {"shape": torch.tensor([SHAPES.index(w[2]) for w in words]),
                        "colour": torch.tensor([list(COLORS).index(w[1]) for w in words])})
    views = {"CLS": lambda h: h[:, 0], "patches (64)": lambda h: h[:, 1:].flatten(1),
             "pool 2 (16 patches)": lambda h: F.avg_pool2d(patch_grid(h[:, 1:]), 2).flatten(1),
             "mean patch": lambda h: h[:, 1:].mean(1)}
    rows = []
    n_layers = len(data["train"][0])
    for layer in range(1, n_layers):
        for view, f in views.items():
            r = {"layer": layer - n_layers, "view": view}
            for what in ("shape", "colour"):
                r[what] = linear_probe(f(data["train"][0][layer]), data["train"][1][what],
                                       f(data["test"][0][layer]), data["test"][1][what])
            rows.append(r)
            print(f"hidden state {r['layer']:>2} | {view:<20} | shape {100 * r['shape']:.1f} % | "
                  f"colour {100 * r['colour']:.1f} %", flush=True)
    return {"rows": rows}


def patch_grid(h: torch.Tensor) -> torch.Tensor:
    """(B, N, C) patches -> (B, C, g, g)."""
    g = int(math.isqrt(h.shape[1]))
    return h.transpose(1, 2).reshape(h.shape[0], h.shape[2], g, g)


def tokens_per_question(n_pictures: int) -> dict:
    """What packing saves: the training questions about the first ``n_pictures`` easy-VQA pictures, as stage 2
    feeds them, one conversation per row (collate) and packed one picture per row (pack_questions)."""
    from transformers import AutoTokenizer

    from .dataset import SYSTEM_PROMPT, easy_vqa_questions
    from .loading import IMAGE_TOKEN, add_image_token, smollm2_dir
    from .training import StageConfig, collate, pack_questions, picture_groups

    tok = add_image_token(AutoTokenizer.from_pretrained(str(smollm2_dir())))
    examples = easy_vqa_questions("train")
    groups = [[examples[i] for i in g] for g in picture_groups(examples)[:n_pictures]]
    flat = [e for g in groups for e in g]
    n_image = StageConfig().model.num_image_tokens(8)  # the default on the clip chapter's 64 px tower, 8 px patches
    one = int(collate(tok, flat, n_image, SYSTEM_PROMPT, 8192)[1].sum())
    packed = pack_questions(tok, groups, n_image, SYSTEM_PROMPT, 8192, tok.convert_tokens_to_ids(IMAGE_TOKEN))[-1]
    res = {"pictures": len(groups), "questions": len(flat), "one_per_row": one / len(flat),
           "packed": packed / len(flat)}
    print(f"{res['questions']} questions about {res['pictures']} pictures: {res['one_per_row']:.1f} tokens per "
          f"question one per row, {res['packed']:.1f} packed (the shared prefix counted once per picture)")
    return res


def row(name: str, out: str) -> dict | None:
    path = Path(out) / "train_summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    f = s["final"]
    if "exact_match_overall" not in f:  # a stage 1 run with --no-eval-final: infer.py --eval --run-name ... did
        alone = Path(out) / f"eval_{ALONE}" / "eval.json"
        f = json.loads(alone.read_text()) if alone.is_file() else {"exact_match_overall": None, "n": 0}
    return {"run": name, "trainable_M": s["trainable_params"] / 1e6, "peak_rss_GB": s["peak_rss_mb"] / 1024,
            "s_per_step": s["s_per_step"], "overall": f["exact_match_overall"], "shape": f.get("exact_match_shape"),
            "color": f.get("exact_match_color"), "yes_no": f.get("exact_match_yes_no"), "n": f["n"]}


def table(rows: list[dict]) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    lines = ["| run | trainable params | peak RSS | s / step | overall | shape | colour | yes/no |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['trainable_M']:.2f} M | {r['peak_rss_GB']:.1f} GB | {r['s_per_step']:.2f} | "
                     f"{pct(r['overall'])} | {pct(r['shape'])} | {pct(r['color'])} | {pct(r['yes_no'])} |")
    return "\n".join(lines)


def main(cfg: BenchConfig) -> dict:
    if cfg.tokens:
        return tokens_per_question(cfg.tokens)
    if cfg.probe:
        return probe(cfg.vision)
    wanted = [n for n in (cfg.only.split(",") if cfg.only else RUNS) if n]
    if cfg.run:
        for name in wanted:
            out, flags = RUNS[name]
            if flags is None:  # stage 1 alone: its own final evaluation, else infer.py on the same questions
                r = row(name, out)
                if (Path(out) / "final").is_dir() and (r is None or r["overall"] is None):
                    cmd = [sys.executable, "-m", "llava.infer", "--ckpt", f"{out}/final", "--eval", "--run-name", ALONE]
                    print("$", " ".join(cmd[1:]), flush=True)
                    subprocess.run(cmd, check=True)
                continue
            if row(name, out):
                continue
            cmd = [sys.executable, "-m", "llava.train_stage2", "--out-dir", out, *flags]
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True)
    rows = [r for n, (out, _) in RUNS.items() if (r := row(n, out))]
    print(table(rows))
    return {"rows": rows}


if __name__ == "__main__":
    run_main(main, BenchConfig)
