"""Structured pruning with a short recovery fine-tune: remove a quarter of every layer's SwiGLU channels (the
model really shrinks: fewer parameters, fewer FLOPs, a plain transformers config), then train briefly on the
training plays to win some of the loss back.

    python -m compression.train_structured                       # SmolLM2, keep 75 % of channels, 60 steps
    python -m compression.train_structured --model subject --mlp-keep 0.5
    python -m compression.train_structured --dense-control     # the same recovery steps on the unpruned model

Held-out perplexity is measured three times: the dense model, right after pruning, after the recovery steps. The
recovery text is Shakespeare too, so fine-tuning alone lowers the held-out perplexity of any model: --dense-control
runs the same steps on the unpruned model, and the honest figure is the gap between the two.
Writes runs/compression/structured/<model>/: metrics.jsonl, loss.png, final/ (a transformers directory that
AutoModelForCausalLM loads with no custom code) and summary.json.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import run_main
from common.errors import UserError
from common.log import RunLogger
from common.results import command_line, make_record
from common.runtime import seed_everything, set_threads
from common.schedule import clip_grad, make_scheduler

from .dataset import encode, load_splits, perplexity, random_windows, token_windows
from .loading import load_model, model_name, resolve_model
from .prune import prune_mlp_channels


@dataclass
class StructuredConfig:
    """Remove MLP channels, then fine-tune to recover."""

    model: str = "smollm2"  # smollm2, subject, or a transformers Llama-family directory
    mlp_keep: float = 0.75  # fraction of SwiGLU channels each layer keeps (<= 1)
    dense_control: bool = False  # skip the pruning: the same fine-tune on the dense model (the control)
    text_file: str = ""  # your own UTF-8 text (last 10 % held out); empty: the Shakespeare plays
    calib_windows: int = 16  # calibration windows for the channel scores (>= 1)
    seq_len: int = 128  # tokens per recovery training window (>= 16)
    batch_size: int = 4  # windows per step
    max_iters: int = 60  # recovery optimizer steps (0 = none)
    lr: float = 1e-4  # peak learning rate
    warmup_iters: int = 5
    grad_clip: float = 1.0
    eval_windows: int = 12  # held-out windows of eval_seq_len, as evaluate.py (>= 1)
    eval_seq_len: int = 512  # tokens per held-out window (>= 16)
    threads: int = 0  # CPU threads (0 = torch's default)
    seed: int = 1234
    log_every: int = 10
    out_dir: str = "runs/compression/structured"
    run_name: str = ""  # names this run's records in doc/results.json (default: structured_<model>)


def main(cfg: StructuredConfig) -> dict:
    if not 0 < cfg.mlp_keep < 1:
        raise UserError(f"--mlp-keep {cfg.mlp_keep}: expected a fraction in (0, 1)")
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    resolve_model(cfg.model)
    name = model_name(cfg.model) + ("_dense_control" if cfg.dense_control else "")
    out = Path(cfg.out_dir) / name
    train_text, held_text = load_splits(cfg.text_file)
    model, tok = load_model(cfg.model)
    vx = token_windows(tok, held_text, cfg.eval_seq_len, cfg.eval_windows, "the held-out text")
    cx = token_windows(tok, train_text, cfg.eval_seq_len, cfg.calib_windows, "the calibration text")
    n_dense = model.num_parameters()
    inter = model.config.intermediate_size
    ppl_dense = perplexity(model, vx)

    # 1) prune: score channels on the calibration text, cut the weights, shrink the config
    t0 = time.perf_counter()
    keep = inter if cfg.dense_control else prune_mlp_channels(model, cx, cfg.mlp_keep)
    prune_s = time.perf_counter() - t0
    ppl_pruned = perplexity(model, vx)
    print(f"{name}: intermediate {inter} -> {keep} | parameters {n_dense / 1e6:.1f} M -> "
          f"{model.num_parameters() / 1e6:.1f} M | ppl dense {ppl_dense:.2f}, pruned {ppl_pruned:.2f}", flush=True)

    # 2) recover: every weight but the (tied) embedding trains on the training plays
    ids = encode(tok, train_text)
    model.train()
    model.model.embed_tokens.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = make_scheduler(opt, "cosine", cfg.warmup_iters, max(cfg.max_iters, 1))
    logger = RunLogger(out, max(cfg.max_iters, 1), log_every=cfg.log_every)
    t0 = time.perf_counter()
    for step in range(cfg.max_iters):
        x = random_windows(ids, cfg.seq_len, cfg.batch_size, cfg.seed * 100_003 + step)
        loss = model(x, labels=x, use_cache=False).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad(params, cfg.grad_clip)
        opt.step()
        sched.step()
        logger.step(step + 1, loss.item(), sched.get_last_lr()[0], x.numel())
    train_s = time.perf_counter() - t0
    ppl_recovered = perplexity(model, vx)
    logger.log({"step": cfg.max_iters, "valid_ppl": ppl_recovered})
    logger.close()

    # 3) the smaller model as a plain transformers directory
    final = out / "final"
    model.save_pretrained(str(final))
    tok.save_pretrained(str(final))
    summary = {"model": name, "intermediate_before": inter, "intermediate_after": keep, "params_before": n_dense,
               "params_after": model.num_parameters(), "ppl_dense": ppl_dense, "ppl_pruned": ppl_pruned,
               "ppl_recovered": ppl_recovered, "recovery_steps": cfg.max_iters, "prune_s": prune_s,
               "train_s": train_s}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    records = [make_record("compression", cfg.run_name or f"structured_{name}", "heldout_ppl", ppl_recovered,
                           "dense", ppl_dense, train_s + prune_s, command_line("compression.train_structured"))]
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    print(f"done: ppl dense {ppl_dense:.2f} -> pruned {ppl_pruned:.2f} -> after {cfg.max_iters} recovery steps "
          f"{ppl_recovered:.2f} ({train_s:.0f} s) | {final}")
    return summary


if __name__ == "__main__":
    run_main(main, StructuredConfig)
