"""Generate text with a trained model: streaming, KV cache, greedy or sampled, and a chat mode.

    python -m gpt_minimind.infer --prompt 据新华社报道， --prompt 记者获悉，
    python -m gpt_minimind.infer --temperature 0 --no-cache          # greedy, re-running the prefix each step
    python -m gpt_minimind.infer --chat --ckpt runs/gpt_minimind/sft/final   # after SFT (part 2)

Tokens are printed as they are produced. Byte-level BPE can split a character over several tokens,
so the text is re-decoded from all new tokens each step and only the finished part is printed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from common.cli import UserError, run_main
from common.runtime import pick_device, set_threads

from . import engine
from .loading import load_model
from .model import MiniMindForCausalLM


@dataclass
class InferConfig:
    """Generate from a trained checkpoint."""

    ckpt: str = "runs/gpt_minimind/pretrain/final"  # a model directory (+ tokenizer/) or a LoRA adapter directory
    prompt: list[str] = field(default_factory=lambda: ["据新华社报道，", "记者获悉，"])  # news openings, one each
    max_new_tokens: int = 80  # tokens to add after the prompt
    temperature: float = 0.8  # 0 = greedy; higher = more random
    top_k: int = 40  # sample only from the k most likely tokens (0 = all)
    top_p: float = 0.95  # ... and only from the smallest set reaching this probability
    repetition_penalty: float = 1.1  # > 1 discourages tokens already in the text
    cache: bool = True  # use the KV cache (--no-cache re-runs the whole sequence every step)
    compile: bool = False  # torch.compile the one-token decode step (the first prompt pays the compilation)
    chat: bool = False  # interactive chat with the chat template (for SFT models)
    seed: int = 0  # sampling seed
    threads: int = 0  # CPU threads (0 = torch's default)
    device: str = "auto"


def stream(model: MiniMindForCausalLM, tok, ids: list[int], cfg: InferConfig, out=sys.stdout) -> tuple[str, int, float]:
    """Generate after ``ids``, printing text as it becomes complete. -> (text, new tokens, seconds)."""
    device = model.lm_head.weight.device
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    new: list[int] = []
    printed = ""
    t0 = time.perf_counter()
    prompt = torch.tensor([ids], device=device)
    kw = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
              repetition_penalty=cfg.repetition_penalty, eos_token_id=tok.eos_token_id, generator=gen)
    if cfg.cache:  # the engine: the same tokens as model.generate, with packed weights (and a compiled step)
        tokens = engine.generate(model, prompt, cfg.max_new_tokens, compile=cfg.compile, **kw)
    else:  # the reference without a cache: every step re-runs the whole sequence
        tokens = model.generate(prompt, cfg.max_new_tokens, use_cache=False, **kw)
    for t in tokens:
        if int(t) == tok.eos_token_id:
            break
        new.append(int(t))
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait until a split character is complete
            out.write(text[len(printed):])
            out.flush()
            printed = text
    seconds = time.perf_counter() - t0
    text = tok.decode(new)
    out.write(text[len(printed):] + "\n")
    return text, len(new), seconds


def chat(model, tok, cfg: InferConfig) -> None:
    """A read-eval-print loop over the chat template; the history is kept until 'exit' or end of input."""
    messages = []
    limit = model.config.max_position_embeddings
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            return
        if user in ("exit", "quit"):
            return
        messages.append({"role": "user", "content": user})
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        keep = max(1, limit - cfg.max_new_tokens)  # the newest turns, leaving room for the reply
        ids = tok.encode(text, add_special_tokens=False)[-keep:]
        sys.stdout.write("bot> ")
        reply, _, _ = stream(model, tok, ids, cfg)
        messages.append({"role": "assistant", "content": reply})


def main(cfg: InferConfig) -> dict:
    if cfg.compile and not cfg.cache:
        raise SystemExit("--compile compiles the cached decode step: it cannot be combined with --no-cache")
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    model, tok = load_model(cfg.ckpt, device)
    if cfg.chat:
        chat(model, tok, cfg)
        return {}
    results = []
    limit = model.config.max_position_embeddings
    for i, prompt in enumerate(cfg.prompt, 1):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8 on the command line arrive as lone surrogates
            raise UserError(f"--prompt number {i} is not valid UTF-8 text (a character cut in the middle?)") from None
        sys.stdout.write(prompt)
        ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
        keep = max(1, limit - cfg.max_new_tokens)  # the newest tokens, leaving room for the continuation
        if len(ids) > keep:
            print(f"\nwarning: prompt {i} has {len(ids)} tokens and the context holds {limit}: keeping its last "
                  f"{keep} so that {limit - keep} can be generated", file=sys.stderr)
            ids = ids[-keep:]
        text, n, s = stream(model, tok, ids, cfg)
        print(f"  [{n} tokens in {s:.2f} s, {n / max(s, 1e-9):.0f} tokens/s, {'with' if cfg.cache else 'no'} KV cache]")
        results.append({"prompt": prompt, "text": text, "new_tokens": n, "seconds": s})
    return {"generations": results}


if __name__ == "__main__":
    run_main(main, InferConfig)
