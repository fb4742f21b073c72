"""A trained LLaVA as a transformers ``LlavaForConditionalGeneration`` directory, with its processor.

    python -m llava.export_hf --ckpt runs/llava/stage2/final --out runs/llava/hf

LoRA adapters are merged into the language model first (a QLoRA run's adapters go onto the full-precision
base). The names are transformers' own (``loading.hf_state_dict``), so that

    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained("runs/llava/hf")
    processor = AutoProcessor.from_pretrained("runs/llava/hf")

runs with no custom code and answers as infer.py does (tests/test_llava.py checks the greedy text). transformers'
class has no pooling and no anyres for CLIP-LLaVA: a model trained with ``--pool 2`` (the CPU default) or
``--anyres`` is refused with that reason; train with ``--pool 1`` to export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import run_main

EXTRA = "llava_tutorial.json"  # what the export adds beside transformers' files: the system line of training


@dataclass
class ExportConfig:
    """Write a trained stage as a transformers Llava directory."""

    ckpt: str = "runs/llava/stage2/final"  # a final/ directory of train_stage1.py or train_stage2.py
    out: str = "runs/llava/hf"  # the directory to write


def export(ckpt: str | Path, out: str | Path) -> Path:
    from transformers import LlavaProcessor

    from .loading import to_hf
    from .training import load_trained

    model, tok, processor, meta = load_trained(ckpt, bits=0)
    if hasattr(model.language_model, "merge_and_unload"):  # LoRA: W + (alpha / r) B A, then the plain model
        model.language_model = model.language_model.merge_and_unload()
    hf = to_hf(model)  # refuses pooling and anyres, names the flags
    out = Path(out)
    hf.save_pretrained(str(out))
    LlavaProcessor(image_processor=processor, tokenizer=tok, patch_size=model.vision_tower.config.patch_size,
                   vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                   num_additional_image_tokens=1, image_token="<image>",
                   chat_template=tok.chat_template).save_pretrained(str(out))
    (out / EXTRA).write_text(json.dumps({"system_prompt": meta.get("system_prompt", ""), "from": str(ckpt)}) + "\n")
    return out


class ExportedLlava:
    """transformers' LlavaForConditionalGeneration behind the three calls infer.py makes of our model."""

    def __init__(self, hf):
        self.hf = hf
        self.language_model = hf.model.language_model
        self.language_model.config.max_position_embeddings = hf.config.text_config.max_position_embeddings

    def num_image_tokens(self) -> int:
        return self.hf.config.image_seq_length

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values, max_new_tokens: int, eos_token_id: int):
        out = self.hf.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                               max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                               pad_token_id=eos_token_id)
        rows = []
        for r in out[:, input_ids.shape[1]:].tolist():
            rows.append(r[:r.index(eos_token_id)] if eos_token_id in r else r)
        return rows


def load_export(path: str | Path):
    """(model, tokenizer, image processor, meta) from an exported directory, run by transformers."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from .loading import _quiet_transformers

    quiet = _quiet_transformers()
    try:
        hf = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
        proc = AutoProcessor.from_pretrained(str(path))
    finally:
        quiet()
    extra = Path(path) / EXTRA
    meta = json.loads(extra.read_text()) if extra.is_file() else {"system_prompt": ""}
    return ExportedLlava(hf), proc.tokenizer, proc.image_processor, meta


def main(cfg: ExportConfig) -> dict:
    path = export(cfg.ckpt, cfg.out)
    print(f"exported {cfg.ckpt} -> {path} (transformers.LlavaForConditionalGeneration.from_pretrained; "
          f"python -m llava.infer --ckpt {path} ...)")
    return {"out": path}


if __name__ == "__main__":
    run_main(main, ExportConfig)
