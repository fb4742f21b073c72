"""Our CLIP as a transformers CLIPModel directory, and a transformers CLIP directory as ours.

    python -m clip.export_hf                                   # runs/clip/train/final -> runs/clip/hf
    python -m clip.export_hf --from-hf openai/clip-vit-base-patch32 --out runs/clip/openai   # the other way

The export holds config.json (model_type clip), model.safetensors, the tokenizer and a CLIPImageProcessor
config (resize to the model's size, bicubic, OpenAI's mean and std), so that

    from transformers import pipeline
    pipeline("zero-shot-image-classification", model="runs/clip/hf")(image, candidate_labels=[...])

runs with no custom code and gives infer.py's scores (tests/test_clip.py checks it). The names are
transformers' own, so both directions are a plain state-dict copy, checked with strict loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.checkpoint import save_pretrained
from common.cli import run_main

from .model import CLIPConfig, CLIPModel


@dataclass
class ExportConfig:
    """Export a trained model to transformers' format, or import one from it."""

    ckpt: str = "runs/clip/train/final"  # train_clip.py's final/ directory
    out: str = "runs/clip/hf"  # the directory to write
    from_hf: str = ""  # import instead: a transformers CLIP directory (or a hub id, with the internet)


def image_processor(size: int):
    """transformers' CLIPImageProcessor doing what train_clip.py does: bicubic to size x size, OpenAI's
    normalisation (a square picture is resized whole; a crop only trims a non-square one)."""
    from transformers import CLIPImageProcessor

    from .dataset import MEAN, STD

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(MEAN), image_std=list(STD), resample=3)  # 3: PIL bicubic


def export(ckpt: str | Path, out: str | Path) -> Path:
    """ckpt (ours) -> out (a transformers CLIPModel directory with tokenizer and image processor)."""
    import transformers
    from transformers import AutoTokenizer

    from .scoring import load_model

    ours, tok = load_model(ckpt, "cpu")
    hf = transformers.CLIPModel(transformers.CLIPConfig(**ours.config.to_hf_dict())).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    out = Path(out)
    hf.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(Path(ckpt) / "tokenizer")).save_pretrained(str(out))
    image_processor(ours.config.image_size).save_pretrained(str(out))
    return out


def import_hf(src: str, out: str | Path) -> Path:
    """A transformers CLIP directory -> ours (config.json, model.safetensors, tokenizer/)."""
    import transformers
    from transformers import AutoTokenizer

    hf = transformers.CLIPModel.from_pretrained(src)
    cfg = CLIPConfig.from_dict(hf.config.to_dict())
    ours = CLIPModel(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True)
    out = Path(out)
    save_pretrained(ours, cfg.to_hf_dict(), out)
    AutoTokenizer.from_pretrained(src).save_pretrained(str(out / "tokenizer"))
    return out


def main(cfg: ExportConfig) -> dict:
    if cfg.from_hf:
        path = import_hf(cfg.from_hf, cfg.out)
        print(f"imported {cfg.from_hf} -> {path} (load it with clip.infer --ckpt {path})")
    else:
        path = export(cfg.ckpt, cfg.out)
        print(f"exported {cfg.ckpt} -> {path} (transformers.CLIPModel.from_pretrained, or the "
              "zero-shot-image-classification pipeline)")
    return {"out": path}


if __name__ == "__main__":
    run_main(main, ExportConfig)
