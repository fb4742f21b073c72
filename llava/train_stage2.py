"""Stage 2 of LLaVA, visual instruction tuning: the projector keeps learning and the language model learns to
answer questions about the picture, fully or through LoRA adapters on a full-precision or 4-bit base (QLoRA).

    python -m llava.train_stage2                          # LoRA on easy-VQA questions, ~15 minutes on 2 CPU cores
    python -m llava.train_stage2 --mode qlora             # the base in 4-bit NF4 (bitsandbytes), LoRA on top
    python -m llava.train_stage2 --mode qlora --bits 8    # LLM.int8() base instead
    python -m llava.train_stage2 --mode full --lr 1e-4    # every weight of the language model
    python -m llava.train_stage2 --blind                  # the control: blank pictures, the question alone
    torchrun --nproc_per_node 2 -m llava.train_stage2 --batch-size 4   # DDP (--distributed fsdp for FSDP2)

It starts from stage 1's projector (``--init-from``). The objective is next-token cross-entropy on the answers
only; the prompt, the image placeholders and the system line are labelled -100. LLaVA-1.5 trains this stage at
lr 2e-5 in full, 2e-4 with LoRA r 128 / alpha 256 (scripts/v1_5); a 135 M model and a few hundred steps want r 16.
Writes to ``--out-dir``: checkpoints/, final/ (the trained parameters, llava.json), metrics.jsonl, loss.png,
train_summary.json and results.json (held-out exact match after training; before it too with --eval-first).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.cli import run_main
from common.errors import UserError

from .dataset import easy_vqa_questions, load_conversations
from .loading import build, smollm2_dir
from .model import LlavaConfig
from .training import StageConfig, add_lora, load_splits, load_trainable, read_meta, run, setup


@dataclass
class Stage2Config(StageConfig):
    """Projector + language model, on questions and answers."""

    init_from: str = "runs/llava/stage1/final"  # stage 1's final/ ("" = a fresh projector: no alignment stage)
    mode: str = "lora"  # full, lora or qlora (LoRA on a bitsandbytes-quantized base)
    bits: int = 4  # the qlora base: 4 (NF4 with double quantization) or 8 (LLM.int8())
    lora_r: int = 16  # adapter rank (>= 1)
    lora_alpha: int = 32  # the update is scaled by alpha / r
    lora_dropout: float = 0.0  # (< 1)
    balance_answers: bool = False  # draw each (question, answer) pair equally often (README: the language prior;
    # it needs --no-pack-questions)
    pack_questions: bool = True  # one row per picture: every question about it, each seeing only the picture
    batch_size: int = 3  # pictures per step with --pack-questions (about 29 questions), else questions
    max_iters: int = 300  # optimizer steps (900 of the 4,000 pictures, about 8,700 of the 38,575 questions)
    lr: float = 1e-3  # LoRA's (adapters and projector); --mode full wants about 1e-4
    warmup_iters: int = 20
    save_every: int = 50
    out_dir: str = "runs/llava/stage2"


PRESETS = {"cpu": {}, "gpu4gb": {"batch_size": 4, "max_iters": 2000, "eval_batch_size": 64, "eval_examples": 0}}


def main(cfg: Stage2Config) -> dict:
    if cfg.mode not in ("full", "lora", "qlora"):
        raise UserError(f"--mode {cfg.mode}: expected full, lora or qlora")
    dist_info = setup(cfg)
    own = (load_conversations(cfg.data_file), load_conversations(cfg.valid_file)) if cfg.data_file else None
    llava_cfg = cfg.model
    if cfg.init_from:  # the projector's shape and the features it was trained on come from stage 1
        llava_cfg = LlavaConfig(**{**read_meta(cfg.init_from, "--init-from")["llava"], "anyres": cfg.model.anyres})
        keys = ("projector_type", "pool", "vision_feature_select_strategy")
        differs = [getattr(llava_cfg, k) for k in keys] != [getattr(cfg.model, k) for k in keys]
        if differs and dist_info.is_main:
            print(f"--init-from {cfg.init_from}: its projector {llava_cfg.projector_type}, pool {llava_cfg.pool}, "
                  f"vision feature strategy {llava_cfg.vision_feature_select_strategy} are used (the flags' values "
                  "are ignored)")
    model, tok, processor = build(cfg.vision, cfg.llm or str(smollm2_dir()), llava_cfg,
                                  cfg.bits if cfg.mode == "qlora" else 0)
    if cfg.init_from:
        load_trainable(model, cfg.init_from, only_prefix="multi_modal_projector.")
    model.requires_grad_(False)
    if cfg.mode == "full":
        model.language_model.requires_grad_(True)
    else:
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)  # peft freezes the base, adapters train
    model.multi_modal_projector.requires_grad_(True)
    train, valid = load_splits(cfg, own, processor, lambda: easy_vqa_questions("train"))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if dist_info.is_main:
        print(f"stage 2: {len(train.examples)} conversations | {model.num_image_tokens()} visual words | mode "
              f"{cfg.mode}{f' ({cfg.bits}-bit base)' if cfg.mode == 'qlora' else ''} | trainable {n_train / 1e6:.2f} M"
              + (" | BLIND: blank pictures" if cfg.blind else ""), flush=True)
    name = cfg.run_name or f"stage2_{cfg.mode}_cpu" + ("_blind" if cfg.blind else "")
    extra = {"stage": "stage2", "mode": cfg.mode, "bits": cfg.bits if cfg.mode == "qlora" else 0,
             "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha}
    return run(cfg, model, tok, train, valid, "stage2", extra, name, dist_info)


if __name__ == "__main__":
    run_main(main, Stage2Config, presets=PRESETS)
