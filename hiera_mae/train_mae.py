"""Masked-autoencoder pretraining of Hiera: hide 60 % of the mask units, reconstruct their pixels.

    python -m hiera_mae.train_mae                           # animal-mnist, about 14 minutes on 2 CPU cores
    python -m hiera_mae.train_mae --dataset mnist
    python -m hiera_mae.train_mae --dataset textile          # 64 px photos: 4 px tokens (dataset defaults)
    python -m hiera_mae.train_mae --dataset moving-mnist     # clips: space-time mask units (train_video.py runs it)
    python -m hiera_mae.train_mae --data-dir photos/ --num-channels 3 --image-size 64 64
    torchrun --nproc_per_node 2 -m hiera_mae.train_mae      # DDP: each rank takes its share of the batch

The objective (MAE sec. 3; Hiera sec. 3.3): for each image draw which mask units stay visible (the same count for
every image, so the batch stays a rectangle), run the encoder on the visible units only, decode every position
with a mask token where a unit was dropped, and score the MSE between the predicted and the true pixels of each
dropped final-stride patch (8 x 8 px here), each patch normalised to mean 0 and variance 1. Predicting 0 for every
patch scores about 1.0; the held-out loss below that is what the encoder has learned about shapes.

Writes to ``--out-dir``: checkpoints/, final/ (HieraForPreTraining weights + config.json with the pixel
statistics), metrics.jsonl (train loss, held-out losses), loss.png, heldout.png, reconstructions.png,
train_summary.json and results.json.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.checkpoint import atomic_write_text, resume_or_start, resume_point, save_checkpoint, save_pretrained
from common.cli import run_main
from common.config import to_flat_dict
from common.data import evenly_spaced
from common.distributed import all_reduce_mean, cleanup, init_distributed, wrap
from common.errors import UserError
from common.results import command_line, make_record
from common.runtime import autocast, pick_device, pick_dtype, seed_everything, set_threads
from common.schedule import clip_grad

from .dataset import ClipConfig, augment, normalize
from .model import HieraConfig, HieraForPreTraining
from .training import (
    dataset_defaults,
    decay_groups,
    draw_reconstructions,
    heldout_loss,
    load_for,
    plot_heldout,
    score_line,
    step_batch,
)


@dataclass
class TrainConfig:
    """MAE pretraining from random weights. MAE's recipe (AdamW, betas 0.9/0.95, wd 0.05, warm-up + cosine,
    normalised-pixel targets) at a CPU's scale."""

    model: HieraConfig = field(default_factory=HieraConfig)
    clips: ClipConfig = field(default_factory=ClipConfig)
    dataset: str = "animal-mnist"  # animal-mnist, mnist, textile or moving-mnist (dataset.py)
    data_dir: str = ""  # your own image folder instead (labels are not used here)
    flip: bool = True  # random horizontal flips (off for digits and motions: dataset defaults)
    shift: int = 2  # random translation by up to this many pixels
    batch_size: int = 128  # images per step (summed over ranks)
    max_iters: int = 3000  # optimizer steps (about 14 minutes on 2 cores for animal-mnist)
    lr: float = 2e-3  # peak learning rate (MAE: 1.5e-4 x batch / 256 for 800 epochs of ImageNet; small data and
    # a short run want more)
    min_lr_ratio: float = 0.01
    warmup_iters: int = 100
    weight_decay: float = 0.05  # on matrices only (MAE's)
    beta2: float = 0.95  # AdamW's second beta (MAE's)
    grad_clip: float = 1.0
    # runtime
    dtype: str = "auto"
    device: str = "auto"
    threads: int = 0
    seed: int = 1234
    eval_every: int = 250  # steps between held-out reconstruction losses
    eval_images: int = 1000  # held-out images scored (evenly spaced; 0 = all)
    save_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 25
    out_dir: str = "runs/hiera_mae/mae"
    resume: bool = False
    run_name: str = ""  # names the records in doc/results.json ("" = mae_<dataset>_cpu)


PRESETS = {
    "cpu": {},
    "gpu4gb": {"embed_dim": 96, "num_heads": [1, 2, 4], "depths": [1, 2, 7], "decoder_hidden_size": 256,
               "decoder_depth": 4, "decoder_num_heads": 8, "batch_size": 256, "max_iters": 20000,
               "warmup_iters": 1000, "lr": 1.5e-3, "eval_every": 1000, "save_every": 1000},
}














