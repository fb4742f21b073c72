"""Supervised fine-tuning (SFT): teach the pretrained model to answer in the chat format.

    python -m gpt_minimind.train_sft                                  # from runs/gpt_minimind/pretrain/final
    python -m gpt_minimind.train_sft --data-file sft_mini_512.jsonl   # minimind's SFT data instead
    python -m gpt_minimind.train_sft --resume                         # continue after an interruption
    python -m gpt_minimind.eval                                       # score pretrain vs sft

Each conversation is rendered with the tokenizer's chat template,
``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>\\n``, and the loss is the
next-token loss on the assistant's tokens only (its answer and the closing <|im_end|>, so the model
learns to stop); the user's words and the role headers are context, with label -100. Every assistant
turn of a multi-turn conversation is learned. The data and the loop are in finetune.py (train_lora.py
uses them too); this script trains every weight of the model.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.checkpoint import save_pretrained
from common.cli import run_main
from common.results import command_line, make_record
from common.runtime import pick_device, seed_everything, set_threads

from .finetune import SFTConfig, finetune
from .loading import copy_tokenizer, load_model


def main(cfg: SFTConfig) -> dict:
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model, tok = load_model(cfg.init_from, device)

    def save_final(final_dir: Path) -> None:
        save_pretrained(model, model.config.to_dict(), final_dir)
        copy_tokenizer(cfg.init_from, final_dir)

    result = finetune(model, tok, cfg, list(model.parameters()), device, save_final)
    s = result["summary"]
    (Path(cfg.out_dir) / "results.json").write_text(json.dumps([make_record(
        "gpt_minimind", cfg.run_name, "valid_loss", s["valid_loss"], "pretrained_before_sft", s["initial_valid_loss"],
        s["train_wall_s"], command_line("gpt_minimind.train_sft"))], indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_main(main, SFTConfig)
