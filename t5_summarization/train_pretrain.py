"""Span-corruption pretraining (T5 paper sec. 3.1.4): drop 15 % of the tokens in spans of mean length 3,
put one sentinel in place of each span, and train the model to write the spans back after their sentinels.

    python -m t5_summarization.train_pretrain              # tokenizer (once), then ~15 minutes on 2 CPU cores
    python -m t5_summarization.train_pretrain --resume     # continue after an interruption
    python -m t5_summarization.train_pretrain --preset gpu4gb

Text: People's Daily paragraphs and the inews *train* articles (never its dev or test split, which the
summarizer is scored on), tokenized once into one stream with </s> between documents and cut into
``seq_len``-token chunks; each step corrupts a batch of chunks with a generator seeded by the step, so
a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import resume_or_start, resume_point, save_checkpoint, save_pretrained
from common.cli import run_main
from common.data import evenly_spaced, subset_note
from common.results import command_line, make_record
from common.runtime import autocast, pick_device, pick_dtype, seed_everything, set_threads
from common.schedule import clip_grad

from .dataset import EOS, PAD, Tokenizer, md5_bucket, pretraining_texts, span_corrupt, train_tokenizer
from .model import MODEL_PRESETS, T5Config, T5ForConditionalGeneration
from .training import make_optimizer


@dataclass
class PretrainConfig:
    """Model size, span corruption and the optimisation of the pretraining run."""

    # the cpu preset's model (T5 v1.1 shape: gated-GELU FFN; the head is tied, see model.py), without dropout
    # as T5 v1.1 pretrains; vocab_size: the sentencepiece pieces trained (the 100 sentinels included)
    model: T5Config = field(default_factory=lambda: T5Config(**MODEL_PRESETS["cpu"], dropout_rate=0.0))
    # span corruption
    seq_len: int = 128  # tokens per chunk before corruption (T5: 512)
    noise_density: float = 0.15  # share of tokens dropped
    mean_span: float = 3.0  # mean length of a dropped span
    # optimisation
    batch_size: int = 32  # chunks per step
    max_iters: int = 4800  # steps (~14 minutes on 2 CPU cores at the default size)
    optimizer: str = "adafactor"  # adafactor (T5's own; steps relative to each weight's scale) or adamw
    lr: float = 3e-2  # peak learning rate (Adafactor: the largest relative step; AdamW: try 2e-3)
    warmup_iters: int = 100  # linear warmup
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    weight_decay: float = 0.01  # AdamW only, on matrices
    grad_clip: float = 1.0  # global norm
    eval_every: int = 500  # steps between validation losses
    eval_batches: int = 10  # held-out batches per validation during training, evenly spaced (0: all); the final: all
    save_every: int = 500  # steps between checkpoints
    keep_checkpoints: int = 2  # newest kept
    log_every: int = 25  # steps between log lines
    # data and paths
    max_documents: int = 0  # use only the first N pretraining documents (0: all; tests use a few hundred)
    tokenizer_dir: str = "runs/t5_summarization/tokenizer"  # spiece.model (+ the token stream cache)
    out_dir: str = "runs/t5_summarization/pretrain"  # checkpoints, metrics.jsonl, loss.png, final/
    resume: bool = False  # continue from the last checkpoint in out_dir
    seed: int = 1234  # init, data order and corruption
    threads: int = 0  # CPU threads (0: torch's default)
    device: str = "auto"  # auto, cpu, cuda, mps
    dtype: str = "auto"  # auto (bf16 on a GPU that has it), fp32, bf16, fp16
    run_name: str = "span_corruption_cpu"  # names this run's records in doc/results.json


PRESETS = {
    "cpu": {},
    "gpu4gb": {**MODEL_PRESETS["gpu4gb"], "seq_len": 256, "batch_size": 64, "max_iters": 20000,
               "warmup_iters": 1000, "lr": 1e-2, "eval_every": 1000, "save_every": 1000,
               "run_name": "span_corruption_gpu4gb"},  # T5's own 1e-2 for the 10x larger model (not measured yet)
}


def ensure_tokenizer(cfg: PretrainConfig) -> Tokenizer:
    """The chapter's sentencepiece model: trained once on the pretraining text (never dev/test)."""
    path = Path(cfg.tokenizer_dir) / "spiece.model"
    if not path.exists():
        t0 = time.perf_counter()
        train_tokenizer(corpus(cfg.max_documents), cfg.tokenizer_dir, vocab_size=cfg.model.vocab_size, seed=cfg.seed)
        print(f"tokenizer: unigram, {cfg.model.vocab_size} pieces, trained in {time.perf_counter() - t0:.0f} s "
              f"-> {path}")
    return Tokenizer(path)


