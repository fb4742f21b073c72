"""Train the 2017 Transformer to translate English -> Chinese (teacher forcing, label smoothing,
the paper's warmup schedule).

    python -m transformer_basics.train_translate                  # CPU default, ~8 minutes
    python -m transformer_basics.train_translate --preset gpu4gb  # bigger model for a 4 GB GPU
    torchrun --nproc_per_node 2 -m transformer_basics.train_translate   # data parallel
    python -m transformer_basics.train_translate --resume         # continue after an interruption

Writes to ``--out-dir``: checkpoints/, final/ (model.safetensors, config.json, both tokenizers),
metrics.jsonl, loss.png. Then run ``python -m transformer_basics.infer`` for BLEU.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from common.checkpoint import model_state, resume_or_start, resume_point, save_checkpoint, save_pretrained
from common.cli import run_main
from common.data import evenly_spaced, subset_note
from common.distributed import all_reduce_mean, cleanup, init_distributed, wrap
from common.results import command_line
from common.runtime import autocast, pick_device, pick_dtype, seed_everything, set_threads
from common.schedule import clip_grad

from .dataset import (
    PAD_ID,
    TranslationData,
    load_tokenizer,
    read_pairs,
    split_pairs,
    train_chinese_chars,
    train_english_bpe,
)
from .model import MODEL_PRESETS, Transformer, TransformerConfig, TransformerDecoderLayer, TransformerEncoderLayer


@dataclass
class TrainConfig:
    """Train the Transformer on English -> Chinese sentence pairs."""

    # the cpu preset's model: pre-LN, dropout 0.2 (model.py, MODEL_PRESETS says why); vocabulary sizes
    # are set from the tokenizers
    model: TransformerConfig = field(default_factory=lambda: TransformerConfig(**MODEL_PRESETS["cpu"]))
    out_dir: str = "runs/transformer_basics/translate"  # checkpoints, metrics.jsonl, loss.png, final/
    data_file: str = ""  # your own JSONL of {"en": ..., "zh": ...}; empty = the zhlib pairs
    hf_dataset: str = ""  # or a Hugging Face dataset in opus format, e.g. Helsinki-NLP/opus-100
    hf_config: str = ""  # its config name, e.g. en-zh
    truncate_len: int = 64  # tokens per side; longer sentences are truncated
    batch_size: int = 32  # sentence pairs per optimizer step (summed over ranks); small batches generalise better here
    max_iters: int = 4500  # optimizer steps (~20 epochs of the 7.3k training pairs; ~8 minutes on 2 cores)
    lr: float = 1.5e-3  # peak learning rate (cosine); with --schedule noam, a multiplier on the paper's formula
    schedule: Literal["noam", "cosine"] = "cosine"  # cosine: warmup then decay to lr/10; noam: the paper's inverse sqrt
    warmup_iters: int = 300  # paper: 4000 of 100k steps; short runs need a short warmup
    label_smoothing: float = 0.1  # paper sec. 5.4: eps_ls = 0.1
    weight_decay: float = 0.0  # the paper uses none
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    eval_every: int = 250  # steps between validation losses
    eval_batches: int = 0  # valid batches per validation loss, evenly spaced (0: the whole split)
    save_every: int = 250  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (infer --average-last N needs N)
    log_every: int = 20  # steps between log lines
    seed: int = 1234  # seeds weights, dropout and the batch order
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    device: str = "auto"  # auto, cpu, cuda, mps
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16
    distributed: Literal["ddp", "fsdp"] = "ddp"  # strategy under torchrun
    resume: bool = False  # continue from the newest checkpoint in out_dir/checkpoints

    RENAMED: ClassVar[dict[str, str]] = {"max_steps": "max_iters", "warmup_steps": "warmup_iters"}  # old flags


PRESETS = {
    # the default: minutes on a laptop CPU
    "cpu": {},
    # fits a 4 GB GPU with room to spare: the paper's base width, 6+6 layers
    "gpu4gb": {**MODEL_PRESETS["gpu4gb"], "batch_size": 64, "max_iters": 4000, "lr": 7e-4, "warmup_iters": 1000},
}


def label_smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, eps: float,
                                 ignore_index: int = PAD_ID) -> torch.Tensor:
    r"""Cross-entropy against the smoothed target (1 - eps) * one_hot + eps / V   (paper sec. 5.4).

    = (1 - eps) * NLL(target) + eps * mean_v(-log p_v), averaged over non-padding positions.
    Smoothing keeps the model from becoming over-confident: it hurts perplexity, helps BLEU.
    logits (B, T, V), target (B, T).

    $$\mathcal{L} = -\sum_{v=1}^{V} \left((1 - \varepsilon)[v = y] + \frac{\varepsilon}{V}\right) \log p_v$$"""
    logp = logits.float().log_softmax(dim=-1)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T)
    smooth = -logp.mean(dim=-1)  # (B, T)
    loss = (1 - eps) * nll + eps * smooth
    keep = target != ignore_index
    return loss[keep].mean()


def load_pairs(cfg: TrainConfig) -> dict[str, list[tuple[str, str]]]:
    """The train/valid/test splits of the chosen data source."""
    pairs = read_pairs(cfg.data_file, cfg.hf_dataset, cfg.hf_config)
    splits = split_pairs(pairs)
    for name, part in splits.items():
        if not part:
            raise ValueError(f"the {name} split is empty: {len(pairs)} pairs are too few (need ~100+)")
    return splits


@torch.no_grad()
def evaluate_loss(model: Transformer, data: TranslationData, batch_size: int, device, dtype,
                  max_batches: int = 0) -> float:
    """Mean per-token NLL (no smoothing) over a whole split, or over ``max_batches`` evenly spaced batches."""
    model.eval()
    total, count = 0.0, 0
    keep = set(evenly_spaced(math.ceil(len(data) / batch_size), max_batches))
    for i, (_, src, tgt) in enumerate(data.batches(batch_size, seed=0, epoch=0, shuffle=False)):
        if i not in keep:
            continue
        src, tgt = src.to(device), tgt.to(device)
        with autocast(device, dtype):
            logits = model(src, tgt[:, :-1])
        n = int((tgt[:, 1:] != PAD_ID).sum())
        total += float(F.cross_entropy(logits.float().transpose(1, 2), tgt[:, 1:], ignore_index=PAD_ID,
                                       reduction="sum"))
        count += n
    model.train()
    return total / count


def main(cfg: TrainConfig) -> dict:
    dist_info = init_distributed(pick_device(cfg.device).type)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    resume_from = resume_point(ckpt_root, cfg.resume, dist_info.is_main)

    # 1) data and tokenizers (learned on the training split only; reloaded when resuming)
    splits = load_pairs(cfg)
    if resume_from is not None:
        src_tok, tgt_tok = load_tokenizer(out / "src_tokenizer.json"), load_tokenizer(out / "tgt_tokenizer.json")
    else:
        src_tok = train_english_bpe([en for en, _ in splits["train"]], cfg.model.src_vocab_size)
        tgt_tok = train_chinese_chars([zh for _, zh in splits["train"]])
        if dist_info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            src_tok.save(str(out / "src_tokenizer.json"))
            tgt_tok.save(str(out / "tgt_tokenizer.json"))
    train = TranslationData(splits["train"], src_tok, tgt_tok, cfg.truncate_len)
    valid = TranslationData(splits["valid"], src_tok, tgt_tok, cfg.truncate_len)

    # 2) model, optimizer (Adam with the paper's betas/eps), schedule
    mcfg = replace(cfg.model, src_vocab_size=src_tok.get_vocab_size(), tgt_vocab_size=tgt_tok.get_vocab_size(),
                   pad_id=PAD_ID)
    model = Transformer(mcfg).to(device)
    if dist_info.is_main:
        print(f"model: {model.num_parameters() / 1e6:.2f} M parameters | {len(train)} train pairs | "
              f"src vocab {mcfg.src_vocab_size} | tgt vocab {mcfg.tgt_vocab_size} | {device} {dtype}")
    # wrap before building the optimizer: FSDP replaces the parameters by sharded ones
    ddp_model = wrap(model, dist_info, cfg.distributed, (TransformerEncoderLayer, TransformerDecoderLayer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9,
                                  weight_decay=cfg.weight_decay)
    scheduler, start_step, logger = resume_or_start(model, optimizer, cfg, out, resume_from, device,
                                                    schedule=cfg.schedule, d_model=mcfg.d_model,
                                                    is_main=dist_info.is_main)
    steps_per_epoch = len(train.batch_indices(cfg.batch_size, cfg.seed, 0))

    # 3) the loop: the data position is a function of the step, so resuming needs only the step
    losses, valid_losses, t_start = [], [], time.perf_counter()
    model.train()
    step = start_step
    while step < cfg.max_iters:
        epoch, b = divmod(step, steps_per_epoch)
        for _, src, tgt in train.batches(cfg.batch_size, cfg.seed, epoch, start=b):
            # each rank takes its share of the global batch
            src, tgt = src[dist_info.rank::dist_info.world_size], tgt[dist_info.rank::dist_info.world_size]
            src, tgt = src.to(device), tgt.to(device)
            # teacher forcing: the decoder reads [BOS] y1..y_{n} and predicts y1..y_n [EOS]
            tgt_in, labels = tgt[:, :-1], tgt[:, 1:]
            with autocast(device, dtype):
                logits = ddp_model(src, tgt_in)
            loss = label_smoothed_cross_entropy(logits, labels, cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_grad(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            loss_value = all_reduce_mean(loss.item(), dist_info)
            losses.append(loss_value)
            logger.step(step, loss_value, scheduler.get_last_lr()[0], int((tgt != PAD_ID).sum()) * dist_info.world_size,
                        epoch=epoch)
            if step % cfg.eval_every == 0 or step == cfg.max_iters:
                vl = evaluate_loss(model, valid, cfg.batch_size, device, dtype, cfg.eval_batches)
                valid_losses.append((step, vl))
                logger.log({"step": step, "valid_loss": vl, "valid_ppl": math.exp(vl)})
                n_batches = math.ceil(len(valid) / cfg.batch_size)
                logger.write(f"step {step}/{cfg.max_iters} | valid loss {vl:.3f} | ppl {math.exp(vl):.1f}"
                             + subset_note(min(cfg.eval_batches or n_batches, n_batches), n_batches, "batches"))
            if step % cfg.save_every == 0 or step == cfg.max_iters:
                save_checkpoint(ckpt_root, step, model, mcfg.to_dict(), optimizer, scheduler,
                                extra={"epoch": epoch, "batch_in_epoch": b}, keep=cfg.keep_checkpoints,
                                is_main=dist_info.is_main)
            if step >= cfg.max_iters:
                break

    wall = time.perf_counter() - t_start
    final_dir = out / "final"
    weights = model_state(model)  # a collective under FSDP: every rank takes part; only rank 0 gets it
    if dist_info.is_main:
        save_pretrained(model, mcfg.to_dict(), final_dir, state=weights)
        src_tok.save(str(final_dir / "src_tokenizer.json"))
        tgt_tok.save(str(final_dir / "tgt_tokenizer.json"))
        summary = {"steps": step, "train_wall_s": wall, "final_train_loss": losses[-1] if losses else None,
                   "valid_loss": valid_losses[-1][1] if valid_losses else None,
                   "n_params": model.num_parameters(), "train_pairs": len(train),
                   "tgt_vocab_size": mcfg.tgt_vocab_size,
                   "command": command_line("transformer_basics.train_translate")}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.write(f"done: {step} steps in {wall:.0f} s | weights in {final_dir}")
    logger.close()
    return {"losses": losses, "valid_losses": valid_losses, "final_dir": final_dir, "out_dir": out,
            "state_dict": weights, "model": model, "wall_s": wall}


if __name__ == "__main__":
    run_main(main, TrainConfig, presets=PRESETS)
    cleanup()  # leave the process group (a no-op without torchrun)
