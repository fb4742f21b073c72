"""Train CLIP from scratch on image-caption pairs: each image against every caption of the batch.

    python -m clip.train_clip                      # easy-VQA shapes, ~10 minutes on 2 CPU cores
    python -m clip.train_clip --loss siglip        # the sigmoid loss of SigLIP instead of InfoNCE
    python -m clip.train_clip --swap-negatives place,size,tint   # more swapped captions (README, lesson 4)
    python -m clip.train_clip --data-file pairs.csv --valid-file valid.csv   # your own (filepath,title)
    torchrun --nproc_per_node 2 -m clip.train_clip # features gathered across ranks: the global batch's negatives

The loss (paper fig. 3): L = (CE(logits_per_image, diag) + CE(logits_per_text, diag)) / 2 over the B x B
similarity matrix; the diagonal holds the true pairs, the other B - 1 entries of a row are the negatives.
With few negatives (small B) the softmax has little to push against; SigLIP (Zhai et al. 2023) scores
every pair on its own, sigmoid(t <i, j> + b) against 1 on the diagonal and 0 elsewhere (``--loss siglip``).
By default each image also meets its own caption with the place words changed, one more negative that only a
model reading the place can reject (NegCLIP; ``--swap-negatives``).

Writes to ``--out-dir``: checkpoints/, final/ (model.safetensors, config.json, tokenizer/), metrics.jsonl,
loss.png, train_summary.json (zero-shot and retrieval on the test split) and results.json.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import resume_or_start, resume_point, save_checkpoint, save_pretrained
from common.cli import run_main
from common.distributed import all_reduce_mean, cleanup, gather_with_grad, init_distributed, wrap
from common.errors import UserError
from common.results import command_line, make_record
from common.runtime import autocast, pick_device, pick_dtype, seed_everything, set_threads
from common.schedule import clip_grad

from .dataset import SWAPPABLE, augment, hard_negative_partners, load_data, shift_ranges, swapped_caption
from .model import MAX_LOGIT_SCALE, MODEL_PRESETS, CLIPConfig, CLIPModel
from .scoring import evaluate
from .tokenizer import encode, load_or_train_tokenizer


@dataclass
class TrainConfig:
    """Contrastive image-text pretraining of both towers from random weights."""

    # the model (the cpu preset's); vocab_size is set from the tokenizer
    model: CLIPConfig = field(default_factory=lambda: CLIPConfig(**MODEL_PRESETS["cpu"]))
    loss: str = "infonce"  # infonce (CLIP's softmax over the batch) or siglip (a sigmoid per pair)
    # data: easy-VQA by default; your own as CSV/JSONL of filepath,title (dataset.py)
    data_file: str = ""  # training pairs
    valid_file: str = ""  # held-out pairs for retrieval (required with --data-file)
    tokenizer_dir: str = "runs/clip/tokenizer"  # trained on the training captions if it holds none
    augment: bool = True  # random shifts of up to 2 pixels that keep the shape in its grid cell (no flips,
    # no colour jitter: the caption says them)
    hard_negatives: bool = True  # half of each batch: pictures that differ from the other half in shape only
    place_negatives: bool = False  # half of those partners differ in the grid cell instead of the shape
    tint_partners: bool = False  # partners share the background tint too (lesson 4: shape up, retrieval down)
    # (dataset.py:hard_negative_partners; easy-VQA only, your own data has no attributes to match)
    swap_negatives: str = "place"  # each image also meets its own caption with this attribute changed (NegCLIP;
    # comma-separated, one drawn per image, a word given twice drawn twice as often: place, size, tint, color,
    # shape; "" for none; easy-VQA only; dataset.py:swapped_caption)
    sincos_positions: bool = True  # start the ViT's learned positions at a 2-D sin-cos table (model.py)
    sincos_scale: float = 1.0  # its amplitude (at 0.1 the place stayed near chance: README, lesson 4)
    # optimisation (CLIP's: AdamW beta2 0.98, eps 1e-6, weight decay 0.2 on matrices only)
    batch_size: int = 32  # pairs per step (summed over ranks): each image meets batch_size - 1 wrong captions
    # (32: more steps in the same time; zero-shot needs steps, retrieval a wide batch: README, lesson 3)
    max_iters: int = 2400  # optimizer steps (about 7 minutes at batch 32 on 2 cores)
    lr: float = 1e-3  # peak learning rate (cosine to lr * min_lr_ratio)
    min_lr_ratio: float = 0.1
    warmup_iters: int = 60
    weight_decay: float = 0.2  # on matrices; none on gains, biases, embeddings' class token and logit_scale
    grad_clip: float = 1.0
    # runtime
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16
    device: str = "auto"
    threads: int = 0
    distributed: str = "ddp"  # ddp or fsdp, under torchrun
    seed: int = 1234
    eval_every: int = 600  # steps between held-out evaluations
    save_every: int = 300
    keep_checkpoints: int = 2
    log_every: int = 25
    out_dir: str = "runs/clip/train"
    resume: bool = False
    run_name: str = ""  # names the records in doc/results.json ("" = clip_<loss>_b<batch_size>_cpu)


PRESETS = {"cpu": {}, "gpu4gb": {**MODEL_PRESETS["gpu4gb"], "batch_size": 128, "max_iters": 5000, "lr": 5e-4,
                                 "warmup_iters": 500, "eval_every": 500, "save_every": 500}}


# ---------------------------------------------------------------------------------------------------
# The two losses
# ---------------------------------------------------------------------------------------------------

def infonce_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor | None = None,
                 offset: int = 0) -> torch.Tensor:
    """CLIP's symmetric InfoNCE. Row i of logits_per_image (B, B) is a B-way classification whose answer is
    caption i, row j of logits_per_text one whose answer is image j; the mean of the two cross-entropies.
    Under torchrun a rank holds its own rows only, (B_local, B_global), whose answers start at ``offset``."""
    if logits_per_text is None:
        logits_per_text = logits_per_image.t()
    labels = offset + torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(logits_per_image: torch.Tensor, logit_bias: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """SigLIP: -1/B sum_ij log sigmoid(z_ij (logits_ij + b)), z = +1 for a true pair and -1 otherwise. Every
    pair is its own binary problem, so the loss needs no softmax over the batch (Zhai et al. 2023, alg. 1).
    Rows (images) may be this rank's only, (B_local, B_global), their true captions starting at ``offset``."""
    B, N = logits_per_image.shape
    z = -torch.ones(B, N, device=logits_per_image.device)
    z[torch.arange(B), offset + torch.arange(B)] = 1.0
    return -F.logsigmoid(z * (logits_per_image + logit_bias)).sum() / B


