"""Fine-tune T5 to write a news headline from the article body, text-to-text: "摘要：<body>" -> "<title>".

    python -m t5_summarization.train_summarize                         # from the span-corruption checkpoint
    python -m t5_summarization.train_summarize --init-from "" --out-dir runs/t5_summarization/summarize_random \\
        --run-name random_init_cpu                                     # the control: same budget, random init
    python -m t5_summarization.train_summarize --strategy gradual      # or: adapters
    python -m t5_summarization.train_summarize --data-file lcsts.jsonl # your own {"text", "summary"} JSONL
    python -m t5_summarization.train_summarize --resume

Three fine-tuning strategies (T5 paper sec. 3.5.2 compares them):
    full      every weight trains;
    gradual   gradual unfreezing: at first only the top encoder and decoder blocks (and the final norms)
              train; every ``unfreeze_every`` steps one more block of each stack below them joins, and the
              shared embedding last;
    adapters  the pretrained weights stay frozen; a small bottleneck MLP after every FFN (and the norms)
              trains: a few percent of the parameters.
At the end: character-level ROUGE on the test split for greedy and beam search (evaluation.py), next to
the lead baselines, into train_summary.json and results.json.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from common.checkpoint import (
    load_weights,
    model_state,
    read_config,
    resume_or_start,
    resume_point,
    save_checkpoint,
    save_pretrained,
)
from common.cli import run_main
from common.data import evenly_spaced, subset_note
from common.results import command_line, make_record
from common.runtime import autocast, pick_device, pick_dtype, seed_everything, set_threads
from common.schedule import clip_grad

from .dataset import PAD, Tokenizer, summarization_pairs
from .evaluation import evaluate_split, lead_baselines
from .model import MODEL_PRESETS, T5Config, T5ForConditionalGeneration
from .training import make_optimizer


@dataclass
class SummarizeConfig:
    """Fine-tuning data, strategy, budget, and the decoding used for the final scores."""

    init_from: str = "runs/t5_summarization/pretrain/final"  # pretrained weights ("" = random init, same size)
    # the model. With --init-from, its config.json gives the architecture and only dropout_rate and adapter_dim
    # apply from here; a random init (the control for the pretraining run of the same --preset) is all of it,
    # vocab_size from the tokenizer. T5 fine-tunes with dropout 0.1; adapter_dim: the adapters' bottleneck width
    # (--strategy adapters only)
    model: T5Config = field(default_factory=lambda: T5Config(**MODEL_PRESETS["cpu"], dropout_rate=0.1, adapter_dim=64))
    tokenizer: str = "runs/t5_summarization/tokenizer/spiece.model"  # the chapter's sentencepiece model
    data_file: str = ""  # your own JSONL instead of inews (split 90/5/5 by md5)
    text_field: str = "text"  # body field of --data-file
    summary_field: str = "summary"  # summary field of --data-file
    prefix: str = "摘要："  # task prefix: the text-to-text way of saying which task
    max_source_len: int = 128  # body tokens the encoder sees (~170 characters: the lead matters most in news)
    max_target_len: int = 32  # headline tokens (95 % of inews titles fit in 29)
    strategy: str = "full"  # full, gradual or adapters
    unfreeze_every: int = 100  # gradual: steps between unfreezing one more block per stack
    batch_size: int = 32  # pairs per step
    max_iters: int = 3000  # steps (~14 minutes on 2 CPU cores; ~19 epochs of the 5,034 pairs)
    optimizer: str = "adafactor"  # adafactor (as T5 fine-tunes) or adamw
    lr: float = 3e-2  # peak learning rate (Adafactor: the largest relative step; T5-Base fine-tunes at 1e-3,
    #                 this 2 M model from a short pretraining learns much faster at 3e-2, see the README)
    warmup_iters: int = 50  # linear warmup
    min_lr_ratio: float = 0.1  # cosine floor
    weight_decay: float = 0.01  # AdamW only, on matrices
    grad_clip: float = 1.0  # global norm
    eval_every: int = 500  # steps between dev losses
    eval_batches: int = 0  # dev batches per dev loss, evenly spaced (0: all 935 pairs)
    save_every: int = 500  # steps between checkpoints
    keep_checkpoints: int = 2  # newest kept
    log_every: int = 25  # steps between log lines
    num_beams: int = 4  # final evaluation: beam width
    length_penalty: float = 1.0  # final evaluation: > 0 favours longer headlines
    no_repeat_ngram_size: int = 3  # final evaluation: no trigram twice
    eval_limit: int = 0  # score only the first N test articles (0: all 999)
    max_train_pairs: int = 0  # train on the first N pairs only (0: all; tests use a few dozen)
    out_dir: str = "runs/t5_summarization/summarize"  # checkpoints, metrics.jsonl, loss.png, final/
    resume: bool = False  # continue from the last checkpoint
    seed: int = 1234  # init (random-init control), data order, dropout
    threads: int = 0  # CPU threads (0: torch's default)
    device: str = "auto"  # auto, cpu, cuda, mps
    dtype: str = "auto"  # auto (bf16 on a GPU that has it), fp32, bf16, fp16
    run_name: str = "pretrained_cpu"  # names this run's records in doc/results.json


PRESETS = {"cpu": {}, "gpu4gb": {**MODEL_PRESETS["gpu4gb"], "max_source_len": 512, "batch_size": 32, "max_iters": 6000,
                                 "lr": 1e-3, "eval_every": 500, "save_every": 500, "run_name": "pretrained_gpu4gb"}}


def build_model(cfg: SummarizeConfig, tok: Tokenizer) -> T5ForConditionalGeneration:
    """The pretrained model (its config.json gives the size), or a random one of the size in ``cfg.model``
    (the control for the pretraining run of the same preset)."""
    if cfg.init_from:
        src = read_config(cfg.init_from)
        mcfg = T5Config(**{k: v for k, v in src.items() if k in T5Config.__dataclass_fields__})
    else:
        mcfg = replace(cfg.model, vocab_size=tok.vocab_size)
    mcfg = replace(mcfg, dropout_rate=cfg.model.dropout_rate,
                   adapter_dim=cfg.model.adapter_dim if cfg.strategy == "adapters" else 0)
    model = T5ForConditionalGeneration(mcfg)
    if cfg.init_from:
        from safetensors.torch import load_file

        state = load_file(str(Path(cfg.init_from) / "model.safetensors"))
        if mcfg.adapter_dim:  # the adapters are new: exactly their keys may be missing
            own = model_state(model)  # tied duplicates (embed_tokens, lm_head) dropped, as in the file
            missing = {k for k in own if k not in state}
            assert all(".adapter." in k for k in missing), sorted(missing)[:5]
            state = {**{k: own[k] for k in missing}, **state}
        load_weights(model, state, cfg.init_from)
    return model


def unfreeze_groups(model: T5ForConditionalGeneration) -> list[list[torch.nn.Parameter]]:
    """Gradual unfreezing order: the top block of each stack (with the final norms) first, then one block
    of each stack at a time downwards; the shared embedding (= the tied output head) last."""
    enc, dec = model.encoder.block, model.decoder.block
    groups = []
    for i in range(max(len(enc), len(dec)) - 1, -1, -1):
        groups.append([*(enc[i].parameters() if i < len(enc) else []), *(dec[i].parameters() if i < len(dec) else [])])
    groups[0] += [*model.encoder.final_layer_norm.parameters(), *model.decoder.final_layer_norm.parameters()]
    groups.append([model.shared.weight])
    return groups


def set_trainable(model: T5ForConditionalGeneration, cfg: SummarizeConfig, step: int) -> int:
    """Which parameters learn at ``step`` under the strategy; returns how many of them there are."""
    if cfg.strategy == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif cfg.strategy == "adapters":
        for name, p in model.named_parameters():
            p.requires_grad_(".adapter." in name or "layer_norm" in name)
    elif cfg.strategy == "gradual":
        groups = unfreeze_groups(model)
        n_open = min(len(groups), 1 + step // cfg.unfreeze_every)
        for p in model.parameters():
            p.requires_grad_(False)
        for g in groups[:n_open]:
            for p in g:
                p.requires_grad_(True)
    else:
        raise ValueError(f"strategy must be full, gradual or adapters; got {cfg.strategy!r}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class PairData:
    """Tokenized (source, target) rows; batches shuffled by a generator seeded by (seed, epoch)."""

    def __init__(self, tok: Tokenizer, pairs: list[dict], cfg: SummarizeConfig):
        self.rows = [(tok.encode(cfg.prefix + p["text"], max_len=cfg.max_source_len),
                      tok.encode(p["summary"], max_len=cfg.max_target_len)) for p in pairs]

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: list[int]):
        src = [self.rows[i][0] for i in idx]
        tgt = [self.rows[i][1] for i in idx]
        ws, wt = max(map(len, src)), max(map(len, tgt))
        ids = torch.tensor([r + [PAD] * (ws - len(r)) for r in src])
        labels = torch.tensor([r + [-100] * (wt - len(r)) for r in tgt])
        return ids, (ids != PAD).long(), labels

    def order(self, seed: int, epoch: int) -> list[int]:
        idx = list(range(len(self.rows)))
        random.Random(seed * 1_000_003 + epoch).shuffle(idx)
        return idx


@torch.no_grad()
def dev_loss(model, data: PairData, batch_size: int, device, dtype, max_batches: int = 0) -> float:
    """Mean loss per headline token over the dev split, or over ``max_batches`` evenly spaced batches."""
    model.eval()
    total, n = 0.0, 0
    starts = range(0, len(data), batch_size)
    for i in [starts[j] for j in evenly_spaced(len(starts), max_batches)]:
        ids, mask, labels = data.batch(list(range(i, min(i + batch_size, len(data)))))
        with autocast(device, dtype):
            loss, _ = model(ids.to(device), mask.to(device), labels.to(device))
        k = int((labels != -100).sum())
        total, n = total + loss.item() * k, n + k
    model.train()
    return total / n


def main(cfg: SummarizeConfig) -> dict:
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    out = Path(cfg.out_dir)
    kw = dict(data_file=cfg.data_file, text_field=cfg.text_field, summary_field=cfg.summary_field)
    train_pairs = summarization_pairs("train", **kw)  # first: a bad data file is reported before any other work
    if not Path(cfg.tokenizer).exists():
        raise FileNotFoundError(f"{cfg.tokenizer}: no tokenizer; run python -m t5_summarization.train_pretrain first")
    tok = Tokenizer(cfg.tokenizer)
    train = PairData(tok, train_pairs[: cfg.max_train_pairs] if cfg.max_train_pairs else train_pairs, cfg)
    dev = PairData(tok, summarization_pairs("dev", **kw), cfg)
    model = build_model(cfg, tok).to(device)
    n_total = sum(p.numel() for p in model.parameters())
    n_train = set_trainable(model, cfg, 0)
    print(f"data: {len(train)} train / {len(dev)} dev pairs | model {n_total / 1e6:.1f} M parameters, "
          f"{'pretrained: ' + cfg.init_from if cfg.init_from else 'random init'} | strategy {cfg.strategy}: "
          f"{n_train / 1e6:.2f} M trainable at step 0 | {device} {dtype}", flush=True)
    params = list(model.parameters())
    optimizer = make_optimizer(params, cfg)
    resume_from = resume_point(out / "checkpoints", cfg.resume)
    scheduler, start, logger = resume_or_start(model, optimizer, cfg, out, resume_from, device, cfg.min_lr_ratio)
    n_dev = math.ceil(len(dev) / cfg.batch_size)
    dev_note = subset_note(min(cfg.eval_batches or n_dev, n_dev), n_dev, "batches")
    if start == 0:
        vl = dev_loss(model, dev, cfg.batch_size, device, dtype, cfg.eval_batches)
        logger.log({"step": 0, "valid_loss": vl})
        logger.write(f"step 0/{cfg.max_iters} | dev loss {vl:.3f}{dev_note}")
    steps_per_epoch = len(train) // cfg.batch_size
    losses, t_start, step = [], time.perf_counter(), start
    model.train()
    while step < cfg.max_iters:
        epoch, b = divmod(step, steps_per_epoch)
        order = train.order(cfg.seed, epoch)
        for i in range(b, steps_per_epoch):
            if cfg.strategy == "gradual" and step % cfg.unfreeze_every == 0:
                set_trainable(model, cfg, step)
            ids, mask, labels = train.batch(order[i * cfg.batch_size: (i + 1) * cfg.batch_size])
            with autocast(device, dtype):
                loss, _ = model(ids.to(device), mask.to(device), labels.to(device))
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
            loss.backward()
            clip_grad([p for p in params if p.grad is not None], cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            losses.append(loss.item())
            logger.step(step, loss.item(), scheduler.get_last_lr()[0], ids.numel() + labels.numel(), epoch=epoch)
            if step % cfg.eval_every == 0 or step == cfg.max_iters:
                vl = dev_loss(model, dev, cfg.batch_size, device, dtype, cfg.eval_batches)
                logger.log({"step": step, "valid_loss": vl})
                logger.write(f"step {step}/{cfg.max_iters} | dev loss {vl:.3f}{dev_note}")
            if step % cfg.save_every == 0 or step == cfg.max_iters:
                save_checkpoint(out / "checkpoints", step, model, model.config.to_dict(), optimizer, scheduler,
                                keep=cfg.keep_checkpoints)
            if step >= cfg.max_iters:
                break
    wall = time.perf_counter() - t_start
    logger.close()
    final = out / "final"
    save_pretrained(model, model.config.to_dict(), final)
    (final / "spiece.model").write_bytes(Path(cfg.tokenizer).read_bytes())
    # the scores: test split, greedy and beam, next to the lead baselines
    test = summarization_pairs("test", **kw)
    test = test[: cfg.eval_limit] if cfg.eval_limit else test
    t0 = time.perf_counter()
    scores = evaluate_split(model, tok, test, cfg)
    base = lead_baselines(test)
    summary = {"steps": step, "resumed_at": start, "train_wall_s": wall, "dev_loss": vl, "strategy": cfg.strategy,
               "init_from": cfg.init_from, "test_articles": len(test), "eval_s": time.perf_counter() - t0,
               "greedy": {k: v for k, v in scores["greedy"].items() if k != "outputs"},
               "beam": {k: v for k, v in scores["beam"].items() if k != "outputs"}, "baselines": base,
               "samples": [{"summary": p["summary"], "greedy": g, "beam": b} for p, g, b in
                           list(zip(test, scores["greedy"]["outputs"], scores["beam"]["outputs"]))[:20]]}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if start == 0 and not cfg.eval_limit:
        cmd = command_line("t5_summarization.train_summarize", "python -m t5_summarization.train_summarize"
                           + ("" if cfg.init_from else ' --init-from ""')
                           + ("" if cfg.strategy == "full" else f" --strategy {cfg.strategy}"))
        records = [make_record("t5_summarization", f"{decoder}_{cfg.run_name}", metric, scores[decoder][key],
                               "lead10", base["lead10"][key], wall, cmd)
                   for decoder in ("greedy", "beam") for metric, key in (("rouge1", "rouge1"), ("rouge2", "rouge2"),
                                                                        ("rougeL", "rougeL"))]
        (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    logger.write(f"done: {step} steps in {wall:.0f} s | dev loss {vl:.3f} | test ROUGE-L greedy "
                 f"{scores['greedy']['rougeL']:.1f}, beam {scores['beam']['rougeL']:.1f} (lead-10 "
                 f"{base['lead10']['rougeL']:.1f}) | {final}")
    return {"losses": losses, "summary": summary, "final_dir": final}


if __name__ == "__main__":
    run_main(main, SummarizeConfig, presets=PRESETS)
