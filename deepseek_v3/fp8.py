"""Block-wise FP8 in plain torch: the reference the triton kernels (kernels.py) must equal, and the simulated
FP8 linear layer train.py uses with --fp8-sim.

DeepSeek-V3 sec. 3.3.2: every GEMM input is E4M3 (4 exponent bits, 3 mantissa bits, largest value 448) with
fine-grained scales, so that one outlier spoils only its own small block:
  activations  one scale per 1 x 128 tile (per token, per 128 channels)
  weights      one scale per 128 x 128 block
  scale = absmax(block) / 448,  q = cast_e4m3(x / scale),  x ~ q * scale,  accumulation in fp32.
A per-tensor scale (one absmax for the whole tensor) is the baseline it beats: a token 1e4 times larger than
the rest pushes the small ones below E4M3's smallest subnormal (2^-9), where they become 0.

`.to(torch.float8_e4m3fn)` saturates (1000 -> 448; here even inf -> 448), so an overflow would pass silently;
dividing by absmax / 448 keeps every value inside +-448, so the cast only rounds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn


def _pad_to(x: torch.Tensor, multiple: int, dim: int) -> torch.Tensor:
    extra = -x.shape[dim] % multiple
    if not extra:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return F.pad(x, pad)


def act_quant_ref(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> fp8 values (..., K) and fp32 scales (..., ceil(K / block)): one scale per 1 x block tile."""
    K = x.shape[-1]
    tiles = _pad_to(x.float(), block, -1).unflatten(-1, (-1, block))  # (..., K/b, b)
    scale = tiles.abs().amax(-1).clamp(min=1e-12) / E4M3_MAX  # (..., K/b)
    q = (tiles / scale[..., None]).to(FP8).flatten(-2)[..., :K]
    return q, scale


def act_dequant_ref(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    K = q.shape[-1]
    tiles = _pad_to(q.float(), block, -1).unflatten(-1, (-1, block))
    return (tiles * scale[..., None]).flatten(-2)[..., :K]


def weight_quant_ref(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> fp8 (N, K) and fp32 scales (ceil(N / block), ceil(K / block)): one per block x block."""
    N, K = w.shape
    p = _pad_to(_pad_to(w.float(), block, 0), block, 1)
    blocks = p.view(p.shape[0] // block, block, p.shape[1] // block, block)  # (N/b, b, K/b, b)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX  # (N/b, K/b)
    q = (blocks / scale[:, None, :, None]).to(FP8).view_as(p)[:N, :K]
    return q, scale


def weight_dequant_ref(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    N, K = q.shape
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:N, :K]
    return q.float() * full


def fp8_gemm_ref(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                 block: int = 128) -> torch.Tensor:
    """a (M, K) fp8 with per-tile scales a_s (M, K/b); b (N, K) fp8 with block scales b_s (N/b, K/b)
    -> a @ b^T (M, N) in fp32: each K-block's partial product scaled by a_s[m, k] * b_s[n, k], then summed
    (what the kernel does; numerically the same as dequantising first)."""
    return act_dequant_ref(a, a_s, block) @ weight_dequant_ref(b, b_s, block).T


def per_tensor_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The coarse baseline: one scale for the whole tensor."""
    scale = x.float().abs().amax().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(FP8), scale


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| (Frobenius)."""
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's FP8 test measure: 1 - 2<x,y> / (<x,x> + <y,y>) (0 when equal; < 1e-3 is the usual bar)."""
    x, y = x.double(), y.double()
    return (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item()


# ---------------------------------------------------------------------------------------------------
# Simulated FP8 training: quantise-dequantise both inputs of all three GEMMs
# ---------------------------------------------------------------------------------------------------

def fake_quant_tiles(x: torch.Tensor, block: int = 128, dim: int = -1) -> torch.Tensor:
    """x with every 1 x block tile along `dim` rounded through E4M3 (scaled by its own absmax)."""
    moved = x.movedim(dim, -1)
    q, s = act_quant_ref(moved, block)
    return act_dequant_ref(q, s, block).to(x.dtype).movedim(-1, dim)


def fake_quant_blocks(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    q, s = weight_quant_ref(w, block)
    return weight_dequant_ref(q, s, block).to(w.dtype)


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T with the inputs of the forward (Fprop) and of both backward GEMMs (Dgrad, Wgrad) rounded to
    E4M3 at V3's granularity; outputs, gradients' accumulation and the master weights stay fp32.
      Fprop  y  = Q_tile(x)  Q_block(W)^T          tiles along K (the reduced dim)
      Dgrad  dx = Q_tile(dy) Q_block(W)            tiles of dy along its channels (the reduced dim)
      Wgrad  dW = Q_tile(dy)^T Q_tile(x)           tiles along the tokens (the reduced dim here)"""

    @staticmethod
    def forward(ctx, x, weight, block):
        ctx.save_for_backward(x, weight)
        ctx.block = block
        return fake_quant_tiles(x, block) @ fake_quant_blocks(weight, block).T

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        b = ctx.block
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = (fake_quant_tiles(dy2, b) @ fake_quant_blocks(weight, b)).view_as(x)
        dw = fake_quant_tiles(dy2, b, dim=0).T @ fake_quant_tiles(x2, b, dim=0)
        return dx, dw, None


class FP8Linear(nn.Linear):
    """nn.Linear whose matrix products run through simulated block-wise FP8 (no bias: V3 has none)."""

    block = 128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FP8LinearFunction.apply(x, self.weight, self.block)


def convert_to_fp8_sim(model: nn.Module, skip: tuple[str, ...] = ("lm_head", "gate", "eh_proj")) -> int:
    """Swap every bias-free nn.Linear inside the decoder for FP8Linear (weights shared, nothing copied).
    V3 keeps the embedding, the output head, the MoE gate, the norms and attention's own products in higher
    precision; the MTP projection too, here. Returns how many were swapped."""
    n = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and child.bias is None and not any(s in full.split(".") for s in skip):
                child.__class__ = FP8Linear
                n += 1
    return n