class ContrastiveLoss(nn.Module):
    """The loss of ``kind`` on a rank's rows of the logits; SigLIP's bias b is its learned parameter (init
    -10, as the paper: the one positive among B - 1 negatives starts near its prior)."""

    def __init__(self, kind: str):
        super().__init__()
        if kind not in ("infonce", "siglip"):
            raise UserError(f"--loss {kind}: expected infonce or siglip")
        self.kind = kind
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if kind == "siglip" else None

    def forward(self, logits_per_image: torch.Tensor, logits_per_text: torch.Tensor, offset: int = 0,
                swapped: torch.Tensor | None = None) -> torch.Tensor:
        """``swapped`` (B_local,): each image's logit against its own caption with a word changed (NegCLIP):
        InfoNCE gets it as one more column of the image's row (a (B + 1)-way choice), SigLIP as one more pair
        whose answer is 0. The text rows are unchanged: a false caption has no picture to find."""
        if swapped is not None and self.kind == "infonce":
            logits_per_image = torch.cat([logits_per_image, swapped[:, None]], 1)
        if self.kind == "siglip":
            loss = siglip_loss(logits_per_image, self.logit_bias, offset)
            if swapped is not None:
                loss = loss - F.logsigmoid(-(swapped + self.logit_bias)).sum() / logits_per_image.shape[0]
            return loss
        return infonce_loss(logits_per_image, logits_per_text, offset)


