"""LoRA written out (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), and the
QLoRA base (Dettmers et al. 2023): frozen weights stored in 4-bit NF4 or 8-bit by bitsandbytes.

A frozen linear layer W (out x in) gets a trainable low-rank update:

    y = W x + (alpha / r) * B A x,     A: r x in,  B: out x r,  r << in, out

B starts at zero, so training starts exactly from the pretrained model; A starts random (Kaiming
uniform, as peft). Only A and B are trained: r * (in + out) numbers per layer instead of in * out.
After training, B A can be merged into W (no extra latency) or kept apart as a small adapter file.

Adapters are saved in peft's format (adapter_config.json + adapter_model.safetensors with peft's key
names), so ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(export_dir), adapter_dir)``
loads them on top of export_hf.py's transformers copy of the base model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from common.checkpoint import atomic_write_text

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen ``base`` layer (nn.Linear, or bitsandbytes' Linear4bit / Linear8bitLt) plus B A."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, self.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's default, as peft
        nn.init.zeros_(self.lora_B.weight)  # B A = 0: the wrapped layer starts equal to the base
        self.merged = False
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A: the (out, in) matrix this adapter adds to W."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (alpha / r) B A: afterwards the layer costs what the base costs."""
        if not isinstance(self.base, nn.Linear):
            raise TypeError("merging into a quantized base would re-quantize it; merge into a full-precision copy")
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def quantize_linear(linear: nn.Linear, bits: int) -> nn.Module:
    """The same layer with its weight stored by bitsandbytes: 4-bit NF4 (blocks of 64, one absmax each)
    or 8-bit (LLM.int8(), one scale per row). Forward de-quantizes on the fly; the weight is frozen."""
    import bitsandbytes as bnb

    w = linear.weight.data.float().cpu()
    if bits == 4:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, quant_type="nf4",
                              compute_dtype=torch.float32)
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
        # On a CPU with AVX-512 BF16, bitsandbytes repacks the weight for a faster inference kernel the
        # first time the layer runs in eval mode (our held-out evaluation), and keeps using that kernel
        # afterwards, also in training; it has no backward, so gradients would stop at every 4-bit layer
        # and the adapters below it would train on a truncated gradient. Keep the differentiable path.
        q.support_avx512bf16_for_cpu = False
        # checkpoints keep the packed weight only: the quantization constants (absmax, code book) are
        # rebuilt identically when the base is quantized again on load, and cannot be loaded in place
        q._register_state_dict_hook(_drop_nf4_constants)
    elif bits == 8:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return q.to(linear.weight.device)  # moving to the device is what quantizes


def _drop_nf4_constants(module: nn.Module, state: dict, prefix: str, _metadata) -> None:
    for key in [k for k in state if k.startswith(prefix + "weight.")]:
        del state[key]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                target_modules: tuple[str, ...] = LLAMA_LINEARS, quantize_bits: int = 0) -> list[nn.Parameter]:
    """Freeze ``model``, wrap every nn.Linear whose name ends with one of ``target_modules`` in a
    LoRALinear (its base first quantized to ``quantize_bits`` 4 or 8 for QLoRA), and return the new
    trainable parameters. The embeddings and lm_head stay as they are (frozen)."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in target_modules]
    if not names:
        raise ValueError(f"no nn.Linear named {target_modules} in the model")
    for name in names:
        base = model.get_submodule(name)
        if quantize_bits:
            base = quantize_linear(base, quantize_bits)
        wrapped = LoRALinear(base, r, alpha, dropout).to(next(model.parameters()).device)
        _replace(model, name, wrapped)
    return [p for n, p in model.named_parameters() if "lora_" in n]


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.merge()
            _replace(model, name, m.base)
    return model


# ---------------------------------------------------------------------------------------------------
# peft's file format
# ---------------------------------------------------------------------------------------------------

def peft_key(name: str) -> str:
    """Our 'model.layers.0.self_attn.q_proj.lora_A.weight' -> peft's
    'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' (it saves without the adapter name)."""
    return "base_model.model." + name


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_dir: str | Path, quantize_bits: int = 0) -> Path:
    """adapter_model.safetensors (the A and B matrices only) + adapter_config.json, in peft's format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    state = {peft_key(n): p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}
    tmp = out / "adapter_model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "adapter_model.safetensors")
    targets = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": layers[0].r, "lora_alpha": layers[0].alpha,
              "lora_dropout": 0.0, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
              "base_model_name_or_path": str(base_model_dir), "inference_mode": True}
    atomic_write_text(out / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    # ours, beside peft's file: how the base was stored while training, so loading quantizes it the same way
    (out / "base_quantization.json").unlink(missing_ok=True)
    if quantize_bits:
        atomic_write_text(out / "base_quantization.json", json.dumps({"bits": quantize_bits}) + "\n")
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json of a LoRA adapter directory (peft's format); other peft types are refused."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir}/adapter_config.json: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    return config


def apply_adapter(model: nn.Module, adapter_dir: str | Path, config: dict | None = None) -> nn.Module:
    """Inject LoRA layers into ``model`` (its base quantized as during training) and load the adapter's A
    and B; every key must match. loading.py's load_model finds and loads the base model first."""
    adapter_dir = Path(adapter_dir)
    config = config or read_adapter_config(adapter_dir)
    quant = adapter_dir / "base_quantization.json"
    bits = json.loads(quant.read_text())["bits"] if quant.is_file() else 0
    inject_lora(model, config["r"], config["lora_alpha"], 0.0, tuple(config["target_modules"]), bits)
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    ours = {n: p for n, p in model.named_parameters() if "lora_" in n}
    want = {peft_key(n) for n in ours}
    if set(state) != want:
        missing, extra = sorted(want - set(state))[:3], sorted(set(state) - want)[:3]
        raise ValueError(f"{adapter_dir}/adapter_model.safetensors does not fit the base model: "
                         f"missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for n, p in ours.items():
            p.copy_(state[peft_key(n)])
    return model