def main(cfg: TrainConfig) -> dict:
    dist_info = init_distributed(pick_device(cfg.device).type)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    cfg = dataset_defaults(cfg)
    if not 0 < cfg.model.mask_ratio < 1:
        raise UserError(f"--mask-ratio {cfg.model.mask_ratio}: expected a share in (0, 1)")
    if cfg.batch_size % dist_info.world_size:
        raise UserError(f"--batch-size {cfg.batch_size}: expected a multiple of the {dist_info.world_size} processes")
    n_units = math.prod(cfg.model.mask_spatial_shape)
    if int(n_units * (1 - cfg.model.mask_ratio)) < 1:
        raise UserError(f"--mask-ratio {cfg.model.mask_ratio}: with {n_units} mask units no unit stays visible; "
                        "expected a lower ratio or smaller --masked-unit-size")
    out = Path(cfg.out_dir)
    name = cfg.data_dir or cfg.dataset
    run_name = cfg.run_name or f"mae_{Path(name).name.replace('-', '_')}_cpu"
    train, test, mean, std = load_for(cfg)
    ev = test.images[evenly_spaced(len(test), cfg.eval_images)] if cfg.eval_images else test.images
    model = HieraForPreTraining(cfg.model).to(device)
    if dist_info.is_main:
        print(f"data: {name}, {len(train)} train / {len(test)} held-out inputs {tuple(train.images.shape[1:])} | "
              f"encoder {model.hiera.num_parameters() / 1e6:.2f} M, MAE total "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M | {n_units} mask units, "
              f"{int(n_units * (1 - cfg.model.mask_ratio))} kept | {device} {dtype}", flush=True)
    net = wrap(model, dist_info, "ddp", ())
    optimizer = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, cfg.beta2))
    ckpt_root = out / "checkpoints"
    resume_from = resume_point(ckpt_root, cfg.resume, dist_info.is_main)
    scheduler, start, logger = resume_or_start(model, optimizer, cfg, out, resume_from, device, cfg.min_lr_ratio,
                                               is_main=dist_info.is_main)
    eval_seed = cfg.seed + 99
    first = None
    if start == 0 and dist_info.is_main:
        first = heldout_loss(model, ev, mean, std, eval_seed, device)
        logger.log({"step": 0, **first})
        logger.write(f"step 0 | {score_line(first)}")
    tokens_per_input = int(math.prod(cfg.model.tokens_spatial_shape) * (1 - cfg.model.mask_ratio))
    t_train = time.perf_counter()
    for step in range(start, cfg.max_iters):
        # 1) the batch, its augmentation and its masks depend on (seed, step) only (training.py:step_batch)
        batch, own, g = step_batch(len(train), cfg, step, dist_info.rank, dist_info.world_size)
        x = normalize(augment(train.images[batch], cfg.shift, cfg.flip, g)[own], mean, std).to(device)
        noise = torch.rand(len(batch), n_units, generator=g)[own].to(device)
        # 2) MAE forward: the masks come from the noise (smallest noise = kept)
        with autocast(device, dtype):
            loss = net(x, noise=noise)["loss"]
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
        loss.backward()
        clip_grad(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        done = step + 1
        logger.step(done, all_reduce_mean(loss.item(), dist_info), scheduler.get_last_lr()[0],
                    tokens_per_input * cfg.batch_size)
        if dist_info.is_main and (done % cfg.eval_every == 0 or done == cfg.max_iters):
            h = heldout_loss(model, ev, mean, std, eval_seed, device)
            logger.log({"step": done, **h})
            logger.write(f"step {done}/{cfg.max_iters} | {score_line(h)}")
        if done % cfg.save_every == 0 or done == cfg.max_iters:
            save_checkpoint(ckpt_root, done, model, to_flat_dict(cfg), optimizer, scheduler,
                            keep=cfg.keep_checkpoints, is_main=dist_info.is_main)
    wall = time.perf_counter() - t_train
    result: dict = {"model": model}
    if dist_info.is_main:
        final = heldout_loss(model, test.images, mean, std, eval_seed, device)  # every held-out image
        final_dir = out / "final"
        config = {**cfg.model.to_hf_dict(), "architectures": ["HieraForPreTraining"], "pixel_mean": mean,
                  "pixel_std": std, "dataset": name}
        save_pretrained(model, config, final_dir)
        pics = draw_reconstructions(model, test.images[evenly_spaced(len(test), 4 if len(cfg.model.image_size) == 3
                                                                     else 8)], mean, std,
                                    out / "reconstructions.png", seed=eval_seed,
                                    title=f"{name}: held-out, {100 * cfg.model.mask_ratio:.0f} % of the mask units "
                                          f"hidden (step {cfg.max_iters})")
        summary = {"steps": cfg.max_iters, "train_wall_s": wall, "s_per_step": wall / max(1, cfg.max_iters - start),
                   "dataset": name, "encoder_params": model.hiera.num_parameters(),
                   "initial": first, "final": final}
        atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2) + "\n")
        cmd = command_line("hiera_mae.train_mae")
        records = [make_record("hiera_mae", run_name, "heldout_masked_unit_loss", final["heldout_loss"],
                               "predict_zero", final["zero_loss"], wall, cmd),
                   make_record("hiera_mae", run_name, "heldout_content_patch_loss", final["content_loss"],
                               "predict_zero", final["content_zero_loss"], wall, cmd)]
        atomic_write_text(out / "results.json", json.dumps(records, indent=2) + "\n")
        logger.write(f"done: {cfg.max_iters} steps in {wall:.0f} s | {score_line(final)} | {final_dir} | {pics}")
        result.update(summary=summary, final_dir=final_dir)
    logger.close()
    if dist_info.is_main:
        from common.log import read_metrics
        plot_heldout(read_metrics(out / "metrics.jsonl"), out / "heldout.png")
    cleanup()
    return result


if __name__ == "__main__":
    run_main(main, TrainConfig, presets=PRESETS)
