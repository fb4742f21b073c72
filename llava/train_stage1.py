"""Stage 1 of LLaVA, feature alignment: only the projector learns, so that a picture's patches land where the
language model's words for it live. Tower and language model stay frozen.

    python -m llava.train_stage1                        # easy-VQA captions, ~3 minutes on 2 CPU cores
    python -m llava.train_stage1 --projector-type linear   # LLaVA v1's single Linear instead of v1.5's MLP
    python -m llava.train_stage1 --vision DIR --llm DIR    # any CLIP directory, any Llama-family LM
    torchrun --nproc_per_node 2 -m llava.train_stage1      # data parallel (DDP; --distributed fsdp for FSDP2)

The objective is next-token cross-entropy on the caption only: "<image> x N  Describe the image briefly." ->
"a red triangle". LLaVA trains this stage at lr 1e-3 with no weight decay (its scripts/v1_5/pretrain.sh).
Writes to ``--out-dir``: checkpoints/, final/ (the projector, llava.json), metrics.jsonl, loss.png,
train_summary.json and results.json (the held-out questions answered by this stage alone).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.cli import run_main

from .dataset import easy_vqa_captions, load_conversations
from .loading import build, smollm2_dir
from .training import StageConfig, load_splits, run, setup


@dataclass
class Stage1Config(StageConfig):
    """Projector only, on captions."""

    max_iters: int = 100  # optimizer steps (800 of the 4,000 captions at batch 8)
    lr: float = 1e-3  # LLaVA's stage-1 rate
    out_dir: str = "runs/llava/stage1"


PRESETS = {"cpu": {}, "gpu4gb": {"batch_size": 32, "max_iters": 250, "eval_batch_size": 64}}


def main(cfg: Stage1Config) -> dict:
    dist_info = setup(cfg)
    own = (load_conversations(cfg.data_file), load_conversations(cfg.valid_file)) if cfg.data_file else None
    model, tok, processor = build(cfg.vision, cfg.llm or str(smollm2_dir()), cfg.model)
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    train, valid = load_splits(cfg, own, processor, lambda: easy_vqa_captions("train"))
    if dist_info.is_main:
        print(f"stage 1: {len(train.examples)} captions | {model.num_image_tokens()} visual words per picture | "
              f"projector {cfg.model.projector_type} | trainable "
              f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f} M", flush=True)
    name = cfg.run_name or f"stage1_{cfg.model.projector_type}_cpu" + ("_blind" if cfg.blind else "")
    return run(cfg, model, tok, train, valid, "stage1", {"stage": "stage1", "mode": "projector"}, name, dist_info)


if __name__ == "__main__":
    run_main(main, Stage1Config, presets=PRESETS)