@functools.lru_cache(maxsize=1)
def corpus(max_documents: int) -> tuple[str, ...]:
    """The pretraining documents (the first ``max_documents``, 0: all), read once per process: a fresh
    run needs them twice, for the tokenizer and for the token stream."""
    texts = pretraining_texts()
    return tuple(texts[:max_documents] if max_documents else texts)


def token_streams(tok: Tokenizer, cfg: PretrainConfig) -> dict[str, np.ndarray]:
    """All pretraining documents tokenized into one stream per split (</s> between documents), cached
    next to the tokenizer. Valid = documents whose md5 falls in 2 of 100 buckets."""
    cache = Path(cfg.tokenizer_dir) / f"pretrain_stream_{cfg.max_documents or 'all'}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return {"train": z["train"], "valid": z["valid"]}
    streams: dict[str, list[int]] = {"train": [], "valid": []}
    for text in corpus(cfg.max_documents):
        streams["valid" if md5_bucket(text) < 2 else "train"] += tok.encode(text, eos=True)
    out = {k: np.asarray(v, dtype=np.int32) for k, v in streams.items()}
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(cache)
    return out


def pad_batch(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def corrupted_batch(stream: np.ndarray, tok: Tokenizer, cfg, seed: int):
    """``batch_size`` random chunks, span-corrupted: (input ids, attention mask, labels with -100 on padding)."""
    rng = random.Random(seed)
    n_chunks = len(stream) // cfg.seq_len
    # lazily: each chunk is drawn just before its corruption, from the same generator
    return _span_batch(stream, tok, cfg, ((rng.randrange(n_chunks), rng) for _ in range(cfg.batch_size)))


def _span_batch(stream: np.ndarray, tok: Tokenizer, cfg, picks):
    """Chunks c of the stream, each span-corrupted with its generator rng, for (c, rng) in ``picks``."""
    inputs, targets = [], []
    for c, rng in picks:
        chunk = [int(t) for t in stream[c * cfg.seq_len: (c + 1) * cfg.seq_len] if t != EOS]
        x, y = span_corrupt(chunk, tok.sentinel_ids, rng, cfg.noise_density, cfg.mean_span)
        inputs.append(x)
        targets.append(y)
    ids = pad_batch(inputs, PAD)
    return ids, (ids != PAD).long(), pad_batch(targets, -100)


def corrupted_chunks(stream: np.ndarray, tok: Tokenizer, cfg, chunks: list[int], seed: int):
    """The given ``seq_len``-token chunks of the stream, span-corrupted, chunk c by a generator seeded by
    (seed, c) alone: (input ids, attention mask, labels with -100 on padding)."""
    return _span_batch(stream, tok, cfg, ((c, random.Random(seed * 1_000_003 + c)) for c in chunks))


@torch.no_grad()
def evaluate(model, stream: np.ndarray, tok: Tokenizer, cfg, device, dtype, max_batches: int = 0) -> dict:
    """Span-corruption loss on the held-out stream, per target token (the mean over every target token
    scored, not a mean of batch means): over every non-overlapping ``seq_len`` chunk (max_batches 0: the
    figure the results quote; a last partial chunk is left out), else over ``max_batches * batch_size``
    chunks spread evenly over the stream (a training-time estimate, the same chunks at every evaluation).
    Chunk c is always corrupted the same way (its own generator, seeded by c), so the subset is part of the
    whole, the figure is deterministic, and neither the global RNG nor the training's generators are used.
    Returns {"loss", "chunks" scored, "of_chunks", "targets" (target tokens scored)}."""
    model.eval()
    n_chunks = len(stream) // cfg.seq_len
    picked = evenly_spaced(n_chunks, max_batches * cfg.batch_size)
    total, count = 0.0, 0
    for i in range(0, len(picked), cfg.batch_size):
        ids, mask, labels = corrupted_chunks(stream, tok, cfg, picked[i: i + cfg.batch_size], seed=9_000_000)
        with autocast(device, dtype):
            loss, _ = model(ids.to(device), mask.to(device), labels.to(device))
        n = int((labels != -100).sum())
        total, count = total + loss.item() * n, count + n
    model.train()
    return {"loss": total / count if count else float("nan"), "chunks": len(picked), "of_chunks": n_chunks,
            "targets": count}


def main(cfg: PretrainConfig) -> dict:
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    out = Path(cfg.out_dir)
    t0 = time.perf_counter()
    tok = ensure_tokenizer(cfg)
    streams = token_streams(tok, cfg)
    mcfg = replace(cfg.model, vocab_size=tok.vocab_size)
    model = T5ForConditionalGeneration(mcfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"data: {len(streams['train']) / 1e6:.2f} M train / {len(streams['valid']) / 1e6:.2f} M valid tokens "
          f"({len(streams['train']) // cfg.seq_len:,} chunks of {cfg.seq_len}) | model {n_params / 1e6:.1f} M "
          f"parameters | {device} {dtype} | data {time.perf_counter() - t0:.0f} s", flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    resume_from = resume_point(out / "checkpoints", cfg.resume)
    scheduler, start, logger = resume_or_start(model, optimizer, cfg, out, resume_from, device, cfg.min_lr_ratio)
    first_valid = None  # before and after training: every valid chunk (the figures results.json records)
    if start == 0:
        first = evaluate(model, streams["valid"], tok, cfg, device, dtype)
        first_valid = first["loss"]
        logger.log({"step": 0, "valid_loss": first_valid, "valid_chunks": first["chunks"]})
        logger.write(f"step 0/{cfg.max_iters} | valid loss {first_valid:.3f} (all {first['chunks']:,} chunks; "
                     f"uniform: {math.log(tok.vocab_size):.3f})")
    losses, t_start = [], time.perf_counter()
    model.train()
    for step in range(start + 1, cfg.max_iters + 1):
        ids, mask, labels = corrupted_batch(streams["train"], tok, cfg, seed=cfg.seed * 1_000_003 + step)
        with autocast(device, dtype):
            loss, _ = model(ids.to(device), mask.to(device), labels.to(device))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
        loss.backward()
        clip_grad(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.item())
        logger.step(step, loss.item(), scheduler.get_last_lr()[0], ids.numel() + int((labels != -100).sum()))
        if step % cfg.eval_every == 0 or step == cfg.max_iters:
            ev = evaluate(model, streams["valid"], tok, cfg, device, dtype, cfg.eval_batches)
            logger.log({"step": step, "valid_loss": ev["loss"], "valid_chunks": ev["chunks"]})
            logger.write(f"step {step}/{cfg.max_iters} | valid loss {ev['loss']:.3f}"
                         + subset_note(ev["chunks"], ev["of_chunks"], "chunks"))
        if step % cfg.save_every == 0 or step == cfg.max_iters:
            save_checkpoint(out / "checkpoints", step, model, mcfg.to_dict(), optimizer, scheduler,
                            keep=cfg.keep_checkpoints)
    wall = time.perf_counter() - t_start
    final_ev = evaluate(model, streams["valid"], tok, cfg, device, dtype)
    vl = final_ev["loss"]
    logger.close()
    final = out / "final"
    save_pretrained(model, mcfg.to_dict(), final)
    (final / "spiece.model").write_bytes((Path(cfg.tokenizer_dir) / "spiece.model").read_bytes())
    summary = {"steps": cfg.max_iters, "resumed_at": start, "train_wall_s": wall, "valid_loss": vl,
               "initial_valid_loss": first_valid, "valid_chunks": final_ev["chunks"],
               "valid_targets": final_ev["targets"], "params": n_params}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if start == 0:
        rec = make_record("t5_summarization", cfg.run_name, "valid_loss", vl, "before_pretraining", first_valid, wall,
                          command_line("t5_summarization.train_pretrain"))
        (out / "results.json").write_text(json.dumps([rec], indent=2) + "\n")
    logger.write(f"done: {cfg.max_iters} steps in {wall:.0f} s | valid span-corruption loss {vl:.3f} (all "
                 f"{final_ev['chunks']:,} chunks, {final_ev['targets']:,} target tokens) | {final}")
    return {"losses": losses, "valid_loss": vl, "summary": summary, "final_dir": final, "model": model}


if __name__ == "__main__":
    run_main(main, PretrainConfig, presets=PRESETS)
