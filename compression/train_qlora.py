"""QLoRA two ways on the same model, data and seed: our NF4 (double-quantised) QuantLinear under our LoRALinear,
and bitsandbytes' Linear4bit under peft's LoRA, the way users run QLoRA. The losses should track each other.

    python -m compression.train_qlora                      # both, 30 steps each, about 5 minutes on 2 cores
    python -m compression.train_qlora --impl ours          # one of them

Both bases hold the same NF4 codes (tests/test_compression.py proves the codes equal bitsandbytes' bit for bit;
the double-quantised scales agree except at rare near-ties of bitsandbytes' approximate 8-bit search) and both
compute in fp32, so what is left to differ is the arithmetic order. The LoRA matrices start equal: A from a
generator seeded by the layer's name, B at zero, in both. Writes runs/compression/qlora/: metrics per
implementation, the two loss curves (loss.png) and summary.json with the largest relative gap.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import run_main
from common.errors import UserError
from common.results import command_line, make_record
from common.runtime import seed_everything, set_threads

from .dataset import encode, load_splits, random_windows
from .loading import _quiet_transformers, load_model, resolve_model
from .model import LoRALinear, QuantLinear, replace_linears

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class QLoRAConfig:
    """QLoRA with our NF4 + LoRA against bitsandbytes + peft."""

    model: str = "smollm2"  # smollm2, subject, or a transformers Llama-family directory
    impl: str = "both"  # ours, bnb, or both
    r: int = 8  # LoRA rank (>= 1)
    lora_alpha: float = 16.0  # LoRA's alpha: the update is scaled by alpha / r (> 0)
    text_file: str = ""  # your own UTF-8 text; empty: the Shakespeare training plays
    seq_len: int = 128  # tokens per window (>= 16)
    batch_size: int = 4  # windows per step
    max_iters: int = 30  # optimizer steps per implementation (>= 1)
    lr: float = 2e-4  # AdamW learning rate (constant)
    threads: int = 0  # CPU threads (0 = torch's default)
    seed: int = 1234
    out_dir: str = "runs/compression/qlora"
    run_name: str = "qlora"  # names this run's records in doc/results.json


def lora_a_init(name: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """The starting A of one layer, a function of (layer name, seed) only: Kaiming-uniform, as peft draws it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


def build_ours(cfg: QLoRAConfig):
    model, tok = load_model(cfg.model)

    def make(name, lin):
        layer = LoRALinear(QuantLinear.from_linear(lin, "nf4_dq"), cfg.r, cfg.lora_alpha)
        layer.lora_A.data.copy_(lora_a_init(name, tuple(layer.lora_A.shape), cfg.seed))
        return layer

    replace_linears(model, make)
    model.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return model, tok, params


def build_bnb(cfg: QLoRAConfig):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = resolve_model(cfg.model)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    quiet = _quiet_transformers()
    try:
        base = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=q, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path))
    finally:
        quiet()
    model = get_peft_model(base, LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                            target_modules=list(TARGETS)))
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            plain = name.removeprefix("base_model.model.")
            w = mod.lora_A["default"].weight
            w.data.copy_(lora_a_init(plain, tuple(w.shape), cfg.seed))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, tok, params


def train(cfg: QLoRAConfig, impl: str, out: Path) -> dict:
    from common.log import RunLogger

    seed_everything(cfg.seed)
    model, tok, params = build_ours(cfg) if impl == "ours" else build_bnb(cfg)
    model.train()
    train_text, _ = load_splits(cfg.text_file)
    ids = encode(tok, train_text)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    logger = RunLogger(out / impl, cfg.max_iters, log_every=5)
    logger.write(f"{impl}: {sum(p.numel() for p in params) / 1e6:.2f} M trainable LoRA parameters")
    losses, t0 = [], time.perf_counter()
    for step in range(cfg.max_iters):
        x = random_windows(ids, cfg.seq_len, cfg.batch_size, cfg.seed * 100_003 + step)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        logger.step(step + 1, loss.item(), cfg.lr, x.numel())
    wall = time.perf_counter() - t0
    logger.close()
    return {"losses": losses, "wall_s": wall}


def main(cfg: QLoRAConfig) -> dict:
    if cfg.impl not in ("ours", "bnb", "both"):
        raise UserError(f"--impl {cfg.impl}: expected ours, bnb or both")
    resolve_model(cfg.model)
    set_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = {impl: train(cfg, impl, out) for impl in (("ours", "bnb") if cfg.impl == "both" else (cfg.impl,))}
    summary = {impl: {"losses": r["losses"], "wall_s": r["wall_s"]} for impl, r in runs.items()}
    if len(runs) == 2:
        a, b = runs["ours"]["losses"], runs["bnb"]["losses"]
        gaps = [abs(x - y) / abs(y) for x, y in zip(a, b)]
        summary["max_relative_gap"] = max(gaps)
        summary["final_losses"] = {"ours": a[-1], "bnb": b[-1]}
        print(f"loss: first {a[0]:.4f} vs {b[0]:.4f} | last {a[-1]:.4f} vs {b[-1]:.4f} | largest relative gap over "
              f"{len(a)} steps {100 * max(gaps):.3f} % | wall {runs['ours']['wall_s']:.0f} s vs "
              f"{runs['bnb']['wall_s']:.0f} s")
        draw(a, b, out / "loss.png")
        records = [make_record("compression", cfg.run_name, "qlora_max_relative_loss_gap", max(gaps), "bnb_peft", 0.0,
                               runs["ours"]["wall_s"], command_line("compression.train_qlora"))]
        (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def draw(ours: list[float], bnb: list[float], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.0), dpi=100)
    ax.plot(range(1, len(bnb) + 1), bnb, "-", color="tab:gray", lw=3, alpha=0.6, label="bitsandbytes + peft")
    ax.plot(range(1, len(ours) + 1), ours, "--", color="tab:blue", label="ours (nf4_dq + LoRALinear)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    run_main(main, QLoRAConfig)
