"""Judge frozen features by weighted k-NN on a held-out split (DINO sec. 4.1; dinov2/eval/knn.py).

Every held-out image's [CLS] feature is compared (cosine) with the features of all training images; the k most
similar vote for their labels with weight exp(cos / T), T = 0.07, and the class with the most weight wins. No
parameter is trained, so the score measures the features alone. Beside ours, the same vote on raw pixels and on
the same architecture with random weights: the two floors a learned feature has to clear.

    python -m dinov2.eval_knn --ckpt runs/dinov2/train/final          # ours, raw pixels and random init
    python -m dinov2.eval_knn --ckpt runs/dinov2/train/final --dataset mnist
    python -m dinov2.eval_knn --ckpt facebook-dinov2-small-dir --data-dir photos/   # a transformers Dinov2 directory
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.cli import run_main
from common.errors import UserError
from common.runtime import pick_device, seed_everything, set_threads

from .dataset import ImageSet, load_data
from .model import Dinov2Model

KS = (10, 20)


@torch.no_grad()
def extract_features(backbone: Dinov2Model, images: torch.Tensor, mean: list[float], std: list[float],
                     image_size: int, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """{"cls": (N, C), "patch_mean": (N, C)} of uint8 images (N, ch, H, W), resized to the backbone's
    ``image_size`` and normalised as in training; the backbone is put in eval mode (no drop path)."""
    was = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    cls, patch = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float().div(255)
        if x.shape[-1] != image_size or x.shape[-2] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True, align_corners=False)
        out = backbone(((x - m) / s).to(device))
        cls.append(out["cls"].float().cpu())
        patch.append(out["patches"].float().mean(1).cpu())
    backbone.train(was)
    return {"cls": torch.cat(cls), "patch_mean": torch.cat(patch)}


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, k: int,
                n_classes: int, temperature: float = 0.07, chunk: int = 512) -> torch.Tensor:
    """(N_test,) predicted labels by the weighted vote of the k nearest training features (cosine)."""
    train_feats = F.normalize(train_feats, dim=1)
    preds = []
    for i in range(0, len(test_feats), chunk):
        sim = F.normalize(test_feats[i:i + chunk], dim=1) @ train_feats.t()  # (b, N_train)
        top, idx = sim.topk(min(k, sim.shape[1]), dim=1)
        votes = torch.zeros(len(sim), n_classes)
        votes.scatter_add_(1, train_labels[idx], (top / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, n_classes: int, ks=KS) -> dict[int, float]:
    return {k: (knn_predict(train_feats, train_labels, test_feats, k, n_classes) == test_labels).float().mean().item()
            for k in ks}


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """The raw-pixel baseline's feature: the image itself, flattened and centred per image."""
    x = images.float().flatten(1)
    return x - x.mean(1, keepdim=True)


def labelled(train: ImageSet, test: ImageSet) -> bool:
    return bool((train.labels >= 0).all() and (test.labels >= 0).all() and train.classes)


def evaluate_backbone(backbone: Dinov2Model, train: ImageSet, test: ImageSet, mean: list[float], std: list[float],
                      image_size: int, ks=KS) -> dict[str, float]:
    """k-NN accuracy of a backbone's [CLS] features for each k: {"knn_top1_k20": ...}."""
    if not labelled(train, test):
        return {}
    ftr = extract_features(backbone, train.images, mean, std, image_size)["cls"]
    fte = extract_features(backbone, test.images, mean, std, image_size)["cls"]
    acc = knn_accuracy(ftr, train.labels, fte, test.labels, len(train.classes), ks)
    return {f"knn_top1_k{k}": v for k, v in acc.items()}


def check_channels(backbone: Dinov2Model, images: ImageSet, ckpt: str, name: str) -> None:
    """One line, not a convolution's shape error, when the model and the images disagree on channels."""
    have, want = images.images.shape[1], backbone.config.num_channels
    if have != want:
        raise UserError(f"--ckpt {ckpt}: the model takes {want}-channel images, {name} has {have}-channel ones; "
                        f"pick a dataset of its kind (--dataset / --data-dir)")


