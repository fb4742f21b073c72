"""Pretrain a small DeepSeek-V3 (MLA + DeepSeekMoE + MTP) on the Chinese corpus.

    python -m deepseek_v3.train                         # the cpu preset: bias balancing, one MTP depth, fp32
    python -m deepseek_v3.train --balance none --out-dir runs/deepseek_v3/none        # the controls
    python -m deepseek_v3.train --balance aux --out-dir runs/deepseek_v3/aux
    python -m deepseek_v3.train --num-nextn-predict-layers 0 --out-dir runs/deepseek_v3/no_mtp
    python -m deepseek_v3.train --fp8-sim --out-dir runs/deepseek_v3/fp8                # simulated FP8 GEMMs
    torchrun --nproc_per_node 2 -m deepseek_v3.train    # DDP: the expert loads are summed over processes

loss = CE(next token) + mtp_loss_weight * mean_k CE(token k+1 ahead)  [+ alpha * balance loss, --balance aux]
After every optimizer step with --balance bias: b_i += speed * sign(mean load - load_i) (model.py).
Every evaluation logs the held-out loss of each head and each MoE layer's expert loads (MaxVio);
loads.png draws them over training.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from common.checkpoint import model_state, resume_or_start, resume_point, save_checkpoint, save_pretrained
from common.cli import run_main
from common.distributed import all_reduce_mean, cleanup, init_distributed, wrap
from common.errors import UserError
from common.results import command_line, make_record
from common.runtime import autocast, pick_device, pick_dtype, seed_everything, set_threads
from common.schedule import clip_grad

from .dataset import as_long, batch_at, eval_blocks, load_tokens
from .fp8 import convert_to_fp8_sim
from .model import DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV3TopkRouter, max_violation, update_routing_bias


@dataclass
class TrainConfig:
    """Pretrain a small DeepSeek-V3. The model's flags are DeepseekV3Config's fields (transformers' names)."""

    # the model; vocab_size 0 = the tokenizer's (another value must equal it)
    model: DeepseekV3Config = field(default_factory=lambda: DeepseekV3Config(vocab_size=0))
    # balancing and the extra objectives
    balance: str = "bias"  # bias (V3's auxiliary-loss-free), aux (a balance loss), none
    bias_update_speed: float = 0.01  # gamma: the bias step per optimizer step. V3 uses 0.001 over 14 T tokens at lr
    # 2.2e-4; 600 steps at lr 3e-3 move the router faster than 0.001 can follow (README, "Balancing") (>= 0)
    aux_alpha: float = 0.01  # --balance aux: the weight of the sequence-wise balance loss (>= 0)
    mtp_loss_weight: float = 0.3  # lambda (V3: 0.3 for the first 10 T tokens, then 0.1) (>= 0)
    fp8_sim: bool = False  # run the decoder's linear layers through simulated block-wise FP8 (fp8.py)
    # data
    tokenizer_dir: str = "runs/deepseek_v3/tokenizer"  # byte-level BPE, trained here on first use
    tokenizer_vocab: int = 4096  # the BPE vocabulary trained when tokenizer_dir has none (a small text may give fewer)
    data_file: str = ""  # a JSONL of {"text": ...}; empty: the default corpus
    max_documents: int = 0  # read at most this many documents (0 = all)
    # optimisation
    batch_size: int = 16  # sequences per step (over all processes)
    max_iters: int = 600  # optimizer steps (the cpu preset: about 6 minutes on 2 cores)
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * this
    warmup_iters: int = 60  # linear warmup
    weight_decay: float = 0.1  # on matrices (not norms, not the router)
    grad_clip: float = 1.0
    # runtime
    dtype: str = "fp32"  # fp32, bf16 or auto (the FP8 comparison is against fp32)
    device: str = "auto"
    threads: int = 0  # CPU threads (0 = torch's default)
    seed: int = 1234
    eval_every: int = 100  # steps between held-out evaluations
    eval_batches: int = 24  # held-out blocks used by each evaluation, in batches of batch_size (0 = all)
    save_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 50
    out_dir: str = "runs/deepseek_v3/train"
    resume: bool = False
    run_name: str = "train_cpu"  # names this run's records in doc/results.json


PRESETS = {
    "cpu": {},
    # 57 M parameters (29 M active per token), bf16 autocast, batch 16 x 512: weights, gradients and Adam ~0.9 GB,
    # activations ~1.5 GB (an estimate: make gpu-check measures it against a 3.5 GB cap)
    "gpu4gb": {"hidden_size": 512, "intermediate_size": 1408, "moe_intermediate_size": 256, "num_hidden_layers": 6,
               "num_attention_heads": 8, "q_lora_rank": 256, "kv_lora_rank": 128, "qk_nope_head_dim": 64,
               "qk_rope_head_dim": 32, "v_head_dim": 64, "n_routed_experts": 16, "num_experts_per_tok": 4,
               "n_group": 4, "topk_group": 2, "max_position_embeddings": 512, "original_max_position_embeddings": 512,
               "batch_size": 16, "max_iters": 8000, "lr": 1.5e-3, "warmup_iters": 400, "eval_every": 500,
               "save_every": 1000, "dtype": "bf16", "tokenizer_vocab": 8192,
               "tokenizer_dir": "runs/deepseek_v3/tokenizer8k"},
}


def routers(model: torch.nn.Module) -> dict[str, DeepseekV3TopkRouter]:
    """Each MoE layer's router, named 'layer i' or 'mtp k'."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, DeepseekV3TopkRouter):
            parts = name.split(".")
            out[f"layer {parts[1]}" if parts[0] == "layers" else f"mtp {int(parts[1]) + 1}"] = m
    return out


@torch.no_grad()
def evaluate(model: DeepseekV3ForCausalLM, x: torch.Tensor, y: torch.Tensor, batch_size: int, device, dtype,
             mtp_weight: float) -> dict:
    """Held-out: the main head's loss, each MTP depth's loss, and each MoE layer's expert loads."""
    model.eval()
    named = routers(model)
    for r in named.values():
        r.load.zero_()
    lm, mtp, n = 0.0, None, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        with autocast(device, dtype):
            out = model(xb, labels=yb, mtp_loss_weight=mtp_weight)
        lm += out["lm_loss"].item() * len(xb)
        if out["mtp_losses"]:
            vals = [v.item() * len(xb) for v in out["mtp_losses"]]
            mtp = vals if mtp is None else [a + b for a, b in zip(mtp, vals)]
        n += len(xb)
    loads = {name: r.load.clone() for name, r in named.items()}
    for r in named.values():
        r.load.zero_()
    model.train()
    maxvio = {name: max_violation(v) for name, v in loads.items()}
    main_layers = [v for k, v in maxvio.items() if k.startswith("layer")]
    return {"valid_loss": lm / n, "valid_mtp_losses": [v / n for v in mtp or []],
            "maxvio": maxvio, "maxvio_mean": sum(main_layers) / max(len(main_layers), 1),
            "loads": {k: (v / v.sum()).tolist() for k, v in loads.items()}}


def draw_loads(metrics_path: Path, png: Path) -> Path | None:
    """One panel per MoE layer: each expert's share of the held-out tokens over training (1/E = even)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if '"loads"' in line]
    if not records:
        return None
    names = [k for k in records[0]["loads"] if k.startswith("layer")]
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.6), dpi=100, squeeze=False)
    steps = [r["step"] for r in records]
    for ax, name in zip(axes[0], names):
        shares = torch.tensor([r["loads"][name] for r in records]).T  # (E, evals)
        E = shares.shape[0]
        im = ax.imshow(shares * E, aspect="auto", cmap="magma", vmin=0, vmax=3, origin="lower",
                       extent=(steps[0], max(steps[-1], steps[0] + 1), -0.5, E - 0.5))
        ax.set_title(f"{name}: MaxVio {records[-1]['maxvio'][name]:.2f}", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("expert", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="load / mean load")
    fig.savefig(png)
    plt.close(fig)
    return png


def main(cfg: TrainConfig) -> dict:
    if cfg.balance not in ("bias", "aux", "none"):
        raise UserError(f"--balance {cfg.balance}: expected bias, aux or none")
    if cfg.fp8_sim and cfg.dtype != "fp32":
        raise UserError(f"--fp8-sim with --dtype {cfg.dtype}: the simulation rounds fp32 values through E4M3 and "
                        "keeps fp32 masters and outputs; use --dtype fp32")
    dist_info = init_distributed(pick_device(cfg.device).type)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    resume_from = resume_point(ckpt_root, cfg.resume, dist_info.is_main)
    if cfg.batch_size % dist_info.world_size:
        raise UserError(f"--batch-size {cfg.batch_size}: expected a multiple of the {dist_info.world_size} processes")

    # 1) data: the corpus -> tokens (cached) -> random training windows, consecutive held-out blocks
    t0 = time.perf_counter()
    streams, tok = load_tokens(cfg.tokenizer_dir, cfg.data_file, cfg.max_documents, cfg.tokenizer_vocab)
    streams = as_long(streams)
    block = cfg.model.max_position_embeddings
    vx, vy = eval_blocks(streams["valid"], block, cfg.eval_batches * cfg.batch_size)
    if len(vx) == 0:
        raise UserError(f"--max-position-embeddings {block}: the held-out split has {len(streams['valid'])} tokens, "
                        "not one block; give more text or a shorter context")
    data_s = time.perf_counter() - t0

    # 2) the model (the balance loss only with --balance aux), optionally with simulated FP8 linears
    if cfg.model.vocab_size not in (0, len(tok)):
        raise UserError(f"--vocab-size {cfg.model.vocab_size}: the tokenizer in {cfg.tokenizer_dir} has {len(tok)} "
                        "tokens; leave --vocab-size at 0 (the tokenizer's) or use another --tokenizer-dir")
    mcfg = replace(cfg.model, vocab_size=len(tok), aux_loss_alpha=cfg.aux_alpha if cfg.balance == "aux" else 0.0)
    model = DeepseekV3ForCausalLM(mcfg).to(device)
    n_fp8 = convert_to_fp8_sim(model) if cfg.fp8_sim else 0
    ddp_model = wrap(model, dist_info, "ddp", find_unused=True)  # an expert no token chose gets no gradient
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("gate.weight")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.endswith("gate.weight")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler, start, logger = resume_or_start(model, optimizer, cfg, out, resume_from, device, cfg.min_lr_ratio,
                                               is_main=dist_info.is_main)
    reduce = torch.distributed.all_reduce if dist_info.enabled else None
    speed = cfg.bias_update_speed if cfg.balance == "bias" else 0.0
    logger.write(f"model: {model.num_parameters() / 1e6:.2f} M parameters, {model.num_parameters(True) / 1e6:.2f} M "
                 f"active per token | {len(streams['train']) / 1e6:.2f} M training tokens, {vx.numel() / 1e3:.0f} k "
                 f"held out | balance {cfg.balance} | MTP depth {mcfg.num_nextn_predict_layers} | "
                 f"{'FP8-sim on ' + str(n_fp8) + ' linears' if cfg.fp8_sim else str(dtype).removeprefix('torch.')} "
                 f"| data {data_s:.0f} s")

    def eval_and_log(step: int) -> dict:
        ev = evaluate(model, vx, vy, cfg.batch_size, device, dtype, cfg.mtp_loss_weight)
        logger.log({"step": step, **ev})
        mtp = " | MTP " + ", ".join(f"{v:.3f}" for v in ev["valid_mtp_losses"]) if ev["valid_mtp_losses"] else ""
        logger.write(f"step {step}/{cfg.max_iters} | valid loss {ev['valid_loss']:.3f}{mtp} | MaxVio "
                     + ", ".join(f"{k} {v:.2f}" for k, v in ev["maxvio"].items()))
        return ev

    if start == 0:
        eval_and_log(0)

    # 3) the loop: the batch is a function of the step (resume needs only the step)
    t_start, losses, ev = time.perf_counter(), [], None
    model.train()
    for step in range(start, cfg.max_iters):
        x, y = batch_at(streams["train"], step, cfg.batch_size, block, cfg.seed)
        x, y = x[dist_info.rank::dist_info.world_size].to(device), y[dist_info.rank::dist_info.world_size].to(device)
        with autocast(device, dtype):
            o = ddp_model(x, labels=y, mtp_loss_weight=cfg.mtp_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        o["loss"].backward()
        total = all_reduce_mean(o["loss"].item(), dist_info)  # every rank sees the same value and stops together
        if not math.isfinite(total):
            raise FloatingPointError(f"loss is {total} at step {step}; lower --lr")
        clip_grad(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        loads = update_routing_bias(model, speed, reduce)  # after the step; counts over all processes
        loss_value = all_reduce_mean(o["lm_loss"].item(), dist_info)  # the whole batch's, on every rank
        losses.append(loss_value)
        extra = {"mtp_loss": o["mtp_losses"][0].item()} if o["mtp_losses"] else {}
        if cfg.balance == "aux":
            extra["balance_loss"] = o["balance_loss"].item()
        if loads:
            extra["train_maxvio_mean"] = sum(max_violation(v) for v in loads) / len(loads)
        logger.step(step + 1, loss_value, scheduler.get_last_lr()[0], x.numel() * dist_info.world_size,
                    **extra)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_iters:
            ev = eval_and_log(step + 1)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_iters:
            save_checkpoint(ckpt_root, step + 1, model, mcfg.to_dict(), optimizer, scheduler,
                            keep=cfg.keep_checkpoints, is_main=dist_info.is_main)
    wall = time.perf_counter() - t_start

    # 4) the final model (FP8-sim layers are plain Linear weights: the checkpoint loads into the fp32 model)
    weights = model_state(model)
    summary = {}
    if dist_info.is_main:
        if ev is None:
            ev = evaluate(model, vx, vy, cfg.batch_size, device, dtype, cfg.mtp_loss_weight)
        final = out / "final"
        save_pretrained(model, mcfg.to_dict(), final, state=weights)
        tok.save_pretrained(final / "tokenizer")
        summary = {"steps": cfg.max_iters, "train_wall_s": wall, "balance": cfg.balance, "fp8_sim": cfg.fp8_sim,
                   "mtp_depth": mcfg.num_nextn_predict_layers, "valid_loss": ev["valid_loss"],
                   "valid_mtp_losses": ev["valid_mtp_losses"], "maxvio": ev["maxvio"],
                   "maxvio_mean": ev["maxvio_mean"], "n_params": model.num_parameters(),
                   "n_active_params": model.num_parameters(True), "valid_tokens": vx.numel(),
                   "initial_valid_loss": math.log(mcfg.vocab_size)}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        cmd = command_line("deepseek_v3.train")
        records = [make_record("deepseek_v3", cfg.run_name, "valid_loss", ev["valid_loss"], "uniform",
                               math.log(mcfg.vocab_size), wall, cmd),
                   make_record("deepseek_v3", cfg.run_name, "maxvio_mean", ev["maxvio_mean"], "even_load", 0.0,
                               wall, cmd)]
        (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
        logger.write(f"done: {cfg.max_iters} steps in {wall:.0f} s | valid loss {ev['valid_loss']:.3f} | MaxVio "
                     f"mean {ev['maxvio_mean']:.2f} | weights in {final}")
    logger.close()
    if dist_info.is_main:
        draw_loads(out / "metrics.jsonl", out / "loads.png")
    return {"losses": losses, "summary": summary, "out_dir": out, "model": model, "wall_s": wall}


if __name__ == "__main__":
    run_main(main, TrainConfig, presets=PRESETS)
    cleanup()
