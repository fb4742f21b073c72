"""Generate text with a compressed model: a packed quantized directory (evaluate.py writes them), a pruned or
distilled transformers directory, or the original model, and say how fast and how big it was.

    python -m compression.infer --packed runs/compression/eval/smollm2/rtn_nf4_dq --prompt "To be, or not to be"
    python -m compression.infer --model runs/compression/distill/kd/final
    python -m compression.infer --model smollm2 --chat --prompt "What is a sonnet?"
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from common.cli import run_main
from common.errors import UserError
from common.runtime import seed_everything, set_threads

from .loading import load_model
from .packed import load_quantized_model


@dataclass
class InferConfig:
    """Greedy (or sampled) generation from a compressed model."""

    packed: str = ""  # a packed directory from compression.evaluate (model.packed.safetensors); wins over --model
    model: str = "smollm2"  # smollm2, subject, or a transformers directory (pruned, distilled, ...)
    prompt: str = "ROMEO. But soft, what light"  # the text to continue
    chat: bool = False  # wrap the prompt in the tokenizer's chat template (SmolLM2-Instruct is a chat model)
    max_new_tokens: int = 40  # tokens to generate (>= 1)
    temperature: float = 0.0  # 0 = greedy (>= 0)
    threads: int = 0  # CPU threads (0 = torch's default)
    seed: int = 1234


@torch.no_grad()
def main(cfg: InferConfig) -> dict:
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    model, tok = load_quantized_model(cfg.packed) if cfg.packed else load_model(cfg.model)
    load_s = time.perf_counter() - t0
    if not cfg.prompt.strip():
        raise UserError("--prompt: empty; expected some text to continue")
    if cfg.chat:
        if not getattr(tok, "chat_template", None):
            raise UserError("--chat: this tokenizer has no chat template; drop --chat")
        text = tok.apply_chat_template([{"role": "user", "content": cfg.prompt}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = cfg.prompt
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    t0 = time.perf_counter()
    kwargs = {"do_sample": True, "temperature": cfg.temperature} if cfg.temperature > 0 else {"do_sample": False}
    out = model.generate(ids, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                         **kwargs)
    gen_s = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    completion = tok.decode(new, skip_special_tokens=True)
    print(cfg.prompt, end="\n" if cfg.chat else "")
    print(completion)
    print(f"--- {len(new)} tokens in {gen_s:.1f} s ({1e3 * gen_s / max(len(new), 1):.0f} ms/token), loaded in "
          f"{load_s:.1f} s")
    return {"completion": completion, "new_tokens": len(new), "ms_per_token": 1e3 * gen_s / max(len(new), 1)}


if __name__ == "__main__":
    run_main(main, InferConfig)