def load_for_eval(ckpt: str, dataset: str, data_dir: str, device: str = "auto", labels_for: str = ""
                  ) -> tuple[Dinov2Model, ImageSet, ImageSet, list[float], list[float]]:
    """(backbone on its device, train, held-out, pixel mean, pixel std): the set-up every evaluation shares. The
    images are read at the size the run trained on, in the model's channels; the statistics are the run's
    (a transformers directory has none: the training images' own). ``labels_for`` names what needs labels."""
    from .dataset import pixel_stats

    backbone, meta = load_backbone(ckpt)
    backbone.to(pick_device(device))
    size, ch = backbone.config.image_size, backbone.config.num_channels
    train, test = load_data(dataset, data_dir, meta.get("data_image_size", size), ch)
    check_channels(backbone, train, ckpt, data_dir or dataset)
    if labels_for and not labelled(train, test):
        raise UserError(f"--data-dir {data_dir}: the images need class sub-folders for {labels_for}")
    mean, std = meta.get("pixel_mean"), meta.get("pixel_std")
    if mean is None:
        mean, std = pixel_stats(train.images)
    return backbone, train, test, mean, std


def load_backbone(path: str | Path) -> tuple[Dinov2Model, dict]:
    """A backbone from a training run's final/ directory (ours: the teacher's backbone and the data stats), or
    from a transformers Dinov2 directory (imported by export_hf.import_hf)."""
    from .export_hf import import_hf

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"--ckpt {path}: no config.json there; expected a dinov2 run's final/ directory or a "
                        "transformers Dinov2 directory")
    return import_hf(path)


@dataclass
class KnnConfig:
    ckpt: str = "runs/dinov2/train/final"  # our final/ directory or a transformers Dinov2 directory
    dataset: str = "animal-mnist"  # animal-mnist, mnist or textile (dataset.py)
    data_dir: str = ""  # your own labelled image folder instead (class sub-folders)
    baselines: bool = True  # also raw pixels and the same architecture with random weights
    seed: int = 0  # the random-init baseline's weights
    threads: int = 0
    device: str = "auto"
    run_name: str = ""  # with it, write results.json records beside the checkpoint


def main(cfg: KnnConfig) -> dict:
    set_threads(cfg.threads)
    backbone, train, test, mean, std = load_for_eval(cfg.ckpt, cfg.dataset, cfg.data_dir, cfg.device, "a k-NN score")
    device, size = next(backbone.parameters()).device, backbone.config.image_size
    rows = {"ours": evaluate_backbone(backbone, train, test, mean, std, size)}
    if cfg.baselines:
        n = len(train.classes)
        acc = knn_accuracy(pixel_features(train.images), train.labels, pixel_features(test.images), test.labels, n)
        rows["raw_pixels"] = {f"knn_top1_k{k}": v for k, v in acc.items()}
        seed_everything(cfg.seed)
        rows["random_init"] = evaluate_backbone(Dinov2Model(backbone.config).to(device), train, test, mean, std, size)
    name = cfg.data_dir or cfg.dataset
    print(f"k-NN top-1 on {name} ({len(train)} train / {len(test)} held-out images, T = 0.07)")
    print("| features | " + " | ".join(f"k = {k}" for k in KS) + " |")
    print("|---|" + "---|" * len(KS))
    for row, acc in rows.items():
        print(f"| {row} | " + " | ".join(f"{100 * acc[f'knn_top1_k{k}']:.1f} %" for k in KS) + " |")
    if cfg.run_name:
        from common.results import command_line, make_record

        recs = [make_record("dinov2", cfg.run_name, f"knn_top1_k{k}_{name.replace('-', '_')}",
                            rows["ours"][f"knn_top1_k{k}"], "random_init",
                            rows.get("random_init", {}).get(f"knn_top1_k{k}"), 0.0, command_line("dinov2.eval_knn"))
                for k in KS]
        out = Path(cfg.ckpt).parent / f"knn_{cfg.run_name}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(recs, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    run_main(main, KnnConfig)
