"""A quantized model on disk and back: a directory with transformers' config.json, the tokenizer, and
model.packed.safetensors holding each QuantLinear's packed tensors (format and shape in the file's metadata)
and every other tensor (embedding, norms) as it is.

Loading builds the transformers model on the meta device (no fp32 copy of the weights is ever made), swaps its
decoder linears for QuantLinear modules holding the file's tensors, and assigns the rest: so the resident memory
of a loaded model is the packed size plus the full-precision embedding (bench.py measures it).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from common.errors import UserError

from .model import QuantLinear, replace_linears
from .quantize import load_packed, save_packed

FILE = "model.packed.safetensors"


def save_quantized_model(model, tokenizer, out_dir: str | os.PathLike) -> int:
    """Write the directory; returns the bytes of the weights file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers, skip = {}, set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            layers[name] = (mod.fmt, (mod.out_features, mod.in_features), mod.stored())
            skip |= {f"{name}.{k}" for k in mod.names} | {f"{name}.bias"}
            if mod.bias is not None:
                layers[name][2]["bias"] = mod.bias
    rest, seen = {}, set()
    for name, t in model.state_dict().items():
        if name in skip or t.data_ptr() in seen:
            continue  # the tied output head shares the embedding's storage: stored once
        seen.add(t.data_ptr())
        rest[name] = t
    model.config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return save_packed(out / FILE, layers, rest)


def load_quantized_model(path: str | os.PathLike):
    """(model with QuantLinear layers, tokenizer) from a directory written by save_quantized_model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = Path(path)
    if not (d / FILE).is_file():
        raise UserError(f"--packed {path}: no {FILE} there; expected a directory written by compression.evaluate "
                        "(runs/compression/eval/<model>/<method>)")
    config = AutoConfig.from_pretrained(str(d))
    layers, rest = load_packed(d / FILE)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    def make(name, lin):
        if name not in layers:
            raise UserError(f"--packed {path}: {FILE} has no packed tensors for {name}")
        fmt, shape, tensors = layers[name]
        tensors = dict(tensors)  # the file's bias stays listed among the layer's keys (checked below)
        bias = tensors.pop("bias", None)
        return QuantLinear(fmt, shape, tensors, bias)

    replace_linears(model, make)
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    quant_keys = {f"{n}.{k}" for n, (_, _, t) in layers.items() for k in t}
    missing = [k for k in missing if k not in quant_keys and not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"--packed {path}: {FILE} does not fit its config.json (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its inv_freq is computed, not stored
    tok = AutoTokenizer.from_pretrained(str(d))
    return model.eval(), tok
