"""Does compression make the model faster or smaller in memory on a CPU? Measured, one thread, side by side.

    python -m compression.bench                       # SmolLM2; after compression.evaluate --methods quant
    python -m compression.bench --model subject

1) Speed, in rounds (fp32, int8 kernel, ours int8, ours nf4_dq, ...) so a slow spell of the machine hits all:
   - prefill: ms per token of one 256-token prompt;  decode: ms per generated token (batch 1, KV cache), from
     the time of n tokens minus the time of 1 (which is the 32-token prompt's prefill), divided by n - 1.
   - "torch int8": torch.ao's dynamic quantization, per-channel int8 weights and int8 activations with one scale
     per tensor computed on the fly, the matmul in integers (fbgemm): the CPU path with real int8 arithmetic.
   - accuracy: the held-out perplexity of fp32 and of torch's int8 (evaluate.py's windows), since int8
     activations change the numbers too.
   - "ours": QuantLinear, which dequantises its weight to fp32 in every forward (weight-only quantization: on a
     GPU the win is fewer bytes read per token; on a CPU the unpacking is extra work).
2) Memory: peak resident set (VmHWM) of a fresh process that loads the model and decodes 16 tokens, for fp32
   from model.safetensors and for the packed files of evaluate.py (loaded without ever making fp32 weights).
3) Sparsity: a 50 % unstructured and a 2:4 matrix multiplied densely vs as a CSR sparse matrix (torch.sparse):
   on a CPU, zeros are free only when the kernel skips them.
Writes runs/compression/bench/<model>.json and prints the tables BENCHMARKS.md shows.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.bench import paired_ratio, time_rounds
from common.cli import run_main
from common.errors import UserError
from common.runtime import set_threads

from .dataset import load_splits, perplexity, token_windows
from .loading import decoder_linears, load_model, model_name, resolve_model
from .model import QuantLinear, replace_linears
from .prune import magnitude_mask, n_m_mask


@dataclass
class BenchConfig:
    """CPU speed and memory of the compressed models."""

    model: str = "smollm2"  # smollm2, subject, or a transformers Llama-family directory
    formats: str = "int8_channel,nf4_dq,int4_g128"  # our QuantLinear formats to time
    prompt_len: int = 256  # tokens of the prefill prompt (>= 8)
    new_tokens: int = 8  # decoded tokens per timed call (>= 2)
    repeats: int = 3  # timed rounds (best and spread reported) (>= 1)
    threads: int = 1  # CPU threads (1: the guide's rule for stable timing)
    eval_dir: str = "runs/compression/eval"  # where evaluate.py saved the packed models (memory section)
    eval_windows: int = 12  # held-out windows of 512 tokens for the int8 kernel's perplexity (>= 1)
    memory: bool = True  # measure peak RSS in fresh processes
    out_dir: str = "runs/compression/bench"
    child: str = ""  # internal: KIND:PATH measured in a child process


def int8_dynamic(model):
    """torch.ao dynamic int8 on the decoder linears, per-channel weight scales (the library CPU int8 path)."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    names = set(decoder_linears(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # in place: a copy would keep the fp32 weights alive beside the int8 ones
        return quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8,
                                inplace=True)


