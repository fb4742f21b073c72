"""Fine-tune Hiera for classification, from the MAE-pretrained encoder or, with ``--scratch``, from random weights.

    python -m hiera_mae.train_finetune                        # from runs/hiera_mae/mae/final (train_mae.py first)
    python -m hiera_mae.train_finetune --scratch              # the control: the same budget, random weights
    python -m hiera_mae.train_finetune --dataset mnist --init runs/hiera_mae/mae_mnist/final
    python -m hiera_mae.train_finetune --dataset moving-mnist --init runs/hiera_mae/video/mae/final   # clips
    torchrun --nproc_per_node 2 -m hiera_mae.train_finetune   # DDP

MAE's fine-tuning recipe (MAE appendix A.2), scaled down: AdamW, warm-up + cosine, label smoothing, random shifts
(and flips for animals), and optionally layer-wise learning-rate decay (``--layer-decay 0.75``: the stem learns
slowest, the head fastest, on the idea that pretrained early layers are the most general; off by default, because
with 6 blocks it measured worse). The encoder's architecture comes from ``--init``'s config.json, so the flags
that size the model only matter with ``--scratch``; ``--scratch`` always uses 1.0, because slowing down random
early layers only handicaps the control.

Writes to ``--out-dir``: checkpoints/, final/ (HieraForImageClassification + config.json with the classes and the
pixel statistics), metrics.jsonl, loss.png, train_summary.json, results.json.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from common.checkpoint import (
    atomic_write_text,
    read_config,
    resume_or_start,
    resume_point,
    save_checkpoint,
    save_pretrained,
)
from common.cli import run_main
from common.config import to_flat_dict
from common.data import evenly_spaced
from common.distributed import all_reduce_mean, cleanup, init_distributed, wrap
from common.errors import UserError
from common.results import command_line, make_record
from common.runtime import autocast, pick_device, pick_dtype, seed_everything, set_threads
from common.schedule import clip_grad

from .dataset import ClipConfig, ImageSet, augment, normalize
from .model import HieraConfig, HieraForImageClassification
from .training import DATASET_DEFAULTS, accuracy, dataset_defaults, load_encoder, load_for, model_config, step_batch


@dataclass
class TrainConfig:
    """Classification from the MAE encoder (or from scratch) at a fixed budget of steps."""

    model: HieraConfig = field(default_factory=HieraConfig)
    clips: ClipConfig = field(default_factory=ClipConfig)
    dataset: str = "animal-mnist"  # animal-mnist, mnist, textile or moving-mnist (dataset.py)
    data_dir: str = ""  # your own image folder (class sub-folders give the labels)
    init: str = "runs/hiera_mae/mae/final"  # the MAE directory whose encoder starts the run
    scratch: bool = False  # the control: random weights instead of --init (and layer decay 1.0)
    labels_per_class: int = 0  # fine-tune on only the first N training images of each class (0 = all): the
    # low-label regime, where pretraining should matter most
    flip: bool = True  # random horizontal flips (off for digits and motions: dataset defaults)
    shift: int = 2  # random translation by up to this many pixels
    batch_size: int = 128
    max_iters: int = 600  # optimizer steps: the budget both runs get
    lr: float = 2e-3  # peak learning rate of the head; block i gets lr * layer_decay^(depth - i)
    layer_decay: float = 1.0  # layer-wise decay; MAE's 0.65-0.75 is for 12-32 block ViTs. With 6 blocks, 0.75 cost
    # 1.7 points on animal-mnist and 2.7 on the clips (README, Results), so the default is off (1.0)
    min_lr_ratio: float = 0.01
    warmup_iters: int = 50
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    # runtime
    dtype: str = "auto"
    device: str = "auto"
    threads: int = 0
    seed: int = 1234
    eval_every: int = 100  # steps between held-out accuracies
    eval_images: int = 0  # held-out images scored (evenly spaced; 0 = all, what the README's figures use)
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 25
    out_dir: str = "runs/hiera_mae/finetune"
    resume: bool = False
    run_name: str = ""  # names the records ("" = finetune_<dataset>_<mae|scratch>_cpu)


PRESETS = {
    "cpu": {},
    "gpu4gb": {"embed_dim": 96, "num_heads": [1, 2, 4], "depths": [1, 2, 7], "batch_size": 256,
               "max_iters": 5000, "warmup_iters": 250, "eval_every": 500, "save_every": 500},
}
FINETUNE_DEFAULTS = {**DATASET_DEFAULTS, "textile": {**DATASET_DEFAULTS["textile"], "num_labels": 3},
                     "moving-mnist": {**DATASET_DEFAULTS["moving-mnist"], "init": "runs/hiera_mae/video/mae/final"}}






def few_labels(data: ImageSet, n: int) -> ImageSet:
    """The first n images of each class, in their order in the split (the same subset on every run)."""
    idx = torch.cat([torch.nonzero(data.labels == c).flatten()[:n] for c in range(len(data.classes))]).sort().values
    return ImageSet(data.images[idx], data.labels[idx], data.classes)


def layer_groups(model: HieraForImageClassification, cfg: TrainConfig, decay: float) -> list[dict]:
    """AdamW groups with layer-wise learning-rate decay: the patch embedding is layer 0, block i is layer i + 1,
    the pooler and the classifier are layer L + 1 (full lr); lr = lr * decay^(L + 1 - layer). Weight decay on
    matrices only."""
    n_blocks = sum(model.config.depths)
    groups: dict[tuple[int, bool], dict] = {}
    block_ids = {}
    i = 0
    for s, stage in enumerate(model.hiera.encoder.stages):
        for j in range(len(stage.layers)):
            block_ids[f"hiera.encoder.stages.{s}.layers.{j}."] = i + 1
            i += 1
    for name, p in model.named_parameters():
        if name.startswith("hiera.embeddings."):
            layer = 0
        elif name.startswith("hiera.encoder."):
            layer = next(v for k, v in block_ids.items() if name.startswith(k))
        else:
            layer = n_blocks + 1
        wd = p.ndim >= 2 and "position_embeddings" not in name
        # each group's own lr: the scheduler's warm-up and cosine multiply it (LambdaLR keeps one base per group)
        g = groups.setdefault((layer, wd), {"params": [], "weight_decay": cfg.weight_decay if wd else 0.0,
                                            "lr": cfg.lr * decay ** (n_blocks + 1 - layer)})
        g["params"].append(p)
    return list(groups.values())




def main(cfg: TrainConfig) -> dict:
    dist_info = init_distributed(pick_device(cfg.device).type)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    cfg = dataset_defaults(cfg, FINETUNE_DEFAULTS)
    if cfg.batch_size % dist_info.world_size:
        raise UserError(f"--batch-size {cfg.batch_size}: expected a multiple of the {dist_info.world_size} processes")
    if not 0 < cfg.layer_decay <= 1:
        raise UserError(f"--layer-decay {cfg.layer_decay}: expected a factor in (0, 1]")
    out = Path(cfg.out_dir)
    name = cfg.data_dir or cfg.dataset
    start_from = "scratch" if cfg.scratch else "mae"
    few = f"_{cfg.labels_per_class}_per_class" if cfg.labels_per_class else ""
    run_name = cfg.run_name or f"finetune_{Path(name).name.replace('-', '_')}{few}_{start_from}_cpu"
    # the architecture first (from --init), then the data it must fit
    probe = model_config(cfg, 1)
    cfg.model = probe
    train, test, mean, std = load_for(cfg)
    if cfg.eval_images and cfg.eval_images < len(test):
        keep = evenly_spaced(len(test), cfg.eval_images)
        test = ImageSet(test.images[keep], test.labels[keep], test.classes)
    if (train.labels < 0).any():
        raise UserError(f"--data-dir {cfg.data_dir}: images outside class sub-folders have no label; fine-tuning "
                        "needs DIR/<class>/image files")
    if cfg.labels_per_class:
        train = few_labels(train, cfg.labels_per_class)
        if len(train) < cfg.batch_size:
            raise UserError(f"--labels-per-class {cfg.labels_per_class}: {len(train)} images; expected at least "
                            f"--batch-size {cfg.batch_size}")
    cfg.model = model_config(cfg, len(train.classes))
    if not cfg.scratch:  # fine-tune on the data the MAE normalised with: keep its statistics
        saved = read_config(cfg.init)
        mean, std = saved.get("pixel_mean", mean), saved.get("pixel_std", std)
    model = HieraForImageClassification(cfg.model)
    if not cfg.scratch:
        load_encoder(model, cfg.init)
    model.to(device)
    decay = 1.0 if cfg.scratch else cfg.layer_decay
    if dist_info.is_main:
        print(f"data: {name}, {len(train)} train / {len(test)} held-out, {len(train.classes)} classes | start: "
              f"{'random weights' if cfg.scratch else cfg.init} | {model.hiera.num_parameters() / 1e6:.2f} M | "
              f"layer decay {decay} | {device} {dtype}", flush=True)
    net = wrap(model, dist_info, "ddp", ())
    optimizer = torch.optim.AdamW(layer_groups(model, cfg, decay), lr=cfg.lr, betas=(0.9, 0.999))
    ckpt_root = out / "checkpoints"
    resume_from = resume_point(ckpt_root, cfg.resume, dist_info.is_main)
    scheduler, start, logger = resume_or_start(model, optimizer, cfg, out, resume_from, device, cfg.min_lr_ratio,
                                               is_main=dist_info.is_main)
    tokens_per_input = math.prod(cfg.model.tokens_spatial_shape)
    t_train = time.perf_counter()
    for step in range(start, cfg.max_iters):
        batch, own, g = step_batch(len(train), cfg, step, dist_info.rank, dist_info.world_size)
        x = normalize(augment(train.images[batch], cfg.shift, cfg.flip, g)[own], mean, std).to(device)
        y = train.labels[batch][own].to(device)
        with autocast(device, dtype):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
        loss.backward()
        clip_grad(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        done = step + 1
        logger.step(done, all_reduce_mean(loss.item(), dist_info), scheduler.get_last_lr()[-1],
                    tokens_per_input * cfg.batch_size)
        if dist_info.is_main and done % cfg.eval_every == 0 and done != cfg.max_iters:  # the last: below
            acc, _ = accuracy(model, test.images, test.labels, mean, std, device)
            logger.log({"step": done, "heldout_accuracy": acc})
            logger.write(f"step {done}/{cfg.max_iters} | held-out accuracy {100 * acc:.2f} %")
        if done % cfg.save_every == 0 or done == cfg.max_iters:
            save_checkpoint(ckpt_root, done, model, to_flat_dict(cfg), optimizer, scheduler,
                            keep=cfg.keep_checkpoints, is_main=dist_info.is_main)
    wall = time.perf_counter() - t_train
    result: dict = {"model": model}
    if dist_info.is_main:
        acc, preds = accuracy(model, test.images, test.labels, mean, std, device)
        logger.log({"step": cfg.max_iters, "heldout_accuracy": acc})
        logger.write(f"step {cfg.max_iters}/{cfg.max_iters} | held-out accuracy {100 * acc:.2f} %")
        final_dir = out / "final"
        config = {**cfg.model.to_hf_dict(), "id2label": dict(enumerate(train.classes)), "pixel_mean": mean,
                  "pixel_std": std, "dataset": name, "init": start_from}
        save_pretrained(model, config, final_dir)
        summary = {"steps": cfg.max_iters, "train_wall_s": wall, "s_per_step": wall / max(1, cfg.max_iters - start),
                   "dataset": name, "init": start_from, "train_images": len(train), "heldout_accuracy": acc,
                   "classes": train.classes,
                   "per_class_accuracy": {c: (preds[test.labels == i] == i).float().mean().item()
                                          for i, c in enumerate(train.classes) if (test.labels == i).any()}}
        atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2) + "\n")
        chance = 1 / len(train.classes)
        records = [make_record("hiera_mae", run_name, "heldout_accuracy", acc, "chance", chance, wall,
                               command_line("hiera_mae.train_finetune"))]
        atomic_write_text(out / "results.json", json.dumps(records, indent=2) + "\n")
        logger.write(f"done: {cfg.max_iters} steps in {wall:.0f} s from {start_from} | held-out accuracy "
                     f"{100 * acc:.2f} % | {final_dir}")
        result.update(summary=summary, final_dir=final_dir, accuracy=acc)
    logger.close()
    cleanup()
    return result


if __name__ == "__main__":
    run_main(main, TrainConfig, presets=PRESETS)
