"""Benchmark one training step of the default model: tokens/s, MFU, peak memory, and our
from-scratch attention against torch's fused ``F.scaled_dot_product_attention``.

    python -m transformer_basics.bench            # 1 thread, best of 3 with the spread
    python -m transformer_basics.bench --device cuda --dtype bf16

Absolute times on a shared machine mean little; the ratios (MFU, ours / fused) are the figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.bench import matmul_peak_flops, mfu, peak_memory_bytes, time_fn, time_interleaved
from common.cli import run_main
from common.runtime import autocast, pick_device, pick_dtype, set_threads

from .model import MODEL_PRESETS, Transformer, TransformerConfig, scaled_dot_product_attention

# sentence pairs per step of each train_translate.py preset (a test keeps them equal)
PRESET_BATCH_SIZE = {"cpu": 32, "gpu4gb": 64}


@dataclass
class BenchConfig:
    """Time a training step and the attention kernel."""

    model_preset: str = "cpu"  # model and batch of train_translate's preset: cpu or gpu4gb (model.py, MODEL_PRESETS)
    batch_size: int = 0  # sentence pairs per step (0 = the preset's)
    seq_len: int = 16  # tokens per side (about the corpus mean plus specials)
    threads: int = 1  # CPU threads; 1 makes runs on a shared machine comparable
    repeats: int = 3  # timed repeats; the best is reported with the spread
    device: str = "auto"  # auto, cpu, cuda, mps
    dtype: str = "auto"  # auto (bf16 on GPU), fp32, bf16
    out: str = "runs/transformer_basics/bench/bench.json"  # where the figures are written


def main(cfg: BenchConfig) -> dict:
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    torch.manual_seed(0)
    if cfg.model_preset not in MODEL_PRESETS:
        raise ValueError(f"--model-preset must be one of {sorted(MODEL_PRESETS)}; got {cfg.model_preset!r}")
    batch_size = cfg.batch_size or PRESET_BATCH_SIZE[cfg.model_preset]
    # vocabulary sizes of the default run: English BPE 4000, Chinese characters ~2.8k
    mcfg = TransformerConfig(**MODEL_PRESETS[cfg.model_preset], tgt_vocab_size=2813)
    mem_before = peak_memory_bytes(device)
    model = Transformer(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    src = torch.randint(4, mcfg.src_vocab_size, (batch_size, cfg.seq_len), device=device)
    tgt = torch.randint(4, mcfg.tgt_vocab_size, (batch_size, cfg.seq_len + 1), device=device)

    def train_step():
        with autocast(device, dtype):
            logits = model(src, tgt[:, :-1])
        loss = F.cross_entropy(logits.float().transpose(1, 2), tgt[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best, spread = time_fn(train_step, repeats=cfg.repeats, warmup=2, device=device)
    tokens = batch_size * cfg.seq_len * 2  # source + target tokens
    tok_s = tokens / best
    # FLOPs of one step, counted per stack: 6 per weight per token (forward 2, backward 4; embeddings
    # are lookups and cost none) plus attention's QK^T and AV (12 * layers * C * keys per token)
    S = T = cfg.seq_len
    n_enc = sum(p.numel() for p in model.encoder.layers.parameters())
    n_dec = sum(p.numel() for p in model.decoder.layers.parameters()) + model.lm_head.weight.numel()
    C, Le, Ld = mcfg.d_model, mcfg.n_encoder_layers, mcfg.n_decoder_layers
    step_flops = batch_size * (S * (6 * n_enc + 12 * Le * C * S) + T * (6 * n_dec + 12 * Ld * C * (T + S)))
    peak = matmul_peak_flops(device, dtype if device.type == "cuda" else torch.float32)

    # attention alone: ours vs the fused kernel, same inputs
    q = torch.randn(batch_size, mcfg.n_heads, 64, mcfg.d_model // mcfg.n_heads, device=device)
    timed = time_interleaved({"ours": lambda: scaled_dot_product_attention(q, q, q),
                              "fused": lambda: F.scaled_dot_product_attention(q, q, q)}, cfg.repeats, device=device)
    (ours_s, ours_spread), (fused_s, fused_spread) = timed["ours"], timed["fused"]
    result = {
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "train_step_s": best, "train_step_spread_s": spread, "tokens_per_s": tok_s,
        "mfu": mfu(1 / best, step_flops, peak), "matmul_peak_gflops": peak / 1e9,
        "preset": cfg.model_preset, "batch_size": batch_size, "n_params": model.num_parameters(),
        "peak_memory_mb": peak_memory_bytes(device) / 2**20, "memory_before_model_mb": mem_before / 2**20,
        "attention_ours_ms": ours_s * 1e3, "attention_ours_spread_ms": ours_spread * 1e3,
        "attention_fused_ms": fused_s * 1e3, "attention_fused_spread_ms": fused_spread * 1e3,
        "attention_ours_over_fused": ours_s / fused_s,
    }
    print(f"train step: {best * 1e3:.0f} ms (spread {spread * 1e3:.0f}) | {tok_s / 1e3:.1f}k tok/s | "
          f"MFU {result['mfu']:.1%} of a measured {peak / 1e9:.0f} GFLOP/s | "
          f"peak mem {result['peak_memory_mb']:.0f} MB (process before the model: {mem_before / 2**20:.0f} MB)")
    print(f"attention (B={batch_size}, T=64): ours {ours_s * 1e3:.2f} ms, fused {fused_s * 1e3:.2f} ms "
          f"-> ours/fused {result['attention_ours_over_fused']:.2f}x")
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_main(main, BenchConfig)
