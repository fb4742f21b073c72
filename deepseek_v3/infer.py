"""Generate with the trained model: greedy decoding with the latent KV cache (absorbed MLA), or speculative
decoding where the MTP module drafts the token after next and the main model verifies it (same output).

    python -m deepseek_v3.infer --prompt "据新华社报道，"
    python -m deepseek_v3.infer --prompt "据新华社报道，" --speculative      # + acceptance rate and tokens/s
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.checkpoint import load_pretrained, read_config
from common.cli import run_main
from common.errors import UserError
from common.runtime import set_threads

from .model import DeepseekV3Config, DeepseekV3ForCausalLM, MLACache, speculative_generate


@dataclass
class InferConfig:
    """Generate text from a train.py checkpoint."""

    ckpt: str = "runs/deepseek_v3/train/final"  # config.json + model.safetensors + tokenizer/
    prompt: str = "据新华社报道，"  # the text to continue
    max_new_tokens: int = 48
    speculative: bool = False  # draft with the MTP module, verify with the main head (needs an MTP module)
    naive: bool = False  # decode with the naive MLA (per-head keys rebuilt from the latent) instead of absorbed
    threads: int = 0


def load(ckpt: str | Path):
    from transformers import AutoTokenizer

    ckpt = Path(ckpt)
    if not (ckpt / "config.json").is_file():
        raise UserError(f"--ckpt {ckpt}: no config.json there; train first (python -m deepseek_v3.train)")
    saved = read_config(ckpt)
    if not {"kv_lora_rank", "n_routed_experts"} <= saved.keys():
        raise UserError(f"--ckpt {ckpt}: config.json has no kv_lora_rank / n_routed_experts; expected a deepseek_v3 "
                        "checkpoint (train.py's final/)")
    cfg = DeepseekV3Config.from_dict(saved)
    if not (ckpt / "tokenizer").is_dir():
        raise UserError(f"--ckpt {ckpt}: no tokenizer/ directory beside the weights; expected train.py's final/")
    return load_pretrained(DeepseekV3ForCausalLM(cfg), ckpt).eval(), AutoTokenizer.from_pretrained(ckpt / "tokenizer")


def main(cfg: InferConfig) -> dict:
    set_threads(cfg.threads)
    model, tok = load(cfg.ckpt)
    ids = torch.tensor([tok(cfg.prompt, add_special_tokens=False)["input_ids"]])
    if ids.shape[1] == 0:
        raise UserError("--prompt: empty; expected some text to continue")
    if cfg.speculative and not model.mtp:
        raise UserError(f"--speculative: {cfg.ckpt} has no MTP module (num_nextn_predict_layers 0)")
    t0 = time.perf_counter()
    if cfg.speculative:
        new, stats = speculative_generate(model, ids, cfg.max_new_tokens, tok.pad_token_id, absorb=not cfg.naive)
    else:
        new, stats = model.generate(ids, cfg.max_new_tokens, tok.pad_token_id, absorb=not cfg.naive), {}
    wall = time.perf_counter() - t0
    text = cfg.prompt + tok.decode(new[0], skip_special_tokens=True)
    print(text)
    cache = MLACache()
    with torch.no_grad():
        model.hidden(torch.cat([ids, new], 1), cache)
    line = (f"{new.shape[1]} tokens in {wall:.2f} s ({new.shape[1] / wall:.1f} tok/s) | latent cache "
            f"{cache.nbytes() / 1024:.1f} KiB for {cache.length(0)} positions")
    if stats:
        line += (f" | drafts accepted {stats['accepted']}/{stats['drafted']} | "
                 f"{new.shape[1] / stats['forward_passes']:.2f} tokens per forward pass")
    print(line)
    return {"text": text, "new_tokens": new, "stats": stats, "wall_s": wall}


if __name__ == "__main__":
    run_main(main, InferConfig)
