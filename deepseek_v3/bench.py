"""Measurements that are not training: the KV cache per token of MLA against MHA and GQA at equal width (from
the real caches: ours, and transformers' Llama cache for the others), and decoding speed: plain greedy with
the latent cache (naive and absorbed MLA) against MTP speculative decoding, with the draft acceptance rate.

    python -m deepseek_v3.bench --ckpt runs/deepseek_v3/train/final
    python -m deepseek_v3.bench --fp8 --device cuda     # the triton kernels against torch._scaled_mm (GPU)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from common.checkpoint import load_pretrained, read_config
from common.cli import run_main
from common.errors import UserError
from common.results import command_line, make_record
from common.runtime import set_threads

from .model import DeepseekV3Config, DeepseekV3ForCausalLM, MLACache, speculative_generate


def kv_cache_bytes(cfg: DeepseekV3Config, tokens: int = 64, gqa_groups: int = 4) -> list[dict]:
    """Bytes per token of the caches that decoding keeps, fp32, measured on filled caches: MLA (ours: the latent
    + the shared RoPE key), and transformers' LlamaForCausalLM at the same width, layers and heads with
    head_dim = Dn + Dr (MHA) or with a quarter of the key/value heads (GQA)."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    ids = torch.randint(0, cfg.vocab_size, (1, tokens))
    ours = DeepseekV3ForCausalLM(replace(cfg, num_nextn_predict_layers=0)).eval()
    cache = MLACache()
    with torch.no_grad():
        ours(ids, cache=cache)
    rows = [{"attention": "MLA", "bytes_per_token": cache.nbytes() // tokens,
             "values_per_token_per_layer": cfg.kv_lora_rank + cfg.qk_rope_head_dim}]
    H = cfg.num_attention_heads
    for name, kv_heads in (("MHA", H), ("GQA", max(H // gqa_groups, 1))):
        lcfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                           num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=H,
                           num_key_value_heads=kv_heads, head_dim=cfg.qk_head_dim,
                           intermediate_size=cfg.intermediate_size)
        llama = LlamaForCausalLM(lcfg).eval()
        kv = DynamicCache(config=lcfg)
        with torch.no_grad():
            llama(ids, cache=kv, use_cache=True)
        total = sum(t.numel() * t.element_size() for layer in kv.layers for t in (layer.keys, layer.values))
        rows.append({"attention": name, "kv_heads": kv_heads, "bytes_per_token": total // tokens,
                     "values_per_token_per_layer": 2 * kv_heads * cfg.qk_head_dim})
    return rows


def decode_speed(model: DeepseekV3ForCausalLM, prompts: list[torch.Tensor], new_tokens: int, repeats: int = 3) -> dict:
    """Tokens/s of plain greedy decoding (naive MLA, absorbed MLA) and of speculative decoding, best of `repeats`,
    run side by side; the acceptance rate of the MTP draft; and whether every output is the same."""
    def timed(fn):
        best, outs = float("inf"), None
        for _ in range(repeats):
            t0 = time.perf_counter()
            outs = [fn(p) for p in prompts]
            best = min(best, time.perf_counter() - t0)
        return best, outs

    t_naive, naive = timed(lambda p: model.generate(p, new_tokens, absorb=False))
    t_absorb, absorbed = timed(lambda p: model.generate(p, new_tokens, absorb=True))
    stats = {"drafted": 0, "accepted": 0, "forward_passes": 0}
    result = {}
    if model.mtp:
        def spec(p):
            out, s = speculative_generate(model, p, new_tokens)
            for k in stats:
                stats[k] += s[k]
            return out
        t_spec, specs = timed(spec)
        n_tok = sum(o.shape[1] for o in specs)
        result = {"speculative_tok_per_s": n_tok / t_spec, "acceptance_rate": stats["accepted"] / stats["drafted"],
                  "speculative_same_as_greedy": all(a.tolist() == b.tolist() for a, b in zip(specs, absorbed)),
                  "tokens_per_forward": n_tok * repeats / stats["forward_passes"]}
    n_tok = sum(o.shape[1] for o in absorbed)
    return {"naive_tok_per_s": n_tok / t_naive, "absorbed_tok_per_s": n_tok / t_absorb,
            "absorbed_same_as_naive": all(a.tolist() == b.tolist() for a, b in zip(naive, absorbed)), **result}


def fp8_error_table(M: int = 256, N: int = 512, K: int = 1024, seed: int = 0) -> list[dict]:
    """Relative error of a @ w^T through E4M3, block-wise (1 x 128 activation tiles, 128 x 128 weight blocks) against
    one scale per tensor, on random activations and on activations whose token scales span 1e8 (1e-4 .. 1e4).
    'worst token' is the largest per-row relative error: where one scale per tensor flushes small tokens to 0."""
    from . import fp8

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    rows = []
    token_scales = torch.logspace(-4, 4, M)[torch.randperm(M, generator=g)][:, None]
    for name, a in (("random", torch.randn(M, K, generator=g)),
                    ("outliers (token scales 1e-4 .. 1e4)", torch.randn(M, K, generator=g) * token_scales)):
        exact = a @ w.T
        qa, sa = fp8.act_quant_ref(a)
        qw, sw = fp8.weight_quant_ref(w)
        block = fp8.fp8_gemm_ref(qa, sa, qw, sw)
        pa, psa = fp8.per_tensor_quant(a)
        pw, psw = fp8.per_tensor_quant(w)
        tensor = (pa.float() * psa) @ (pw.float() * psw).T
        for scaling, approx in (("block-wise", block), ("per-tensor", tensor)):
            per_row = (approx - exact).norm(dim=1) / exact.norm(dim=1)
            rows.append({"activations": name, "scaling": scaling, "relative_error": fp8.relative_error(approx, exact),
                         "worst_token_relative_error": per_row.max().item(),
                         "tokens_flushed_to_zero": int((approx.abs().sum(1) == 0).sum())})
    return rows


def fp8_speed(device: str = "cuda", sizes=((4096, 4096, 4096), (128, 7168, 2048))) -> list[dict]:
    """GPU only: the triton block-wise GEMM against torch._scaled_mm (per-row x per-column scales; the closest
    built-in) and the bf16 GEMM, with the relative error of each against the fp32 product."""
    from . import fp8, kernels

    rows = []
    for M, N, K in sizes:
        a = torch.randn(M, K, device=device)
        b = torch.randn(N, K, device=device) * 0.05
        exact = a @ b.T
        qa, sa = kernels.act_quant(a)
        qb, sb = kernels.weight_quant(b)

        def bench(fn, *args, **kw):
            fn(*args, **kw)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                out = fn(*args, **kw)
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / 20, out

        t_tri, c_tri = bench(kernels.fp8_gemm, qa, sa, qb, sb)
        ra = a.abs().amax(1, keepdim=True) / 448
        rb = b.abs().amax(1, keepdim=True) / 448
        a8, b8 = (a / ra).to(fp8.FP8), (b / rb).to(fp8.FP8)
        t_sm, c_sm = bench(torch._scaled_mm, a8, b8.T, scale_a=ra, scale_b=rb.T, out_dtype=torch.float32)
        ab, bb = a.bfloat16(), b.bfloat16()
        t_bf, c_bf = bench(torch.matmul, ab, bb.T)
        flops = 2 * M * N * K
        rows.append({"shape": f"{M}x{N}x{K}", "triton_tflops": flops / t_tri / 1e12,
                     "scaled_mm_tflops": flops / t_sm / 1e12, "bf16_tflops": flops / t_bf / 1e12,
                     "triton_rel_err": fp8.relative_error(c_tri, exact),
                     "scaled_mm_rel_err": fp8.relative_error(c_sm, exact),
                     "bf16_rel_err": fp8.relative_error(c_bf.float(), exact)})
    return rows


@dataclass
class BenchConfig:
    """KV cache bytes and decoding speed of a trained checkpoint; --fp8 for the GPU kernel comparison."""

    ckpt: str = "runs/deepseek_v3/train/final"  # a train.py output directory ("" = no decoding benchmark)
    tokenizer_dir: str = "runs/deepseek_v3/tokenizer"  # its tokenizer and token cache (the held-out prompts)
    data_file: str = ""  # the run's --data-file (empty: the default corpus)
    prompts: int = 8  # held-out prompts of prompt_tokens each
    prompt_tokens: int = 32
    new_tokens: int = 64
    repeats: int = 3  # best of this many
    threads: int = 1  # one thread: a steadier ratio on a shared machine
    fp8: bool = False  # also the FP8 GEMM comparison (CUDA only)
    device: str = "cpu"
    out: str = "runs/deepseek_v3/bench/bench.json"  # everything; results.json beside it holds the headline records


def main(cfg: BenchConfig) -> dict:
    set_threads(cfg.threads)
    result = {"fp8_error": fp8_error_table()}
    if cfg.ckpt:
        result.update(decoding(cfg))
    if cfg.fp8:
        if not torch.cuda.is_available():
            raise UserError("--fp8: needs a CUDA GPU with FP8 support (sm_89 or newer); the CPU check is "
                            "TRITON_INTERPRET=1 python -m deepseek_v3.kernels")
        result["fp8_gemm"] = fp8_speed(cfg.device)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(result, indent=2) + "\n")
    if cfg.ckpt:
        cmd = command_line("deepseek_v3.bench")
        kv = {r["attention"]: r["bytes_per_token"] for r in result["kv_cache"]}
        records = [make_record("deepseek_v3", "kv_cache_cpu_preset", "mla_cache_bytes_per_token", kv["MLA"],
                               "mha_equal_width", kv["MHA"], 0.0, cmd)]
        if "acceptance_rate" in result:
            records += [make_record("deepseek_v3", "speculative_mtp_cpu", "draft_acceptance_rate",
                                    result["acceptance_rate"], "report_full_model_low", 0.85, 0.0, cmd),
                        make_record("deepseek_v3", "speculative_mtp_cpu", "speculative_speedup_over_greedy",
                                    result["speculative_tok_per_s"] / result["absorbed_tok_per_s"], "plain_greedy",
                                    1.0, 0.0, cmd)]
        (Path(cfg.out).parent / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def decoding(cfg: BenchConfig) -> dict:
    ckpt = Path(cfg.ckpt)
    if not (ckpt / "config.json").is_file():
        raise UserError(f"--ckpt {ckpt}: no config.json there; train first (python -m deepseek_v3.train)")
    mcfg = DeepseekV3Config.from_dict(read_config(ckpt))
    model = load_pretrained(DeepseekV3ForCausalLM(mcfg), ckpt).eval().to(cfg.device)
    from .dataset import as_long, load_tokens

    streams, _ = load_tokens(cfg.tokenizer_dir, cfg.data_file, vocab_size=mcfg.vocab_size)
    valid = as_long(streams)["valid"]
    step = len(valid) // cfg.prompts
    prompts = [valid[i * step:i * step + cfg.prompt_tokens][None].to(cfg.device) for i in range(cfg.prompts)]
    return {"kv_cache": kv_cache_bytes(mcfg), **decode_speed(model, prompts, cfg.new_tokens, cfg.repeats)}


if __name__ == "__main__":
    run_main(main, BenchConfig)
