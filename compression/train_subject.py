"""Train the never-quantised subject: a small Llama on the fourteen training plays, in fp32 from random weights.

    python -m compression.train_subject          # 500 steps, about 8 minutes on 2 cores
    python -m compression.train_subject --resume

Writes runs/compression/subject/final as a transformers directory (config.json, model.safetensors, tokenizer),
loaded by every other script with ``--model subject``. Why it exists: see loading.py (SmolLM2's weights passed
through a 4-bit GGUF grid; these never did).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from common.checkpoint import resume_or_start, resume_point, save_checkpoint
from common.cli import run_main
from common.errors import UserError
from common.results import command_line, make_record
from common.runtime import pick_device, seed_everything, set_threads
from common.schedule import clip_grad

from .dataset import encode, heldout_loss, load_splits, random_windows, token_windows
from .model import SubjectConfig


@dataclass
class SubjectTrainConfig:
    """Train the small never-quantised Llama."""

    model: SubjectConfig = field(default_factory=SubjectConfig)
    tokenizer_vocab: int = 4096  # byte-level BPE trained on the training plays (>= 260)
    text_file: str = ""  # your own UTF-8 text (last 10 % held out); empty: the Shakespeare plays
    batch_size: int = 8  # sequences per step
    max_iters: int = 500  # optimizer steps (about 8 minutes on 2 cores) (>= 1)
    lr: float = 2e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * this
    warmup_iters: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_windows: int = 16  # held-out windows per evaluation (>= 1)
    device: str = "auto"
    threads: int = 0  # CPU threads (0 = torch's default)
    seed: int = 1234
    eval_every: int = 100
    save_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 50
    out_dir: str = "runs/compression/subject"
    resume: bool = False
    run_name: str = "subject_cpu"  # names this run's records in doc/results.json


def train_tokenizer(text: str, vocab: int):
    """A byte-level BPE of ``vocab`` tokens learned from ``text``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


def main(cfg: SubjectTrainConfig) -> dict:
    from transformers import LlamaForCausalLM

    if cfg.tokenizer_vocab < 260:
        raise UserError(f"--tokenizer-vocab {cfg.tokenizer_vocab}: expected >= 260 (256 bytes + specials)")
    device = pick_device(cfg.device)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    resume_from = resume_point(out / "checkpoints", cfg.resume)

    # 1) data: a tokenizer learned from the training text (kept with the checkpoints, so --resume reuses it)
    train_text, held_text = load_splits(cfg.text_file)
    tok_dir = out / "tokenizer"
    if resume_from is not None and (tok_dir / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    else:
        tok = train_tokenizer(train_text, cfg.tokenizer_vocab)
        tok.save_pretrained(str(tok_dir))
    train_ids = encode(tok, train_text)
    seq = cfg.model.max_position_embeddings
    vx = token_windows(tok, held_text, seq, cfg.eval_windows, "the held-out text")

    # 2) the model: transformers' Llama, so that every other script loads it exactly as it loads SmolLM2
    mcfg = replace(cfg.model, vocab_size=len(tok))
    model = LlamaForCausalLM(mcfg.to_llama()).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler, start, logger = resume_or_start(model, optimizer, cfg, out, resume_from, device, cfg.min_lr_ratio)
    logger.write(f"subject: {model.num_parameters() / 1e6:.2f} M parameters | {len(train_ids) / 1e6:.2f} M training "
                 f"tokens | {vx.numel():,} held-out tokens | vocab {len(tok)}")
    if start == 0:
        logger.log({"step": 0, "valid_loss": heldout_loss(model, vx)})

    # 3) the loop: the batch is a function of (seed, step), so --resume needs only the step
    t0, losses, valid = time.perf_counter(), [], None
    model.train()
    for step in range(start, cfg.max_iters):
        x = random_windows(train_ids, seq, cfg.batch_size, cfg.seed * 100_003 + step).to(device)
        loss = model(x, labels=x).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        logger.step(step + 1, loss.item(), scheduler.get_last_lr()[0], x.numel())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_iters:
            valid = heldout_loss(model, vx)
            logger.log({"step": step + 1, "valid_loss": valid})
            logger.write(f"step {step + 1}/{cfg.max_iters} | valid loss {valid:.3f} | ppl {math.exp(valid):.1f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_iters:
            save_checkpoint(out / "checkpoints", step + 1, model, mcfg.__dict__, optimizer, scheduler,
                            keep=cfg.keep_checkpoints)
    wall = time.perf_counter() - t0

    # 4) the transformers directory (save_pretrained writes safetensors; the rename makes it atomic)
    valid = heldout_loss(model, vx) if valid is None else valid
    final = out / "final"
    tmp = out / "final.tmp"
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if final.exists():
        import shutil

        shutil.rmtree(final)
    tmp.rename(final)
    summary = {"steps": cfg.max_iters, "train_wall_s": wall, "valid_loss": valid, "valid_ppl": math.exp(valid),
               "n_params": model.num_parameters(), "vocab": len(tok)}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    records = [make_record("compression", cfg.run_name, "subject_valid_ppl", math.exp(valid), "uniform", len(tok),
                           wall, command_line("compression.train_subject"))]
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    logger.write(f"done: {cfg.max_iters} steps in {wall:.0f} s | held-out ppl {math.exp(valid):.1f} | {final}")
    logger.close()
    return {"losses": losses, "summary": summary, "out_dir": out, "final": final}


if __name__ == "__main__":
    run_main(main, SubjectTrainConfig)
