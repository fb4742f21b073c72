"""LoRA and QLoRA fine-tuning: the SFT of train_sft.py, with the pretrained weights frozen and a low-rank
update learned beside each linear layer (lora.py).

    python -m gpt_minimind.train_lora                       # our LoRALinear, r 16, on every q/k/v/o/gate/up/down
    python -m gpt_minimind.train_lora --impl peft           # the same run through peft's get_peft_model
    python -m gpt_minimind.train_lora --quantize-bits 4 --out-dir runs/gpt_minimind/qlora   # QLoRA: NF4 base
    python -m gpt_minimind.train_lora --quantize-bits 8 --out-dir runs/gpt_minimind/lora8   # 8-bit base
    python -m gpt_minimind.infer --chat --ckpt runs/gpt_minimind/lora/final                 # chat with it
    python -m gpt_minimind.eval                                                             # score it

The output, ``final/``, is an adapter in peft's format (a few hundred KB) plus the tokenizer; it names
its base model and is applied on load (eval.py, infer.py). ``--merge`` also writes ``merged/``: a plain
model directory with B A folded into the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.checkpoint import save_pretrained
from common.cli import run_main
from common.results import command_line, make_record
from common.runtime import pick_device, seed_everything, set_threads

from .finetune import SFTConfig, finetune
from .loading import copy_tokenizer, load_model
from .lora import LLAMA_LINEARS, inject_lora, merge_lora, save_adapter


@dataclass
class LoRAConfig(SFTConfig):
    """LoRA / QLoRA fine-tuning of a pretrained checkpoint on conversations."""

    out_dir: str = "runs/gpt_minimind/lora"  # checkpoints, metrics.jsonl, loss.png, final/ (the adapter)
    impl: str = "ours"  # ours (lora.py's LoRALinear) or peft (peft.get_peft_model on the same model)
    r: int = 16  # rank of the update B A
    alpha: float = 32.0  # scale alpha / r (peft's lora_alpha); alpha = 2r is a common choice
    lora_dropout: float = 0.0  # dropout on the adapter's input
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEARS))  # layer names to adapt
    quantize_bits: int = 0  # 0: frozen base in fp32; 4: NF4 (QLoRA); 8: LLM.int8() (bitsandbytes)
    lr: float = 2e-3  # adapters take a larger rate than full fine-tuning
    merge: bool = False  # also write merged/: the base with B A folded in (not for a quantized base)
    run_name: str = "lora_cpu"


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the parameters and buffers hold (a 4-bit weight is packed two per byte, plus its scales)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def main(cfg: LoRAConfig) -> dict:
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model, tok = load_model(cfg.init_from, device)
    full_bytes = weight_bytes(model)
    if cfg.impl == "ours":
        params = inject_lora(model, cfg.r, cfg.alpha, cfg.lora_dropout, tuple(cfg.target_modules), cfg.quantize_bits)
        net = model
    elif cfg.impl == "peft":
        if cfg.quantize_bits:
            raise ValueError("--impl peft runs the full-precision base; use --impl ours for --quantize-bits")
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
                                               target_modules=list(cfg.target_modules)))
        params = [p for p in net.parameters() if p.requires_grad]
    else:
        raise ValueError(f"--impl must be ours or peft, got {cfg.impl!r}")
    adapted_bytes = weight_bytes(model)

    def save_final(final_dir: Path) -> None:
        if cfg.impl == "peft":
            net.save_pretrained(final_dir)
            conf = json.loads((final_dir / "adapter_config.json").read_text())
            conf["base_model_name_or_path"] = str(cfg.init_from)
            (final_dir / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n")
        else:
            save_adapter(model, final_dir, cfg.init_from, cfg.quantize_bits)
        copy_tokenizer(cfg.init_from, final_dir)

    result = finetune(model, tok, cfg, params, device, save_final)
    s = result["summary"]
    s.update({"full_weight_bytes": full_bytes, "weight_bytes_while_training": adapted_bytes,
              "adapter_bytes": (result["final_dir"] / "adapter_model.safetensors").stat().st_size,
              "impl": cfg.impl, "quantize_bits": cfg.quantize_bits, "r": cfg.r})
    (Path(cfg.out_dir) / "train_summary.json").write_text(json.dumps(s, indent=2) + "\n")
    print(f"weights while training: {adapted_bytes / 2**20:.1f} MiB (base in fp32: {full_bytes / 2**20:.1f} MiB) | "
          f"adapter file {s['adapter_bytes'] / 2**10:.0f} KiB")
    if cfg.merge and cfg.impl == "ours" and not cfg.quantize_bits:
        merged_dir = Path(cfg.out_dir) / "merged"
        save_pretrained(merge_lora(model), model.config.to_dict(), merged_dir)
        copy_tokenizer(cfg.init_from, merged_dir)
        result["merged_dir"] = merged_dir
    (Path(cfg.out_dir) / "results.json").write_text(json.dumps([make_record(
        "gpt_minimind", cfg.run_name, "valid_loss", s["valid_loss"], "pretrained_before_sft", s["initial_valid_loss"],
        s["train_wall_s"], command_line("gpt_minimind.train_lora"))], indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_main(main, LoRAConfig)
