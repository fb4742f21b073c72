"""Benchmark (not a test): our BERT against transformers' BertModel at equal config and weights.

    python -m bert_address_cls.bench            # training step and inference, 1 thread, best of 5

Both sides run in one process, interleaved (ours, theirs, ours, theirs ...), with 1 thread: on a shared
machine only ratios measured side by side mean something. The workload is the address parser's: batch 64
of 40 characters, every other row padded over its last quarter (12.5 % of the tokens), the cpu preset's sizes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertConfig as HFBertConfig
from transformers import BertModel as HFBertModel

from common.bench import time_interleaved
from common.cli import run_main
from common.runtime import set_threads

from .model import BertConfig, BertModel, from_hf_state_dict


@dataclass
class BenchConfig:
    """Our BERT vs transformers' at equal config and weights."""

    dim: int = 256
    n_layer: int = 4
    n_head: int = 4
    ffn_dim: int = 1024
    vocab_size: int = 7914
    batch_size: int = 64
    seq_len: int = 40
    repeats: int = 5
    threads: int = 1
    out: str = "runs/bert_address_cls/bench.json"


def forward(model, ids, mask, is_ours: bool) -> torch.Tensor:
    return model(ids, mask)[0] if is_ours else model(input_ids=ids, attention_mask=mask).last_hidden_state


def train_step(model, ids, mask, is_ours: bool) -> None:
    forward(model, ids, mask, is_ours).float().pow(2).mean().backward()


@torch.no_grad()
def inference(model, ids, mask, is_ours: bool) -> torch.Tensor:
    return forward(model, ids, mask, is_ours)


def compare(ours, theirs, ids, mask, repeats: int) -> dict:
    """Tokens/s of both models on both workloads, and the largest output difference."""
    tokens, out = int(mask.sum()), {}
    diff = inference(ours, ids, mask, True) - inference(theirs, ids, mask, False)
    out["max_abs_diff"] = diff[mask.bool()].abs().max().item()
    for kind, fn in (("train_step", train_step), ("inference", inference)):
        t = time_interleaved({"ours": lambda fn=fn: fn(ours, ids, mask, True),
                              "transformers": lambda fn=fn: fn(theirs, ids, mask, False)}, repeats=repeats)
        out[kind] = {name: {"tok_per_s": tokens / best, "best_s": best, "spread_s": spread}
                     for name, (best, spread) in t.items()}
        out[kind]["ratio"] = t["transformers"][0] / t["ours"][0]
    return out


def main(cfg: BenchConfig) -> dict:
    set_threads(cfg.threads)
    torch.manual_seed(0)
    sizes = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layer,
                 num_attention_heads=cfg.n_head, intermediate_size=cfg.ffn_dim, max_position_embeddings=128,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = torch.randint(5, cfg.vocab_size, (cfg.batch_size, cfg.seq_len))
    mask = torch.ones_like(ids)
    mask[::2, 3 * cfg.seq_len // 4:] = 0  # every other row a quarter shorter, padded
    ids = ids * mask
    results = {}
    for impl in ("sdpa", "eager"):  # transformers' eager = our plain-math path
        theirs = HFBertModel(HFBertConfig(**sizes, attn_implementation=impl))
        ours = BertModel(BertConfig(**sizes, attn_impl="sdpa" if impl == "sdpa" else "math"))
        ours.load_state_dict(from_hf_state_dict(theirs.state_dict()))
        r = compare(ours, theirs, ids, mask, cfg.repeats)
        results[f"max_abs_diff_{impl}"] = r.pop("max_abs_diff")
        for kind, v in r.items():
            results[f"{kind}_{impl}"] = v
    results["date"] = time.strftime("%Y-%m-%d")
    results["config"] = vars(cfg)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"| workload (1 thread, best of {cfg.repeats}) | ours tok/s | transformers tok/s | ratio |")
    print("|---|---|---|---|")
    for key, r in results.items():
        if isinstance(r, dict) and "ratio" in r:
            o, t = r["ours"], r["transformers"]
            print(f"| {key} | {o['tok_per_s']:,.0f} (± {o['spread_s'] / o['best_s']:.0%}) | "
                  f"{t['tok_per_s']:,.0f} (± {t['spread_s'] / t['best_s']:.0%}) | {r['ratio']:.2f}x |")
    return results


if __name__ == "__main__":
    run_main(main, BenchConfig)
