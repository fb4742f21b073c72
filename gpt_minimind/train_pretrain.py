"""Pretraining: next-token prediction on raw text.

    python -m gpt_minimind.train_pretrain                       # the cpu preset, minutes on 2 cores
    python -m gpt_minimind.train_pretrain --preset gpu4gb       # minimind-small, one 4 GB GPU
    torchrun --nproc_per_node 2 -m gpt_minimind.train_pretrain  # DDP (add --distributed fsdp for FSDP2)
    python -m gpt_minimind.train_pretrain --text-file input.txt --tokenizer char --num-hidden-layers 4 \\
        --num-attention-heads 4 --hidden-size 128 --max-position-embeddings 64 --batch-size 12 --max-iters 2000

The objective, for a block of ids x_0 .. x_T: inputs x_0..x_{T-1}, labels x_1..x_T, loss = mean over t of
-log p(x_{t+1} | x_<=t). Everything else here is the machinery every LLM run has: packing, a warmup +
cosine schedule, AdamW with weight decay on matrices only, gradient accumulation and clipping, mixed
precision, gradient checkpointing, optional torch.compile, DDP/FSDP, checkpoints and --resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch

from common.checkpoint import (
    load_weights,
    model_state,
    resume_or_start,
    resume_point,
    save_checkpoint,
    save_pretrained,
)
from common.cli import run_main
from common.data import evenly_spaced, subset_note
from common.distributed import all_reduce_mean, cleanup, init_distributed, wrap
from common.results import command_line, make_record
from common.runtime import autocast, cpu_bf16_support, pick_device, pick_dtype, seed_everything, set_threads
from common.schedule import accumulation_slices, clip_grad

from . import engine
from .dataset import PackedBlocks, ngram_baselines
from .model import MODEL_PRESETS, MiniMindConfig, MiniMindDecoderLayer, MiniMindForCausalLM
from .tokenizer import load_streams


@dataclass
class PretrainConfig:
    """Pretrain a small Llama-style model. The model's flags are MiniMindConfig's fields (transformers' names)."""

    # the model. vocab_size 0: the tokenizer's (another value must equal it); max_position_embeddings is also
    # the training block length (nanoGPT's block_size): the model trains at the context it will be used with
    model: MiniMindConfig = field(default_factory=lambda: MiniMindConfig(**MODEL_PRESETS["cpu"], vocab_size=0,
                                                                         max_position_embeddings=256))
    loss_chunk_size: int = 256  # > 0: the head + loss in chunks of this many positions (engine.py:ChunkedLossCausalLM:
    # no stored logits, faster in fp32 and bf16: python -m gpt_minimind.bench); 0 = model.py's plain loss
    cpu_bf16_recipe: bool = True  # bf16 on a CPU: the written-out attention, faster there than sdpa's kernel (bench.py)
    # data
    tokenizer: str = "bpe"  # bpe (the trained tokenizer directory) or char (one token per character)
    tokenizer_dir: str = "runs/gpt_minimind/tokenizer"  # from train_tokenizer.py (trained here if missing)
    data_file: str = ""  # minimind-format JSONL, {"text": ...} per line
    text_file: str = ""  # a plain text file: first 90% train, last 10% valid (nanoGPT's split)
    hf_dataset: str = ""  # a Hugging Face dataset with a "text" column, streamed
    max_documents: int = 0  # use at most this many documents (0 = all)
    # optimisation
    batch_size: int = 16  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 0  # optimizer steps; 0 = what fits ~9.5 minutes on 2 cores at the cpu preset: 3,300 in bf16,
    # 2,100 in fp32 (the precision --dtype auto picks; README, "Measured results")
    lr: float = 2e-3  # peak learning rate; small models take large rates
    min_lr_ratio: float = 0.1  # the cosine ends at lr * this
    warmup_iters: int = 0  # linear warmup steps (0 = a tenth of max_iters, as the sweep)
    weight_decay: float = 0.1  # on matrices only (embeddings too, not the norms' gains), as nanoGPT
    beta2: float = 0.95  # Adam's second-moment decay; 0.95 is steadier than 0.999 for LLMs
    grad_clip: float = 1.0  # clip the global gradient norm
    # runtime
    dtype: str = "auto"  # auto: bf16 on GPUs and CPUs that have it natively, fp16 on other GPUs, else fp32
    compile: bool = False  # torch.compile the model (slow first step; faster after, mostly on GPU)
    device: str = "auto"  # auto, cpu, cuda, mps
    threads: int = 0  # CPU threads (0 = torch's default)
    distributed: str = "ddp"  # ddp or fsdp, used under torchrun
    seed: int = 1234
    eval_every: int = 400  # steps between validation losses
    eval_blocks: int = 128  # validation blocks used during training (the end evaluates the whole split)
    save_every: int = 400  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept
    log_every: int = 100  # steps between log lines
    out_dir: str = "runs/gpt_minimind/pretrain"  # checkpoints, metrics.jsonl, loss.png, final/
    resume: bool = False  # continue from the newest checkpoint in out_dir/checkpoints
    run_name: str = "pretrain_cpu"  # names this run's records in doc/results.json
    # prompts for the samples printed at the end, in the corpus' own register (news openings)
    samples: list[str] = field(default_factory=lambda: ["据新华社报道，", "记者获悉，", "近日，北京市"])

    # the flags of the previous release (nanoGPT's short names), kept for one release
    RENAMED: ClassVar[dict[str, str]] = {
        "dim": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
        "n_kv_head": "num_key_value_heads", "ffn_dim": "intermediate_size", "block_size": "max_position_embeddings",
        "tie_embeddings": "tie_word_embeddings", "n_experts": "num_experts", "experts_per_tok": "num_experts_per_tok",
        "shared_expert_dim": "shared_expert_intermediate_size"}


PRESETS = {  # the model sizes are model.py's MODEL_PRESETS; the rest is how to train them
    "cpu": {},
    "gpu4gb": {**MODEL_PRESETS["gpu4gb"], "max_position_embeddings": 512, "batch_size": 32, "grad_accum": 2,
               "max_iters": 6000, "lr": 1e-3, "warmup_iters": 300, "eval_every": 500, "save_every": 500,
               "eval_blocks": 256, "loss_chunk_size": 2048},  # whole logits: much of the 4 GB (bench.py --memory)
    "full": {**MODEL_PRESETS["full"], "max_position_embeddings": 1024, "batch_size": 16, "grad_accum": 8,
             "max_iters": 20000, "lr": 6e-4, "warmup_iters": 1000, "eval_every": 1000, "save_every": 1000,
             "eval_blocks": 512, "loss_chunk_size": 2048},
}


def subset_blocks(n_blocks: int, max_blocks: int) -> torch.Tensor:
    """Indices of ``max_blocks`` blocks evenly spaced over ``n_blocks`` (all of them when max_blocks <= 0 or
    >= n_blocks): a training-time estimate that sees the whole split's variety, not only its first pages."""
    return torch.tensor(evenly_spaced(n_blocks, max_blocks), dtype=torch.long)


@torch.no_grad()
def evaluate(model: MiniMindForCausalLM, data: PackedBlocks, batch_size: int, device, dtype,
             max_blocks: int = 0) -> tuple[float, int]:
    """Mean next-token NLL (nats/token) and the token count: over every block (max_blocks 0), else over
    ``max_blocks`` blocks spread evenly over the split (the same ones at every evaluation of a run)."""
    model.eval()
    ids = subset_blocks(len(data), max_blocks)
    total, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        x, y = data.get(ids[i:i + batch_size])
        with autocast(device, dtype):
            out = model(x.to(device), labels=y.to(device))
        total += out["lm_loss"].item() * y.numel()
        count += y.numel()
    model.train()
    return total / count, count


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig, device) -> torch.optim.Optimizer:
    """AdamW; weight decay only on >= 2-D weights (matrices), not on norms' gains (nanoGPT, Llama)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, fused=fused)


def generate_text(model: MiniMindForCausalLM, tok: dict, prompt: str, max_new_tokens: int = 40,
                  temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> str:
    device = model.lm_head.weight.device
    ids = ([tok["bos"]] if tok["bos"] is not None else []) + tok["encode"](prompt)
    gen = torch.Generator(device=device).manual_seed(seed)
    new = [int(t) for t in engine.generate(model, torch.tensor([ids], device=device), max_new_tokens,
                                           temperature=temperature, top_k=top_k, eos_token_id=tok["eos"],
                                           generator=gen)]
    if tok["eos"] is not None and new and new[-1] == tok["eos"]:
        new = new[:-1]
    return prompt + tok["decode"](new)


def resolve_steps(cfg: PretrainConfig, dtype: torch.dtype) -> PretrainConfig:
    """max_iters 0: the cpu preset's budget, ~9.5 minutes on 2 cores (3,300 bf16 steps; fp32 steps are
    slower, so 2,100); warmup_iters 0: a tenth of the steps. Explicit values are kept."""
    if cfg.max_iters == 0:
        cfg = replace(cfg, max_iters=3300 if dtype == torch.bfloat16 else 2100)
    if cfg.warmup_iters == 0:
        cfg = replace(cfg, warmup_iters=cfg.max_iters // 10)
    return cfg


def describe_dtype(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The log's first line: which precision and why (a CPU's bf16 is used only where it is native)."""
    name = {torch.float32: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[dtype]
    if requested != "auto":
        return f"{name} (--dtype {requested})"
    if device.type != "cpu":
        return f"{name} ({device.type}: bf16 where supported, else fp16)"
    native, why = cpu_bf16_support()
    return f"{name} ({why}: " + ("native bf16 matrix units; --dtype fp32 to turn it off)" if native
                                 else "bf16 would be emulated, slower than fp32)")


def main(cfg: PretrainConfig) -> dict:
    dist_info = init_distributed(pick_device(cfg.device).type)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device, cpu_bf16=True)
    if dist_info.is_main:
        print(f"dtype: {describe_dtype(cfg.dtype, device, dtype)}")
    cfg = resolve_steps(cfg, dtype)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    resume_from = resume_point(ckpt_root, cfg.resume, dist_info.is_main)

    # 1) data: documents -> token stream -> fixed-length blocks
    t0 = time.perf_counter()
    streams, tok, chars = load_streams(cfg.tokenizer, cfg.tokenizer_dir, cfg.out_dir, cfg.data_file, cfg.text_file,
                                       cfg.hf_dataset, cfg.max_documents)
    block_size = cfg.model.max_position_embeddings  # tokens per training sequence: the context length
    train, valid = PackedBlocks(streams["train"], block_size), PackedBlocks(streams["valid"], block_size)
    data_s = time.perf_counter() - t0

    # 2) model, optimizer, schedule
    if cfg.model.vocab_size not in (0, tok["vocab_size"]):
        raise SystemExit(f"--vocab-size {cfg.model.vocab_size}, but the {cfg.tokenizer} tokenizer has "
                         f"{tok['vocab_size']} tokens: leave --vocab-size at 0 (the tokenizer's)")
    mcfg = replace(cfg.model, vocab_size=tok["vocab_size"])
    if device.type == "cpu" and dtype == torch.bfloat16 and cfg.cpu_bf16_recipe:
        mcfg = replace(mcfg, attn_impl="math")  # the same numbers as sdpa; faster under bf16 on a CPU
    # the reference model, or the same model whose loss runs the head in chunks (engine.py): same weights
    model = (engine.ChunkedLossCausalLM(mcfg, cfg.loss_chunk_size) if cfg.loss_chunk_size
             else MiniMindForCausalLM(mcfg)).to(device)
    ddp_model = wrap(model, dist_info, cfg.distributed, (MiniMindDecoderLayer,))  # before the optimizer
    run_model = torch.compile(ddp_model) if cfg.compile else ddp_model
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    scheduler, start_step, logger = resume_or_start(model, optimizer, cfg, out, resume_from, device,
                                                    cfg.min_lr_ratio, is_main=dist_info.is_main)

    global_batch = cfg.batch_size * cfg.grad_accum * dist_info.world_size  # blocks per optimizer step
    steps_per_epoch = len(train) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train)} training blocks are fewer than one global batch of {global_batch}")
    n_params, n_train, n_valid = model.num_parameters() / 1e6, len(streams["train"]) / 1e6, len(streams["valid"]) / 1e3
    logger.write(f"model: {n_params:.2f} M parameters | train {n_train:.2f} M tokens ({len(train)} blocks of "
                 f"{block_size}), valid {n_valid:.0f} k tokens | vocab {mcfg.vocab_size} | {steps_per_epoch} steps "
                 f"per epoch | {device} {dtype} | data {data_s:.0f} s")
    n_eval = len(subset_blocks(len(valid), cfg.eval_blocks))
    note = subset_note(n_eval, len(valid), "valid blocks")
    if start_step == 0:
        vl, _ = evaluate(model, valid, cfg.batch_size, device, dtype, cfg.eval_blocks)
        logger.log({"step": 0, "valid_loss": vl, "valid_ppl": math.exp(vl), "valid_blocks": n_eval})
        logger.write(f"step 0/{cfg.max_iters} | valid loss {vl:.3f} | ppl {math.exp(vl):.1f}{note}")

    # 3) the loop; the data position is a function of the step, so resuming needs only the step
    losses, valid_losses, t_start = [], [], time.perf_counter()
    model.train()
    step = start_step
    while step < cfg.max_iters:
        epoch, b = divmod(step, steps_per_epoch)
        for _, x, y in train.batches(global_batch, cfg.seed, epoch, start=b):
            x, y = x[dist_info.rank::dist_info.world_size], y[dist_info.rank::dist_info.world_size]  # my share
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            parts = accumulation_slices(len(x), cfg.batch_size)
            for i, part in enumerate(parts):
                # DDP all-reduces gradients in backward; with accumulation, only the last micro-batch needs to
                last = i == len(parts) - 1
                with contextlib.nullcontext() if last or not hasattr(ddp_model, "no_sync") else ddp_model.no_sync():
                    with autocast(device, dtype):
                        out_ = run_model(x[part].to(device), labels=y[part].to(device))
                    loss = out_["loss"] * (part.stop - part.start) / len(x)  # mean over the whole step's batch
                    scaler.scale(loss).backward()
                step_loss += out_["lm_loss"].item() * (part.stop - part.start) / len(x)
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"loss is {step_loss} at step {step}; lower --lr or check the data")
            scaler.unscale_(optimizer)
            clip_grad(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            loss_value = all_reduce_mean(step_loss, dist_info)
            losses.append(loss_value)
            logger.step(step, loss_value, scheduler.get_last_lr()[0], x.numel() * dist_info.world_size, epoch=epoch)
            if step % cfg.eval_every == 0 or step == cfg.max_iters:
                vl, _ = evaluate(model, valid, cfg.batch_size, device, dtype, cfg.eval_blocks)
                valid_losses.append((step, vl))
                logger.log({"step": step, "valid_loss": vl, "valid_ppl": math.exp(vl), "valid_blocks": n_eval})
                logger.write(f"step {step}/{cfg.max_iters} | valid loss {vl:.3f} | ppl {math.exp(vl):.1f}"
                             + note)
            if step % cfg.save_every == 0 or step == cfg.max_iters:
                save_checkpoint(ckpt_root, step, model, mcfg.to_dict(), optimizer, scheduler,
                                extra={"epoch": epoch}, keep=cfg.keep_checkpoints, is_main=dist_info.is_main)
            if step >= cfg.max_iters:
                break
    wall = time.perf_counter() - t_start

    # 4) final: the whole valid split, samples, weights in a standalone directory
    weights = model_state(model)  # a collective under FSDP: every rank takes part; only rank 0 gets it
    summary = {}
    if dist_info.is_main:
        final_model = model
        if dist_info.world_size > 1 and cfg.distributed == "fsdp":  # a sharded model cannot run on one rank
            final_model = load_weights(MiniMindForCausalLM(mcfg).to(device), weights)
        vl, n_tok = evaluate(final_model, valid, cfg.batch_size, device, dtype)
        valid_chars = chars["valid"] * (n_tok / len(streams["valid"]))  # characters in the evaluated blocks
        baselines = ngram_baselines(streams["train"], streams["valid"], mcfg.vocab_size)
        summary = {"steps": step, "train_wall_s": wall, "valid_loss": vl, "valid_ppl": math.exp(vl),
                   "unigram_valid_loss": baselines["unigram"], "bigram_valid_loss": baselines["bigram"],
                   "trigram_valid_loss": baselines["trigram"], "dtype": str(dtype).removeprefix("torch."),
                   "valid_nats_per_char": vl * n_tok / valid_chars, "valid_tokens": n_tok,
                   "initial_valid_loss": math.log(mcfg.vocab_size), "n_params": model.num_parameters(),
                   "train_tokens_seen": step * global_batch * block_size,
                   "train_tokens_per_epoch": len(streams["train"]), "tokenizer": cfg.tokenizer,
                   **{f"{k}_nats_per_char": v * len(streams["valid"]) / chars["valid"] for k, v in baselines.items()}}
        logger.write(f"valid (all {n_tok} tokens), nats/token: model {vl:.3f} | counting trigram "
                     f"{baselines['trigram']:.3f}, bigram {baselines['bigram']:.3f}, unigram {baselines['unigram']:.3f}"
                     f" | the model is {baselines['bigram'] - vl:+.3f} under the bigram table "
                     f"({summary['valid_nats_per_char']:.3f} nats/char)")
        # greedy (the most likely continuation) beside sampled (temperature 0.8, top-k 40), per prompt
        samples = {}
        if cfg.tokenizer == "bpe":
            samples = {p: {"greedy": generate_text(final_model, tok, p, temperature=0.0),
                           "sampled": generate_text(final_model, tok, p)} for p in cfg.samples}
        for texts in samples.values():
            logger.write(f"SAMPLE greedy  {texts['greedy']!r}")
            logger.write(f"SAMPLE sampled {texts['sampled']!r}")
        summary["samples"] = samples
        final_dir = out / "final"
        save_pretrained(model, mcfg.to_dict(), final_dir, state=weights)
        if cfg.tokenizer == "bpe":
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(cfg.tokenizer_dir).save_pretrained(final_dir / "tokenizer")
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        cmd = command_line("gpt_minimind.train_pretrain")
        records = [make_record("gpt_minimind", cfg.run_name, "valid_loss", vl, "bigram_counts",
                               baselines["bigram"], wall, cmd),
                   make_record("gpt_minimind", cfg.run_name, "valid_ppl", math.exp(vl), "bigram_counts",
                               math.exp(baselines["bigram"]), wall, cmd)]
        (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
        logger.write(f"done: {step} steps in {wall:.0f} s | weights in {final_dir}")
    logger.close()
    return {"losses": losses, "valid_losses": valid_losses, "summary": summary, "out_dir": out,
            "state_dict": weights, "model": model, "wall_s": wall}


if __name__ == "__main__":
    run_main(main, PretrainConfig, presets=PRESETS)
    cleanup()  # leave the process group (a no-op without torchrun)