@torch.no_grad()
def decode(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding with the KV cache (transformers' own cache), batch 1: the loop a chat runs."""
    out = model(prompt, use_cache=True)
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    toks = [tok]
    for _ in range(n - 1):
        out = model(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        toks.append(tok)
    return torch.cat(toks, 1)


def vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(kind_path: str) -> dict:
    """In a fresh process: load one model, decode 16 tokens, report peak and current RSS."""
    kind, path = kind_path.split(":", 1)
    base = vm_kb("VmRSS")
    t0 = time.perf_counter()
    if kind == "packed":
        from .packed import load_quantized_model

        model, _ = load_quantized_model(path)
    else:
        model, _ = load_model(path)
        if kind == "int8dyn":
            model = int8_dynamic(model)
    load_s = time.perf_counter() - t0
    decode(model, torch.arange(32)[None] % 100 + 10, 16)
    return {"kind": kind, "path": path, "peak_rss_mb": vm_kb("VmHWM") / 1024, "rss_mb": vm_kb("VmRSS") / 1024,
            "baseline_rss_mb": base / 1024, "load_s": load_s}


def sparse_matmul(repeats: int) -> dict:
    """A 1536 x 576 weight (SmolLM2's up_proj) times 256 tokens: dense vs CSR at 50 % and 2:4."""
    torch.manual_seed(0)
    W = torch.randn(1536, 576)
    x = torch.randn(576, 256)
    w50 = W * magnitude_mask(W, 0.5)
    w24 = W * n_m_mask(W.abs())
    csr50, csr24 = w50.to_sparse_csr(), w24.to_sparse_csr()
    fns = {"dense": lambda: W @ x, "dense, 50 % zeros": lambda: w50 @ x, "CSR 50 %": lambda: csr50 @ x,
           "CSR 2:4": lambda: csr24 @ x}
    rounds = time_rounds(fns, repeats=repeats, warmup=2)
    return {k: {"best_ms": 1e3 * min(v), "ratio_vs_dense": paired_ratio(rounds["dense"], v)[0]}
            for k, v in rounds.items()}


def main(cfg: BenchConfig) -> dict:
    if cfg.child:
        print(json.dumps(child(cfg.child)))
        return {}
    set_threads(cfg.threads)
    src = resolve_model(cfg.model)
    name = model_name(cfg.model)
    base, tok = load_model(cfg.model)
    formats = [f for f in cfg.formats.split(",") if f]
    models = {"fp32": base, "torch int8 (dynamic, fbgemm)": int8_dynamic(copy.deepcopy(base))}
    for fmt in formats:
        m = copy.deepcopy(base)
        try:
            replace_linears(m, lambda n, lin, fmt=fmt: QuantLinear.from_linear(lin, fmt))
        except ValueError as e:
            raise UserError(f"--formats: {e}") from None
        models[f"ours {fmt} (dequantise per forward)"] = m
    ids = tok(open(__file__).read(), add_special_tokens=False)["input_ids"]
    if len(ids) < cfg.prompt_len:
        raise UserError(f"--prompt-len {cfg.prompt_len}: expected at most {len(ids)}")
    prompt = torch.tensor(ids[:cfg.prompt_len])[None]

    # 1) speed, in rounds
    with torch.no_grad():
        prefill = time_rounds({k: (lambda m=m: m(prompt, use_cache=False)) for k, m in models.items()},
                              repeats=cfg.repeats)
        fns = {}
        for k, m in models.items():
            fns[k] = lambda m=m: decode(m, prompt[:, :32], cfg.new_tokens)
            fns[k + " (prefill only)"] = lambda m=m: decode(m, prompt[:, :32], 1)
        both = time_rounds(fns, repeats=cfg.repeats)
        dec = {k: [(a - b) / (cfg.new_tokens - 1) * cfg.new_tokens for a, b in
                   zip(both[k], both[k + " (prefill only)"])] for k in models}
    speed = {}
    for k in models:
        speed[k] = {"prefill_ms_per_token": 1e3 * min(prefill[k]) / cfg.prompt_len,
                    "prefill_spread_ms": 1e3 * (max(prefill[k]) - min(prefill[k])) / cfg.prompt_len,
                    "decode_ms_per_token": 1e3 * min(dec[k]) / cfg.new_tokens,
                    "decode_spread_ms": 1e3 * (max(dec[k]) - min(dec[k])) / cfg.new_tokens,
                    "prefill_speedup": paired_ratio(prefill["fp32"], prefill[k])[0],
                    "decode_speedup": paired_ratio(dec["fp32"], dec[k])[0]}
    print(f"{name}, {cfg.threads} thread(s), best of {cfg.repeats} rounds:")
    print("| model | prefill ms/token | decode ms/token | prefill vs fp32 | decode vs fp32 |\n|---|---|---|---|---|")
    for k, v in speed.items():
        print(f"| {k} | {v['prefill_ms_per_token']:.2f} (±{v['prefill_spread_ms']:.2f}) | "
              f"{v['decode_ms_per_token']:.1f} (±{v['decode_spread_ms']:.1f}) | {v['prefill_speedup']:.2f}x | "
              f"{v['decode_speedup']:.2f}x |")

    # the int8 kernel's accuracy: its activations are int8 too, so it is not the int8_channel row of evaluate.py
    _, held = load_splits("")
    vx = token_windows(tok, held, 512, cfg.eval_windows, "the held-out text")
    ppl = {k: perplexity(models[k], vx, 4) for k in ("fp32", "torch int8 (dynamic, fbgemm)")}
    print(f"held-out perplexity: fp32 {ppl['fp32']:.3f}, torch int8 dynamic {ppl['torch int8 (dynamic, fbgemm)']:.3f}")
    for k, v in ppl.items():
        speed[k]["heldout_ppl"] = v

    # 2) memory, each in a fresh process
    memory = []
    if cfg.memory:
        kinds = [("fp32", str(src)), ("int8dyn", str(src))]
        kinds += [("packed", str(p)) for p in sorted((Path(cfg.eval_dir) / name).glob("rtn_*"))
                  if (p / "model.packed.safetensors").is_file() and p.name.removeprefix("rtn_") in formats]
        for kind, path in kinds:
            arg = f"{kind}:{cfg.model if kind != 'packed' else path}"
            r = subprocess.run([sys.executable, "-m", "compression.bench", "--child", arg], capture_output=True,
                               text=True)
            if r.returncode != 0:
                raise UserError(f"bench: measuring {arg} in a fresh process failed: "
                                f"{(r.stderr.strip().splitlines() or ['no message'])[-1]}")
            memory.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print("| model | peak RSS MB | RSS after decoding MB | load s |\n|---|---|---|---|")
        for m in memory:
            label = m["kind"] if m["kind"] != "packed" else Path(m["path"]).name
            print(f"| {label} | {m['peak_rss_mb']:.0f} | {m['rss_mb']:.0f} | {m['load_s']:.1f} |")

    # 3) sparse kernels on a CPU
    sparse = sparse_matmul(cfg.repeats)
    print("| 1536x576 weight @ 256 tokens | best ms | speed vs dense |\n|---|---|---|")
    for k, v in sparse.items():
        print(f"| {k} | {v['best_ms']:.2f} | {v['ratio_vs_dense']:.2f}x |")
    result = {"model": name, "threads": cfg.threads, "speed": speed, "memory": memory, "sparse": sparse}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_main(main, BenchConfig)
