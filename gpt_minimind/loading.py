"""Loading the chapter's models: a model directory (ours, as train_*.py and export write it) or a LoRA
adapter directory on top of the base model it names. Every stage script and infer.py load through here.

    model, tok = load_model("runs/gpt_minimind/sft/final", device)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from common.checkpoint import load_pretrained, read_config
from common.cli import UserError

from .lora import apply_adapter, read_adapter_config
from .model import MiniMindConfig, MiniMindForCausalLM, MiniMindForSequenceClassification


def load_model(ckpt: str | Path, device) -> tuple[MiniMindForCausalLM, object]:
    """(model in eval mode, tokenizer) from a model directory (config.json, model.safetensors, tokenizer/),
    or from a LoRA adapter directory (adapter_config.json: its base model is loaded, then the adapter
    applied, its base quantized as during training)."""
    from transformers import AutoTokenizer

    ckpt = Path(ckpt)
    if (ckpt / "adapter_config.json").is_file():
        config = read_adapter_config(ckpt)
        model, tok = load_model(config["base_model_name_or_path"], device)
        return apply_adapter(model, ckpt, config).eval(), tok
    model = load_pretrained(MiniMindForCausalLM(MiniMindConfig.from_dict(read_config(ckpt))), ckpt)
    tok_dir = ckpt / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tok_dir}: no tokenizer next to the weights (train_pretrain.py writes one there)")
    return model.to(device).eval(), AutoTokenizer.from_pretrained(tok_dir)


def copy_tokenizer(src_model_dir: str | Path, dst_dir: Path) -> None:
    """A stage's final directory carries the tokenizer of the model it started from."""
    shutil.copytree(Path(src_model_dir) / "tokenizer", dst_dir / "tokenizer", dirs_exist_ok=True)


def policy_and_reference(init_from: str | Path, device) -> tuple[MiniMindForCausalLM, MiniMindForCausalLM, object]:
    """The model to train and a frozen copy of its starting point (the reference of DPO and GRPO)."""
    policy, tok = load_model(init_from, device)
    reference, _ = load_model(init_from, device)
    reference.requires_grad_(False)  # never trained, only read
    return policy, reference, tok


def load_reward_model(ckpt: str | Path, device) -> MiniMindForSequenceClassification:
    """A reward (or value) model directory as train_reward.py writes it, in eval mode and frozen."""
    ckpt = Path(ckpt)
    if not (ckpt / "model.safetensors").is_file():
        raise FileNotFoundError(f"{ckpt}: no reward model there; train one first (python -m gpt_minimind.train_reward)")
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        if "score.weight" not in f.keys():
            raise UserError(f"{ckpt}: a language model, not a reward model (its weights have no score head); "
                            "train one with python -m gpt_minimind.train_reward")
    config = read_config(ckpt)
    model = MiniMindForSequenceClassification(MiniMindConfig.from_dict(config))
    return load_pretrained(model, ckpt).to(device).eval().requires_grad_(False)
