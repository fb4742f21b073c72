"""The layers a compressed model is made of, and the small model this chapter trains to have a never-quantised
subject. The formats themselves (how a weight becomes codes and scales and back) are in quantize.py; the
methods that choose the codes (GPTQ) or the zeros (pruning) in gptq.py and prune.py.

    SubjectConfig    the never-quantised subject: a small transformers Llama (train_subject.py trains it)
    QuantLinear      a linear layer stored in a packed format (quantize.py), dequantised on the fly in forward
    LoRALinear       a frozen base (a QuantLinear, or nn.Linear) plus a trainable low-rank update: QLoRA
    replace_linears  swap the decoder's nn.Linear layers for other modules, in place
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .loading import decoder_linears
from .quantize import dequantize, quantize


@dataclass
class SubjectConfig:
    """The subject's shape: a Llama (RMSNorm, RoPE, GQA, SwiGLU) small enough to train in minutes on 2 cores.
    Widths are multiples of 128, so that 128-wide groups and FP8's 128x128 blocks tile every matrix."""

    hidden_size: int = 256  # width of the residual stream (a multiple of 128)
    intermediate_size: int = 768  # SwiGLU width (a multiple of 128)
    num_hidden_layers: int = 6  # decoder blocks
    num_attention_heads: int = 4  # query heads of width hidden_size / heads
    num_key_value_heads: int = 2  # key/value heads (grouped-query attention)
    max_position_embeddings: int = 256  # the training context
    vocab_size: int = 0  # 0 = the tokenizer's (set in train_subject.main)

    def to_llama(self):
        """The transformers LlamaConfig of this shape (tied embeddings, as SmolLM2)."""
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                           num_attention_heads=self.num_attention_heads,
                           num_key_value_heads=self.num_key_value_heads,
                           max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=True,
                           rope_theta=10000.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)


class QuantLinear(nn.Module):
    """y = x W^T + b with W kept only as the packed tensors of a format (codes, scales, ...), which are buffers:
    they are what state_dict() and the file hold. forward dequantises W to fp32 and multiplies ("weight-only"
    quantization: it saves memory and bytes read, not arithmetic; on a CPU the unpacking costs time, bench.py)."""

    def __init__(self, fmt: str, shape: tuple[int, int], tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.fmt, self.out_features, self.in_features = fmt, shape[0], shape[1]
        self.names = list(tensors)
        for k, v in tensors.items():
            self.register_buffer(k, v)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str) -> QuantLinear:
        """Round-to-nearest codes of ``linear.weight`` in ``fmt``."""
        w = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(fmt, tuple(w.shape), quantize(w, fmt), bias)

    def stored(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.names}

    def weight_fp32(self) -> torch.Tensor:
        return dequantize(self.stored(), self.fmt, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_fp32().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, format={self.fmt}"


class LoRALinear(nn.Module):
    """LoRA (Hu et al. 2021, eq. 3) on a frozen base: y = base(x) + (alpha / r) * dropout(x) A^T B^T.
    A (r, in) starts Kaiming-uniform and B (out, r) at zero, so training starts from the base model exactly
    (peft's initialisation). With a QuantLinear base in nf4_dq this is QLoRA (Dettmers et al. 2023): gradients
    flow through the dequantised frozen weight into A and B only."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.r, self.scaling = r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling


def replace_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> int:
    """Replace each decoder nn.Linear by ``make(name, linear)``, in place; the count."""
    targets = decoder_linears(model)
    for name, linear in targets.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(name, linear))
    return len(targets)
