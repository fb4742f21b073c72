"""Use a trained CLIP: classify your pictures from text alone, or score the test split and draw it.

    python -m clip.infer --images a.png b.png                                  # shape + colour, zero-shot
    python -m clip.infer --images a.png --labels "a red circle" "a blue square"  # your own classes
    python -m clip.infer --figures doc                                         # test split: scores + pictures

With ``--images``: each picture's top classes and their probabilities, softmax(exp(t) cos) over the classes
as CLIP does (t the learned logit_scale). The default classes are the 24 shape+colour pairs, each an
ensemble of prompts (scoring.py); ``--labels`` gives one prompt per class. Without ``--images``: zero-shot
accuracy and retrieval recall on the 1,000 test pictures; ``--figures DIR`` also draws the similarity matrix
of 64 test pairs, a retrieval grid (5 captions, their top-5 pictures) and the 24-way zero-shot confusion
matrix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.cli import run_main
from common.errors import UserError
from common.runtime import pick_device

from .dataset import COLORS, MEAN, SHAPES, STD, load_data, read_image, to_tensor
from .scoring import JOINT_PROMPTS, class_features, evaluate, image_features, load_model, text_features


@dataclass
class InferConfig:
    """Zero-shot classification of image files, or the test split's scores and pictures."""

    ckpt: str = "runs/clip/train/final"  # train_clip.py's final/ (model.safetensors, config.json, tokenizer/)
    images: list[str] = field(default_factory=list)  # picture files to classify
    labels: list[str] = field(default_factory=list)  # your classes, one prompt each (default: 24 shape+colour)
    top_k: int = 3  # (>= 1) classes printed per picture
    figures: str = ""  # a folder: draw clip_similarity.png, clip_retrieval.png, clip_confusion.png there
    device: str = "auto"


def read_images(paths: list[str], size: int) -> torch.Tensor:
    """The pictures, resized and normalised as in training; a missing or unreadable file is one error line."""
    return to_tensor(np.stack([read_image(p, size, "--images") for p in paths]), MEAN, STD)


def classify(model, tok, pixels: torch.Tensor, labels: list[str], device) -> torch.Tensor:
    """(N, K) probabilities: softmax over the classes of exp(logit_scale) x cosine (CLIP's zero-shot head)."""
    img = image_features(model, pixels, device, torch.float32)
    if labels:
        cls = text_features(model, tok, labels, device, torch.float32)
    else:
        cls = class_features(model, tok, JOINT_PROMPTS, [{"shape": s, "color": c} for s in SHAPES for c in COLORS],
                             device, torch.float32)
    return (model.logit_scale.exp().item() * img @ cls.t()).softmax(-1)


def main(cfg: InferConfig) -> dict:
    if cfg.top_k < 1:
        raise UserError(f"--top-k {cfg.top_k}: expected >= 1")
    device = pick_device(cfg.device)
    if cfg.images:
        for p in cfg.images:  # the user's files first: a typo is reported before the model loads
            if not Path(p).is_file():
                raise UserError(f"--images {p}: no such file")
    model, tok = load_model(cfg.ckpt, device)
    if cfg.images:
        names = cfg.labels or [f"{c} {s}" for s in SHAPES for c in COLORS]
        probs = classify(model, tok, read_images(cfg.images, model.config.image_size), cfg.labels, device)
        out = []
        for path, p in zip(cfg.images, probs):
            top = p.topk(min(cfg.top_k, len(names)))
            best = [(names[i], round(v, 4)) for v, i in zip(top.values.tolist(), top.indices.tolist())]
            print(f"{path}: " + ", ".join(f"{n} {v:.1%}" for n, v in best))
            out.append({"image": path, "top": best})
        return {"predictions": out}
    _, test = load_data("", "", model.config.image_size)
    res = evaluate(model, tok, test, device, torch.float32)
    print(json.dumps({k: v for k, v in res.items() if k not in ("line", "joint_predictions")}, indent=1))
    if cfg.figures:
        draw_figures(model, tok, test, res, Path(cfg.figures), device)
    return res


def draw_figures(model, tok, test, res: dict, folder: Path, device) -> None:
    """Three small PNGs: the similarity matrix of 64 test pairs, a retrieval grid, the confusion matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    show = (test.pixels * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]).clamp(0, 1)
    show = show.permute(0, 2, 3, 1).numpy()
    idx = list(range(0, 1000, 1000 // 64))[:64] if len(test.pixels) >= 1000 else list(range(min(64, len(show))))
    img = image_features(model, test.pixels[idx], device, torch.float32)
    txt = text_features(model, tok, [test.captions[i][0] for i in idx], device, torch.float32)
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    im = ax.imshow((img @ txt.t()).numpy(), cmap="viridis")
    ax.set(xlabel="caption", ylabel="picture", title=f"cosine similarity, {len(idx)} test pairs")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(folder / "clip_similarity.png")
    plt.close(fig)
    # retrieval grid: 5 captions, each with its 5 best pictures (a green frame: the caption's own picture)
    all_img = image_features(model, test.pixels, device, torch.float32)
    queries = idx[:5]
    q = text_features(model, tok, [test.captions[i][0] for i in queries], device, torch.float32)
    top = (q @ all_img.t()).topk(5).indices
    fig, axes = plt.subplots(5, 5, figsize=(7.5, 8), dpi=100)
    for r, (qi, row) in enumerate(zip(queries, top.tolist())):
        for c, j in enumerate(row):
            ax = axes[r, c]
            ax.imshow(show[j])
            ax.set_xticks([]), ax.set_yticks([])
            right = test.captions[j][0] == test.captions[qi][0]
            for side in ax.spines.values():
                side.set(color="green" if right else "red", linewidth=3)
        axes[r, 0].set_title(test.captions[qi][0], fontsize=7, loc="left")
    fig.suptitle("each caption's 5 best test pictures, best first (green: the caption is true of it)", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "clip_retrieval.png")
    plt.close(fig)
    if "joint_predictions" in res:
        names = [f"{c} {s}" for s in SHAPES for c in COLORS]
        truth = [names.index(f"{it.color} {it.shape}") for it in test.items]
        m = np.zeros((24, 24), dtype=int)
        for t, p in zip(truth, res["joint_predictions"]):
            m[t, p] += 1
        fig, ax = plt.subplots(figsize=(6.5, 6), dpi=100)
        ax.imshow(m, cmap="Blues")
        ax.set_xticks(range(24), names, rotation=90, fontsize=6)
        ax.set_yticks(range(24), names, fontsize=6)
        ax.set(xlabel="zero-shot prediction", ylabel="truth", title=f"zero-shot shape+colour: "
               f"{res['zero_shot_joint_acc']:.1%} of {len(truth)} test pictures")
        fig.tight_layout()
        fig.savefig(folder / "clip_confusion.png")
        plt.close(fig)
    print(f"figures: {folder}/clip_similarity.png, clip_retrieval.png" +
          (", clip_confusion.png" if "joint_predictions" in res else ""))


if __name__ == "__main__":
    run_main(main, InferConfig)