def contrastive_logits(net: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, dist_info=None
                       ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """(logits_per_image, logits_per_text, offset, swapped) through the (DDP-wrapped) model's forward. Alone:
    (B, B) each, offset 0. Under torchrun (open_clip's local loss): this rank's B_l images against all B_g captions
    and its B_l captions against all B_g images, (B_l, B_g), its true pairs at columns offset .. offset + B_l;
    the others' features come by a differentiable all_gather. Each rank's loss is then its rows' mean, the
    ranks' mean is the one-process loss, and DDP's average of the gradients is its gradient (a test checks).
    When input_ids holds 2 B_l captions, the second half are the images' swapped captions (--swap-negatives),
    encoded in the same forward; the fourth value is then each image's logit against its own, (B_l,)."""
    out = net(input_ids, pixel_values, attention_mask)
    img, txt = out["image_embeds"], out["text_embeds"]
    scale = (net.module if hasattr(net, "module") else net).logit_scale.exp()
    B = img.shape[0]
    swapped = scale * (img * txt[B:]).sum(-1) if txt.shape[0] == 2 * B else None
    txt = txt[:B]
    if dist_info is None or not dist_info.enabled:
        logits = scale * img @ txt.t()
        return logits, logits.t(), 0, swapped
    all_img, all_txt = gather_with_grad(img, dist_info), gather_with_grad(txt, dist_info)
    return scale * img @ all_txt.t(), scale * txt @ all_img.t(), dist_info.rank * B, swapped


def decay_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups: decay on the weight matrices of the layers; none on gains, biases, logit_scale and
    logit_bias (ndim < 2, open_clip's exclusion), nor on the embeddings (token, position, patch, class)."""
    decay, no_decay = [], []
    for m in modules:
        for name, p in m.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------

# Copied from bert_address_cls/training.py::epoch_order
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch: a function of (seed, epoch) only, so --resume sees the same batches."""
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return order


def with_partners(anchors: list[int], partners: list[list[int]], n: int, rng: random.Random) -> list[int]:
    """The anchors, then one hard negative for each (a partner not yet in the batch; a random image when all
    of its partners are): every image appears once, so no caption is a false negative of its own picture."""
    batch, seen = list(anchors), set(anchors)
    for a in anchors:
        choices = [p for p in partners[a] if p not in seen]
        pick = rng.choice(choices) if choices else next(i for i in rng.sample(range(n), n) if i not in seen)
        batch.append(pick)
        seen.add(pick)
    return batch


def main(cfg: TrainConfig) -> dict:
    dist_info = init_distributed(pick_device(cfg.device).type)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    run_name = cfg.run_name or f"clip_{cfg.loss}_b{cfg.batch_size}_cpu"
    if cfg.batch_size % dist_info.world_size:
        raise UserError(f"--batch-size {cfg.batch_size}: expected a multiple of the {dist_info.world_size} processes")
    loss_fn = ContrastiveLoss(cfg.loss).to(device)  # first: a bad --loss is reported before any work
    swaps = [a.strip() for a in cfg.swap_negatives.split(",") if a.strip()]
    if set(swaps) - set(SWAPPABLE):
        raise UserError(f"--swap-negatives {cfg.swap_negatives}: expected some of {', '.join(SWAPPABLE)}")
    t0 = time.perf_counter()
    train, valid = load_data(cfg.data_file, cfg.valid_file, cfg.model.image_size)
    tok = load_or_train_tokenizer(cfg.tokenizer_dir, [c for caps in train.captions for c in caps],
                                  cfg.model.vocab_size, cfg.model.max_position_embeddings)
    mcfg = replace(cfg.model, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   bos_token_id=tok.bos_token_id)
    if cfg.loss == "siglip":  # open_clip's SigLIP start: t = ln 10 (the bias starts at -10, ContrastiveLoss)
        mcfg = replace(mcfg, logit_scale_init_value=math.log(10.0))
    model = CLIPModel(mcfg)
    if cfg.sincos_positions:
        model.vision_model.embeddings.init_sincos_positions(cfg.sincos_scale)
    model = model.to(device)
    if dist_info.is_main:
        print(f"data: {len(train.pixels)} train / {len(valid.pixels)} held-out pairs | vocab {len(tok)} | "
              f"model {model.num_parameters() / 1e6:.2f} M | loss {cfg.loss} | {device} {dtype} | "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    net = wrap(model, dist_info, cfg.distributed, ())
    trained = nn.ModuleDict({"model": model, "loss": loss_fn})  # what a checkpoint holds (SigLIP's bias too)
    optimizer = torch.optim.AdamW(decay_groups([trained], cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    ckpt_root = out / "checkpoints"
    resume_from = resume_point(ckpt_root, cfg.resume, dist_info.is_main)
    scheduler, start, logger = resume_or_start(trained, optimizer, cfg, out, resume_from, device, cfg.min_lr_ratio,
                                               is_main=dist_info.is_main)
    first = evaluate(model, tok, valid, device, dtype) if start == 0 and dist_info.is_main else None
    if first:
        logger.write(f"step 0 | {first['line']}")
    local_bs = cfg.batch_size // dist_info.world_size
    partners = (hard_negative_partners(train.items, place=cfg.place_negatives, same_tint=cfg.tint_partners)
                if cfg.hard_negatives and train.items else None)
    per_step = cfg.batch_size // 2 if partners else cfg.batch_size  # images drawn from the epoch's order
    steps_per_epoch = len(train.pixels) // per_step
    ranges = shift_ranges(train.items, cfg.model.image_size) if train.items else None  # shifts that keep the place
    if not train.items and (swaps or cfg.hard_negatives) and dist_info.is_main:
        print("your own pairs: no attributes to match or change, so --hard-negatives and --swap-negatives are off")
    swaps = swaps if train.items else []
    model.train()
    t_train = time.perf_counter()
    for step in range(start, cfg.max_iters):
        epoch, pos = divmod(step, steps_per_epoch)
        batch = epoch_order(len(train.pixels), cfg.seed, epoch)[pos * per_step:(pos + 1) * per_step]
        # the partners, the phrasing and the shifts depend on (seed, step) only: a resumed run draws the same
        rng = random.Random(cfg.seed * 100_003 + step)
        if partners:
            batch = with_partners(batch, partners, len(train.pixels), rng)
        own = slice(dist_info.rank * local_bs, (dist_info.rank + 1) * local_bs)  # this rank's share of the batch
        mine = batch[own]
        phrasing = [rng.randrange(len(train.captions[i])) for i in batch]
        captions = [train.captions[i][t] for i, t in zip(batch, phrasing)]
        pixels = train.pixels[mine]
        if cfg.augment:
            pixels = augment(pixels, torch.Generator().manual_seed(cfg.seed * 100_003 + step),
                             ranges=None if ranges is None else ranges[mine])
        texts = captions[own]
        if swaps:  # one false caption per image, after the true ones
            texts += [swapped_caption(train.items[i], t, rng.choice(swaps), rng) for i, t in zip(mine, phrasing[own])]
        ids, mask = encode(tok, texts, mcfg.max_position_embeddings)
        with autocast(device, dtype):
            per_image, per_text, offset, swapped = contrastive_logits(net, pixels.to(device), ids.to(device),
                                                                      mask.to(device), dist_info)
        loss = loss_fn(per_image.float(), per_text.float(), offset, None if swapped is None else swapped.float())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
        loss.backward()
        if dist_info.enabled and loss_fn.logit_bias is not None:  # SigLIP's bias is outside DDP: average it here
            torch.distributed.all_reduce(loss_fn.logit_bias.grad)
            loss_fn.logit_bias.grad /= dist_info.world_size
        clip_grad(trained.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        with torch.no_grad():  # open_clip: the temperature may not fall below 1/100
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        done = step + 1
        logger.step(done, all_reduce_mean(loss.item(), dist_info), scheduler.get_last_lr()[0], len(batch),
                    logit_scale=model.logit_scale.exp().item())
        if dist_info.is_main and (done % cfg.eval_every == 0 or done == cfg.max_iters):
            ev = evaluate(model, tok, valid, device, dtype)
            logger.log({"step": done, **{k: v for k, v in ev.items() if k != "line"}})
            logger.write(f"step {done}/{cfg.max_iters} | {ev['line']}")
        if done % cfg.save_every == 0 or done == cfg.max_iters:
            save_checkpoint(ckpt_root, done, trained, mcfg.to_hf_dict(), optimizer, scheduler,
                            keep=cfg.keep_checkpoints, is_main=dist_info.is_main)
    wall = time.perf_counter() - t_train
    result = {}
    if dist_info.is_main:
        final = evaluate(model, tok, valid, device, dtype)
        final_dir = out / "final"
        save_pretrained(model, mcfg.to_hf_dict(), final_dir)
        tok.save_pretrained(final_dir / "tokenizer")
        summary = {"steps": cfg.max_iters, "train_wall_s": wall, "loss": cfg.loss, "batch_size": cfg.batch_size,
                   "params": model.num_parameters(), "initial": first, "final": final}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        cmd = command_line("clip.train_clip")
        records = [make_record("clip", run_name, k, final[k], "random_init", first[k] if first else None, wall, cmd)
                   for k in final if k.startswith(("zero_shot_", "i2t_", "t2i_"))]
        (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
        logger.write(f"done: {cfg.max_iters} steps in {wall:.0f} s | {final['line']} | {final_dir}")
        result = {"summary": summary, "final_dir": final_dir}
    logger.close()
    cleanup()
    return {**result, "model": model}


if __name__ == "__main__":
    run_main(main, TrainConfig, presets=PRESETS)
