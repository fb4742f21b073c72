"""Judge frozen features by a linear probe: one linear layer trained on top of them with the labels.

The backbone stays frozen; its [CLS] feature and the mean of its patch features (DINOv2's linear evaluation
concatenates the two) are computed once for every image, standardised with the training set's statistics, and a
softmax regression is fitted by full-batch L-BFGS. The L2 penalty is picked from a small grid on a tenth of the
training images held back, then the probe is refitted on all of them and scored once on the held-out split.
k-NN (eval_knn.py) asks whether similar images lie close; the probe asks whether the classes can be separated
by a plane, which a feature can allow while its neighbourhoods are mixed.

    python -m dinov2.eval_linear --ckpt runs/dinov2/train/final        # ours, raw pixels and random init
    python -m dinov2.eval_linear --ckpt runs/dinov2/mnist/final --dataset mnist
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.cli import run_main
from common.runtime import set_threads

from .eval_knn import extract_features, load_for_eval
from .model import Dinov2Model

L2_GRID = (1e-4, 1e-3, 1e-2)


def fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, iters: int = 200) -> torch.nn.Linear:
    """Softmax regression on fixed features by L-BFGS: min CE(W x + b, y) + l2 |W|^2."""
    probe = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), y) + l2 * probe.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   n_classes: int) -> dict[str, float]:
    """{"linear_top1": held-out accuracy, "linear_l2": the chosen penalty}."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    n_val = max(1, len(train_x) // 10)
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
    val, fit = perm[:n_val], perm[n_val:]
    scores = {}
    for l2 in L2_GRID:
        p = fit_probe(train_x[fit], train_y[fit], n_classes, l2)
        with torch.no_grad():
            scores[l2] = (p(train_x[val]).argmax(1) == train_y[val]).float().mean().item()
    best = max(L2_GRID, key=lambda l2: (scores[l2], l2))  # ties: the stronger penalty
    probe = fit_probe(train_x, train_y, n_classes, best)
    with torch.no_grad():
        acc = (probe(test_x).argmax(1) == test_y).float().mean().item()
    return {"linear_top1": acc, "linear_l2": best}


def backbone_features(backbone: Dinov2Model, images: torch.Tensor, mean, std, size: int) -> torch.Tensor:
    f = extract_features(backbone, images, mean, std, size)
    return torch.cat([f["cls"], f["patch_mean"]], dim=1)


@dataclass
class LinearConfig:
    ckpt: str = "runs/dinov2/train/final"  # our final/ directory or a transformers Dinov2 directory
    dataset: str = "animal-mnist"  # animal-mnist, mnist or textile
    data_dir: str = ""  # your own labelled image folder instead
    baselines: bool = True  # also raw pixels and the same architecture with random weights
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    run_name: str = ""  # with it, write results.json records beside the checkpoint


def main(cfg: LinearConfig) -> dict:
    set_threads(cfg.threads)
    backbone, train, test, mean, std = load_for_eval(cfg.ckpt, cfg.dataset, cfg.data_dir, cfg.device,
                                                     "a linear probe")
    size = backbone.config.image_size
    n = len(train.classes)
    rows = {"ours": probe_accuracy(backbone_features(backbone, train.images, mean, std, size), train.labels,
                                   backbone_features(backbone, test.images, mean, std, size), test.labels, n)}
    if cfg.baselines:
        rows["raw_pixels"] = probe_accuracy(train.images.float().flatten(1), train.labels,
                                            test.images.float().flatten(1), test.labels, n)
        torch.manual_seed(cfg.seed)
        rand = Dinov2Model(backbone.config)
        rows["random_init"] = probe_accuracy(backbone_features(rand, train.images, mean, std, size), train.labels,
                                             backbone_features(rand, test.images, mean, std, size), test.labels, n)
    name = cfg.data_dir or cfg.dataset
    print(f"linear probe top-1 on {name} ({len(train)} train / {len(test)} held-out images; [CLS] + mean patch)")
    print("| features | top-1 | L2 |\n|---|---|---|")
    for row, r in rows.items():
        print(f"| {row} | {100 * r['linear_top1']:.1f} % | {r['linear_l2']:g} |")
    if cfg.run_name:
        from common.results import command_line, make_record

        rec = [make_record("dinov2", cfg.run_name, f"linear_top1_{name.replace('-', '_')}", rows["ours"]["linear_top1"],
                           "random_init", rows.get("random_init", {}).get("linear_top1"), 0.0,
                           command_line("dinov2.eval_linear"))]
        out = Path(cfg.ckpt).parent / f"linear_{cfg.run_name}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(rec, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    run_main(main, LinearConfig)
