"""Use the trained models: classify an image or a clip, score a held-out split, draw a reconstruction.

    python -m hiera_mae.infer --image bear.png                             # the fine-tuned animal classifier
    python -m hiera_mae.infer --index 7                                    # held-out image 7 of its dataset
    python -m hiera_mae.infer --ckpt runs/hiera_mae/video/finetune_mae/final --index 3       # a held-out clip
    python -m hiera_mae.infer --eval                                       # accuracy over the held-out split
    python -m hiera_mae.infer --mae runs/hiera_mae/mae/final --index 0 --out recon.png       # MAE's picture

``--ckpt`` is a train_finetune.py ``final/`` directory (its config.json names the classes, the dataset and the
pixel statistics); ``--mae`` a train_mae.py ``final/`` directory. An image file is read with PIL, converted to the
model's channels and resized to its input size; a clip file is a .npy array of uint8 frames (T, H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import load_pretrained, read_config
from common.cli import run_main
from common.errors import UserError

from .dataset import DATASETS, ClipConfig, load_any, normalize
from .model import HieraConfig, HieraForImageClassification, HieraForPreTraining
from .training import accuracy, config_from_dir, draw_reconstructions, heldout_loss


@dataclass
class InferConfig:
    ckpt: str = "runs/hiera_mae/finetune/final"  # a fine-tuned classifier (train_finetune.py)
    mae: str = ""  # instead: an MAE directory (train_mae.py): draw a reconstruction of the input
    image: str = ""  # an image file (or a .npy clip of uint8 frames (T, H, W)) to classify
    index: int = -1  # or: this held-out item of the checkpoint's dataset
    eval: bool = False  # or: the accuracy over the whole held-out split
    top: int = 3  # classes shown
    out: str = "runs/hiera_mae/infer/reconstruction.png"  # where --mae draws
    seed: int = 0  # the mask drawn for --mae
    threads: int = 0


def load_model(path: str, cls):
    """(model, its config.json) from a final/ directory, with one clear line when it is not one."""
    if not Path(path, "config.json").is_file():
        raise UserError(f"--{'mae' if cls is HieraForPreTraining else 'ckpt'} {path}: no config.json there; train "
                        "first (train_mae.py / train_finetune.py) or point to their final/ directory")
    saved = read_config(path)
    if saved.get("model_type") != "hiera":
        raise UserError(f"{path}/config.json: model_type {saved.get('model_type')!r}; expected hiera")
    model = cls(config_from_dir(path))
    load_pretrained(model, path)
    return model.eval(), saved


def read_input(path: str, cfg: HieraConfig) -> torch.Tensor:
    """A file -> uint8 (1, ch, *image_size)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--image {path}: no such file")
    if len(cfg.image_size) == 3:
        if p.suffix != ".npy":
            raise UserError(f"--image {path}: this is a clip model; expected a .npy array of uint8 frames (T, H, W)")
        arr = np.load(p, allow_pickle=False)
        if arr.shape != tuple(cfg.image_size):
            raise UserError(f"--image {path}: frames of shape {arr.shape}; expected {tuple(cfg.image_size)}")
        return torch.from_numpy(arr.astype(np.uint8))[None, None]
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            im = im.convert("L" if cfg.num_channels == 1 else "RGB").resize(tuple(cfg.image_size[::-1]),
                                                                            Image.BICUBIC)
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"--image {path}: not an image PIL can read ({type(err).__name__})") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))[None]


def heldout(saved: dict, cfg: HieraConfig):
    name = saved.get("dataset", "animal-mnist")
    data_dir = "" if name in DATASETS else name
    return load_any(name, data_dir, cfg.image_size[-1], cfg.num_channels, ClipConfig())[1]


def main(cfg: InferConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.mae:
        model, saved = load_model(cfg.mae, HieraForPreTraining)
        mcfg = model.config
        if cfg.image:
            x = read_input(cfg.image, mcfg)
        else:
            test = heldout(saved, mcfg)
            idx = max(cfg.index, 0)
            if idx >= len(test):
                raise UserError(f"--index {cfg.index}: the held-out split has {len(test)} items")
            x = test.images[idx:idx + 1]
        path = draw_reconstructions(model, x, saved["pixel_mean"], saved["pixel_std"], Path(cfg.out), cfg.seed,
                                    title=f"{100 * mcfg.mask_ratio:.0f} % of the mask units hidden")
        score = heldout_loss(model, x, saved["pixel_mean"], saved["pixel_std"], cfg.seed, "cpu")
        print(f"masked-unit loss {score['heldout_loss']:.4f} (predicting 0: {score['zero_loss']:.4f}) | {path}")
        return {"path": path, **score}
    model, saved = load_model(cfg.ckpt, HieraForImageClassification)
    mcfg = model.config
    labels = saved.get("id2label", {})  # JSON keys are strings
    classes = [labels.get(str(i), str(i)) for i in range(mcfg.num_labels)]
    mean, std = saved["pixel_mean"], saved["pixel_std"]
    if cfg.eval:
        test = heldout(saved, mcfg)
        acc, preds = accuracy(model, test.images, test.labels, mean, std, "cpu")
        print(f"held-out accuracy {100 * acc:.2f} % over {len(test)} items ({saved.get('dataset')})")
        return {"accuracy": acc}
    if cfg.image:
        x, truth = read_input(cfg.image, mcfg), None
    elif cfg.index >= 0:
        test = heldout(saved, mcfg)
        if cfg.index >= len(test):
            raise UserError(f"--index {cfg.index}: the held-out split has {len(test)} items")
        x, truth = test.images[cfg.index:cfg.index + 1], classes[int(test.labels[cfg.index])]
    else:
        raise UserError("nothing to classify: pass --image FILE, --index N or --eval")
    with torch.no_grad():
        probs = model(normalize(x, mean, std)).softmax(-1)[0]
    top = probs.topk(min(cfg.top, len(probs)))
    ranked = [(classes[int(i)], float(p)) for p, i in zip(top.values, top.indices)]
    print(" | ".join(f"{c} {100 * p:.1f} %" for c, p in ranked) + (f"   (true: {truth})" if truth else ""))
    return {"top": ranked, "truth": truth, "entropy": -float((probs * probs.clamp_min(1e-12).log()).sum()),
            "uniform_entropy": math.log(len(probs))}


if __name__ == "__main__":
    run_main(main, InferConfig)
