"""Our backbone as a transformers Dinov2 directory, and a transformers Dinov2 directory as ours.

    python -m dinov2.export_hf                                      # runs/dinov2/train/final -> runs/dinov2/hf
    python -m dinov2.export_hf --from-hf facebook/dinov2-small --out runs/dinov2/small   # the other way

The export holds config.json (model_type dinov2, or dinov2_with_registers with register tokens),
model.safetensors and a BitImageProcessor config (resize to the training size, bicubic, the training data's
mean and std), so that

    from transformers import AutoImageProcessor, AutoModel
    model = AutoModel.from_pretrained("runs/dinov2/hf")      # Dinov2Model, no custom code

gives infer.py's features (tests/test_dinov2.py checks it, within 1e-4). The names are transformers' own, so
the export is a state-dict copy with strict loading. The import also reads the hub checkpoints' older names
(``attention.attention.query``, ``attention.output.dense``), which transformers renames when it loads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from common.checkpoint import load_weights
from common.cli import run_main
from common.errors import UserError

from .model import Dinov2Config, Dinov2Model

# the hub checkpoints' names (transformers < 5) -> the names of this file and of transformers 5
OLD_NAMES = {".attention.attention.query.": ".attention.q_proj.", ".attention.attention.key.": ".attention.k_proj.",
             ".attention.attention.value.": ".attention.v_proj.", ".attention.output.dense.": ".attention.o_proj."}
DATA_KEYS = ("pixel_mean", "pixel_std", "data_image_size")  # what our final/ config adds for evaluation


def import_hf(path: str | Path) -> tuple[Dinov2Model, dict]:
    """(our Dinov2Model with the directory's weights, the config dict). Takes our final/ directories, our
    exports, and transformers' Dinov2Model / Dinov2WithRegistersModel directories (also a classifier's, whose
    backbone sits under ``dinov2.``; its head is dropped)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("model_type") not in ("dinov2", "dinov2_with_registers"):
        raise UserError(f"{path}/config.json: model_type is {cfg.get('model_type')!r}; expected dinov2 or "
                        "dinov2_with_registers")
    try:
        config = Dinov2Config.from_hf_dict(cfg)
    except ValueError as e:
        raise UserError(f"{path}/config.json: {e}") from None
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise UserError(f"{path}: no model.safetensors (a pytorch_model.bin is not read: pickle files can run code)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    for prefix in ("dinov2_with_registers.", "dinov2."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    renamed = {}
    for k, v in state.items():
        for old, new in OLD_NAMES.items():
            k = k.replace(old, new)
        renamed[k] = v
    model = Dinov2Model(config)
    load_weights(model, renamed, str(path))
    return model.eval(), cfg


def image_processor(size: int, mean: list[float], std: list[float]):
    """transformers' BitImageProcessor (the class the DINOv2 checkpoints use) doing what eval_knn.py does:
    bicubic to size x size, the training data's normalisation."""
    from transformers import BitImageProcessor

    return BitImageProcessor(do_resize=True, size={"height": size, "width": size}, resample=3, do_center_crop=False,
                             do_rescale=True, do_normalize=True, image_mean=mean, image_std=std,
                             do_convert_rgb=False)


def export(ckpt: str | Path, out: str | Path) -> Path:
    """ckpt (our final/) -> out (a transformers Dinov2 directory with an image processor)."""
    import transformers

    ours, cfg = import_hf(ckpt)
    hf_cfg = ours.config.to_hf_dict()
    if ours.config.num_register_tokens:
        hf = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**hf_cfg))
    else:
        hf = transformers.Dinov2Model(transformers.Dinov2Config(**hf_cfg))
    hf.load_state_dict(ours.state_dict(), strict=True)
    out = Path(out)
    hf.eval().save_pretrained(str(out))
    if "pixel_mean" in cfg:
        image_processor(ours.config.image_size, cfg["pixel_mean"], cfg["pixel_std"]).save_pretrained(str(out))
    return out


@dataclass
class ExportConfig:
    """Export a trained backbone to transformers' format, or import one from it."""

    ckpt: str = "runs/dinov2/train/final"  # train_dino.py's final/ directory (the teacher's backbone)
    out: str = "runs/dinov2/hf"  # the directory to write
    from_hf: str = ""  # import instead: a transformers Dinov2 directory (or a hub id, with the internet)


def main(cfg: ExportConfig) -> dict:
    from common.checkpoint import save_pretrained

    if cfg.from_hf:
        src = Path(cfg.from_hf)
        if not src.is_dir():
            from huggingface_hub import snapshot_download

            src = Path(snapshot_download(cfg.from_hf, allow_patterns=["*.json", "*.safetensors"]))
        model, hf_cfg = import_hf(src)
        config = model.config.to_hf_dict()
        save_pretrained(model, config, cfg.out)
        print(f"{src} -> {cfg.out}: ours, {model.num_parameters() / 1e6:.2f} M parameters")
        return {"out": Path(cfg.out), "model": model}
    if not (Path(cfg.ckpt) / "config.json").is_file():
        raise UserError(f"--ckpt {cfg.ckpt}: no config.json there; train first (python -m dinov2.train_dino)")
    out = export(cfg.ckpt, cfg.out)
    print(f"{cfg.ckpt} -> {out}: load it with transformers.AutoModel.from_pretrained({str(out)!r})")
    return {"out": out}


if __name__ == "__main__":
    run_main(main, ExportConfig)
