"""Use the features: search by image, and look at what the patch features hold.

    python -m dinov2.infer --query 0                   # held-out image 0 and its 8 nearest training images
    python -m dinov2.infer --image my_cat.png          # any picture (resized, grey for a 1-channel model)
    python -m dinov2.infer --pca --ckpt runs/dinov2/textile/final --dataset textile   # patch PCA as RGB
    python -m dinov2.infer --retrieval                 # precision@k over the whole held-out split

Search: the query's [CLS] feature against every training image's (cosine), the top k drawn in a row with their
label and similarity. ``--retrieval`` scores that for every held-out image at once: the share of its k
neighbours that have its class (precision@k), for our features and for raw pixels.
PCA (DINOv2 fig. 1): the patch features of a few images are pooled, their first three principal components
become the R, G and B of each patch; parts that the network sees as alike get alike colours across images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.cli import run_main
from common.errors import UserError
from common.runtime import set_threads

from .eval_knn import extract_features, load_for_eval, pixel_features


@dataclass
class InferConfig:
    ckpt: str = "runs/dinov2/train/final"  # our final/ directory or a transformers Dinov2 directory
    dataset: str = "animal-mnist"  # where to search: animal-mnist, mnist or textile
    data_dir: str = ""  # your own image folder instead
    query: int = 0  # the held-out image to search with
    image: str = ""  # or any image file
    k: int = 8  # neighbours shown / scored
    pca: bool = False  # draw the patch-feature PCA picture instead of a search
    pca_images: int = 6  # held-out images in the PCA picture
    retrieval: bool = False  # precision@k over the whole held-out split (ours and raw pixels)
    out: str = ""  # the picture ("" = beside the checkpoint: search.png or pca.png)
    threads: int = 0


def read_query(path: str, size: int, channels: int) -> torch.Tensor:
    """(1, ch, size, size) uint8 from an image file; one clear line if it is not one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC))
    except FileNotFoundError:
        raise UserError(f"--image {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"--image {path}: not an image PIL can read ({type(err).__name__})") from None
    return torch.from_numpy(arr[None, None] if channels == 1 else arr.transpose(2, 0, 1)[None].copy())


def precision_at_k(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                   k: int) -> float:
    """Mean share of each query's k nearest training images (cosine) that share its label."""
    a, b = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    hits = []
    for i in range(0, len(b), 512):
        idx = (b[i:i + 512] @ a.t()).topk(k, dim=1).indices
        hits.append((train_y[idx] == test_y[i:i + 512, None]).float().mean(1))
    return torch.cat(hits).mean().item()


def show(img: torch.Tensor) -> np.ndarray:
    """uint8 (ch, H, W) -> something imshow draws (grey or RGB)."""
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def patch_pca(patches: torch.Tensor, n_components: int = 3) -> torch.Tensor:
    """(n, N, C) patch features -> (n, N, 3) in [0, 1]: the first principal components over all n * N patches,
    each min-max scaled (torch.pca_lowrank on the centred features)."""
    x = patches.reshape(-1, patches.shape[-1])
    x = x - x.mean(0)
    _, _, v = torch.pca_lowrank(x, q=n_components, center=False)
    y = x @ v[:, :n_components]
    y = (y - y.min(0).values) / (y.max(0).values - y.min(0).values).clamp_min(1e-6)
    return y.reshape(*patches.shape[:2], n_components)


def main(cfg: InferConfig) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    set_threads(cfg.threads)
    backbone, train, test, mean, std = load_for_eval(cfg.ckpt, cfg.dataset, cfg.data_dir, "cpu")
    size, ch = backbone.config.image_size, backbone.config.num_channels
    if not 1 <= cfg.k <= len(train):
        raise UserError(f"--k {cfg.k}: expected 1 .. {len(train)} (the training images to search)")
    name = cfg.data_dir or cfg.dataset
    result: dict = {}
    if cfg.retrieval:
        if not (train.labels >= 0).all():
            raise UserError(f"--data-dir {cfg.data_dir}: --retrieval needs class sub-folders")
        f_tr = extract_features(backbone, train.images, mean, std, size)["cls"]
        f_te = extract_features(backbone, test.images, mean, std, size)["cls"]
        ours = precision_at_k(f_tr, train.labels, f_te, test.labels, cfg.k)
        raw = precision_at_k(pixel_features(train.images), train.labels, pixel_features(test.images), test.labels,
                             cfg.k)
        print(f"search by image on {name}: precision@{cfg.k} (share of the {cfg.k} nearest training images with the "
              f"query's class), {len(test)} held-out queries: ours {100 * ours:.1f} % | raw pixels {100 * raw:.1f} %")
        return {"precision_at_k": ours, "raw_pixels": raw}
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt) / ("pca.png" if cfg.pca else "search.png")
    if cfg.pca:
        imgs = test.images[:cfg.pca_images]
        backbone.eval()
        x = imgs.float().div(255)
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        with torch.no_grad():
            patches = backbone((x - m) / s)["patches"]
        g = size // backbone.config.patch_size
        rgb = patch_pca(patches).reshape(len(imgs), g, g, 3)
        fig, axes = plt.subplots(2, len(imgs), figsize=(1.6 * len(imgs), 3.4), dpi=72, squeeze=False)
        for i in range(len(imgs)):
            axes[0, i].imshow(show(imgs[i]), cmap="gray")
            axes[1, i].imshow(rgb[i].numpy(), interpolation="nearest")
            for ax in axes[:, i]:
                ax.axis("off")
        fig.suptitle(f"{name}: patch features, first 3 principal components as RGB", fontsize=9)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
        plt.close(fig)
        print(f"wrote {out}")
        return {"out": out, "pca": rgb}
    if cfg.image:
        q = read_query(cfg.image, train.images.shape[-1], ch)  # the size the run read its images at
        q_label = None
    else:
        if not 0 <= cfg.query < len(test):
            raise UserError(f"--query {cfg.query}: expected 0 .. {len(test) - 1} (an index into the held-out split)")
        q, q_label = test.images[cfg.query:cfg.query + 1], int(test.labels[cfg.query])
    f_tr = F.normalize(extract_features(backbone, train.images, mean, std, size)["cls"], dim=1)
    f_q = F.normalize(extract_features(backbone, q, mean, std, size)["cls"], dim=1)
    sim, idx = (f_q @ f_tr.t())[0].topk(cfg.k)
    labels = [train.classes[int(train.labels[i])] if train.labels[i] >= 0 else "?" for i in idx]
    title = train.classes[q_label] if q_label is not None and q_label >= 0 else Path(cfg.image).name
    print(f"query: {title} | nearest {cfg.k}: " + ", ".join(f"{lab} ({s:.2f})" for lab, s in zip(labels, sim.tolist())))
    fig, axes = plt.subplots(1, cfg.k + 1, figsize=(1.3 * (cfg.k + 1), 1.7), dpi=100)
    axes[0].imshow(show(q[0]), cmap="gray")
    axes[0].set_title(f"query\n{title}", fontsize=7)
    for ax, i, lab, s in zip(axes[1:], idx.tolist(), labels, sim.tolist()):
        ax.imshow(show(train.images[i]), cmap="gray")
        ax.set_title(f"{lab}\n{s:.2f}", fontsize=7)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    print(f"wrote {out}")
    result.update(out=out, neighbours=idx.tolist(), labels=labels, similarity=sim.tolist())
    return result


if __name__ == "__main__":
    run_main(main, InferConfig)
