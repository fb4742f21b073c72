"""Weight formats: how one float matrix becomes small integer codes plus a few scales, how it comes back, and how
many bytes it takes on disk.

    python -m compression.evaluate --methods quant      # every format below on a model: perplexity, bytes, speed

Every format is "absmax scaling + a table of levels" in one of its variants:

    w  ~  scale * level[code]          scale = absmax of a group of weights (so level values lie in [-1, 1])

    format        levels                          group                    bits / weight
    int8_tensor   k / 127, k = -127..127          the whole matrix         8 + 32 / (N K)
    int8_channel  k / 127                         one output row           8 + 32 / K
    int8_block    k / 127                         256 consecutive values   8 + 32 / 256 = 8.125
    fp8_block     E4M3 floats / 448               128 x 128 tile           8 + 32 / 16384 (DeepSeek-V3)
    int4_absmax   k / 7, k = -7..7                64 consecutive values    4 + 32 / 64 = 4.5
    fp4           bitsandbytes' FP4 (E2M1)        64                       4.5
    nf4           the 16 NormalFloat quantiles    64                       4.5 (QLoRA)
    nf4_dq        nf4 with its absmax quantised   64, scales in 256s       4 + 8/64 + 32/(64*256) = 4.127
    int4_g128     min-max (asymmetric) 0..15      128 inputs of one row    4 + (16 + 8) / 128 = 4.19 (GPTQ's)
    int3_g128     min-max 0..7                    128 inputs of one row    3 + 24 / 128 = 3.19

Codes narrower than a byte are packed (pack_bits): two 4-bit codes per byte (first in the high nibble, as
bitsandbytes), eight 3-bit codes per three bytes. ``quantize`` returns the packed tensors, ``dequantize`` reads
only them, and ``save_packed`` / ``load_packed`` write them with safetensors: what is counted is what is stored.
GPTQ (gptq.py) fills the int4_g128 / int3_g128 formats with better codes; the format is the same.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------
# The level tables
# ---------------------------------------------------------------------------------------------------------

# NormalFloat4 (QLoRA, Dettmers et al. 2023, section 3): 2^4 values that are quantiles of N(0, 1), so that each
# level is used equally often by normally distributed weights; 7 negative and 8 positive quantiles plus an exact 0,
# normalised to [-1, 1]. These are bitsandbytes' values (test: its create_normal_map), sorted.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])

# bitsandbytes' FP4: 1 sign, 2 exponent, 1 mantissa bit with exponent bias 2, listed by code (bit pattern) and
# normalised by the largest (12): 0, 1/192 (subnormal), 8, 12, 4, 6, 2, 3 (/12), then the same negated.
FP4_LEVELS = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                           -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]) / 12.0

# the naive 4-bit baseline: evenly spaced, symmetric, 15 levels so that 0 is exact (codes 0 and 1 both mean -1)
INT4_LEVELS = torch.arange(-8, 8).clamp(min=-7).float() / 7.0

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
FP8 = torch.float8_e4m3fn


@functools.cache
def dynamic_map() -> torch.Tensor:
    """The 256 levels of bitsandbytes' signed 8-bit "dynamic" type (Dettmers 2015), which double quantization
    stores the NF4 scales in: a sign, then a run of zero bits whose length is a decimal exponent (10^-6 .. 10^0),
    then a linear fraction in the remaining bits. Dense near 0, sparse near 1: a float with a variable split.
    Returns the levels sorted (test: equal to bitsandbytes.functional.create_dynamic_map()); built once and shared
    (every nf4_dq forward dequantises its scales with it), so callers must not modify it."""
    values = []
    for e in range(7):  # exponent 10^(e - 6); the fraction gets e bits, so 2^e levels per sign
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2.0 * 10 ** (e - 6)).tolist()
        values += mids + [-m for m in mids]
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index (into ``levels``, any order) of the level nearest each x in [-1, 1]. The decision boundaries are the
    midpoints between sorted neighbours (bitsandbytes' rule, so ties go the same way)."""
    order = torch.argsort(levels)
    s = levels[order]
    idx = torch.bucketize(x, (s[:-1] + s[1:]) / 2)
    return order[idx]


# ---------------------------------------------------------------------------------------------------------
# Block-wise absmax with a level table: int8_block, nf4, fp4, int4_absmax, and the double quantization
# ---------------------------------------------------------------------------------------------------------

def blockwise_absmax(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x flattened and scaled into [-1, 1] block by block, each block's absmax). The last block may be short.
    Scaling multiplies by 1 / absmax, as bitsandbytes does for full blocks (x / absmax can differ in the last
    bit; for a short last block bitsandbytes divides, and the tests check that case equal too)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    padded = F.pad(flat, (0, -n % block)).view(-1, block)
    absmax = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:n]
    return scaled, absmax


def expand_blocks(values: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """Per-block values repeated over their blocks, cut to n elements."""
    return values.repeat_interleave(block)[:n]


def quantize_blockwise(x: torch.Tensor, levels: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 index of the nearest level per value, fp32 absmax per block): bitsandbytes' quantize_blockwise /
    quantize_4bit before packing."""
    scaled, absmax = blockwise_absmax(x, block)
    return nearest_level(scaled, levels).to(torch.uint8), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, block: int,
                         shape) -> torch.Tensor:
    n = math.prod(shape)
    return (levels[codes[:n].long()] * expand_blocks(absmax, block, n)).view(shape)


def double_quantize(absmax: torch.Tensor, block: int = 256) -> dict[str, torch.Tensor]:
    """QLoRA's double quantization (section 3): the fp32 absmax of every 64 weights costs 32 / 64 = 0.5 bit per
    weight; store it instead in 8 bits (the dynamic type) after subtracting its mean (absmax > 0, so centring
    uses the signed type's both halves), with one fp32 absmax per 256 of them: 8/64 + 32/(64 * 256) = 0.127 bit."""
    offset = absmax.mean()
    codes, absmax2 = quantize_blockwise(absmax - offset, dynamic_map(), block)
    return {"absmax_codes": codes, "absmax_scale": absmax2, "absmax_offset": offset.reshape(1)}


def double_dequantize(t: dict[str, torch.Tensor], n_blocks: int, block: int = 256) -> torch.Tensor:
    return dequantize_blockwise(t["absmax_codes"], t["absmax_scale"], dynamic_map(), block,
                                (n_blocks,)) + t["absmax_offset"]


# ---------------------------------------------------------------------------------------------------------
# Packing codes narrower than a byte
# ---------------------------------------------------------------------------------------------------------

def pack_bits(codes: torch.Tensor, bits: int, pad: int = 0) -> torch.Tensor:
    """uint8 codes < 2^bits -> bytes: every 8 codes become ``bits`` bytes, first code in the highest bits
    (for 4 bits: (c0 << 4) | c1, bitsandbytes' layout). The tail is padded with the code ``pad``."""
    c = F.pad(codes.reshape(-1).long(), (0, -codes.numel() % 8), value=pad).view(-1, 8)
    shifts = torch.arange(7, -1, -1) * bits
    word = (c << shifts).sum(dim=1)  # 8 * bits <= 64 bits
    byte_shifts = torch.arange(bits - 1, -1, -1) * 8
    return ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of pack_bits: the first n codes as uint8."""
    b = packed.long().view(-1, bits)
    word = (b << (torch.arange(bits - 1, -1, -1) * 8)).sum(dim=1)
    shifts = torch.arange(7, -1, -1) * bits
    return ((word[:, None] >> shifts) & (2 ** bits - 1)).to(torch.uint8).reshape(-1)[:n]


# ---------------------------------------------------------------------------------------------------------
# Min-max (asymmetric) groups along the input dimension: GPTQ's format, filled by round-to-nearest here
# ---------------------------------------------------------------------------------------------------------

def minmax_scale_zero(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``w`` (N, g): scale = (max - min) / (2^b - 1) and the integer zero point, with the range
    widened to include 0 (so a zero weight stays zero, as GPTQ's quantizer does). The scale is rounded to fp16,
    the precision it is stored in, before any code is chosen."""
    qmax = 2 ** bits - 1
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    empty = hi == lo  # an all-zero group (pruned, or dead inputs): any range works, use [-1, 1] as the reference
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    scale = ((hi - lo) / qmax).half().float()
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def minmax_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes clamp(round(w / scale) + zero, 0, 2^b - 1) for a column block ``w`` (N, c) and per-row scale/zero."""
    return (torch.round(w / scale[:, None]) + zero[:, None]).clamp(0, 2 ** bits - 1)


def pack_grouped(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> dict:
    """codes (N, K), scales and zeros (N, groups) -> the stored tensors (fp16 scales, uint8 zeros)."""
    return {"codes": pack_bits(codes.to(torch.uint8), bits), "scales": scales.half(), "zeros": zeros.to(torch.uint8)}


def rtn_grouped(w: torch.Tensor, bits: int, group: int) -> dict:
    """Round-to-nearest in min-max groups of ``group`` inputs per row: the baseline GPTQ is measured against."""
    N, K = w.shape
    codes, scales, zeros = torch.empty(N, K), [], []
    for g0 in range(0, K, group):
        s, z = minmax_scale_zero(w[:, g0:g0 + group].float(), bits)
        codes[:, g0:g0 + group] = minmax_quantize(w[:, g0:g0 + group].float(), s, z, bits)
        scales.append(s)
        zeros.append(z)
    return pack_grouped(codes, torch.stack(scales, 1), torch.stack(zeros, 1), bits)


def dequantize_grouped(t: dict, bits: int, group: int, shape) -> torch.Tensor:
    N, K = shape
    codes = unpack_bits(t["codes"], bits, N * K).view(N, K).float()
    scale = t["scales"].float().repeat_interleave(group, 1)[:, :K]
    zero = t["zeros"].float().repeat_interleave(group, 1)[:, :K]
    return (codes - zero) * scale


# ---------------------------------------------------------------------------------------------------------
# FP8 E4M3 in 128 x 128 tiles (DeepSeek-V3's weight format)
# ---------------------------------------------------------------------------------------------------------

# Copied from deepseek_v3/fp8.py::_pad_to
def _pad_to(x: torch.Tensor, multiple: int, dim: int) -> torch.Tensor:
    extra = -x.shape[dim] % multiple
    if not extra:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return F.pad(x, pad)


# Copied from deepseek_v3/fp8.py::weight_quant_ref
def weight_quant_ref(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> fp8 (N, K) and fp32 scales (ceil(N / block), ceil(K / block)): one per block x block."""
    N, K = w.shape
    p = _pad_to(_pad_to(w.float(), block, 0), block, 1)
    blocks = p.view(p.shape[0] // block, block, p.shape[1] // block, block)  # (N/b, b, K/b, b)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX  # (N/b, K/b)
    q = (blocks / scale[:, None, :, None]).to(FP8).view_as(p)[:N, :K]
    return q, scale


# Copied from deepseek_v3/fp8.py::weight_dequant_ref
def weight_dequant_ref(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    N, K = q.shape
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:N, :K]
    return q.float() * full


# ---------------------------------------------------------------------------------------------------------
# One entry point per direction
# ---------------------------------------------------------------------------------------------------------

FORMATS = ("int8_tensor", "int8_channel", "int8_block", "fp8_block", "int4_absmax", "fp4", "nf4", "nf4_dq",
           "int4_g128", "int3_g128")
INT8_BLOCK = 256  # int8_block's block
BLOCK_4BIT = 64  # nf4 / fp4 / int4_absmax block (bitsandbytes' default)
GROUP = 128  # int4_g128 / int3_g128 group (GPTQ's usual)
INT8_LEVELS = torch.arange(-127, 128).float() / 127.0  # index i <-> int8 value i - 127
TABLES = {"int4_absmax": INT4_LEVELS, "fp4": FP4_LEVELS, "nf4": NF4_LEVELS, "nf4_dq": NF4_LEVELS}


def grouped_bits(fmt: str) -> int:
    return {"int4_g128": 4, "int3_g128": 3}[fmt]


def quantize(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """A weight matrix (N, K) -> the tensors that store it in ``fmt`` (round-to-nearest codes)."""
    w = w.detach().float()
    if fmt == "int8_tensor":
        scale = w.abs().amax().clamp(min=1e-12) / 127
        return {"codes": torch.round(w / scale).to(torch.int8), "scale": scale.reshape(1)}
    if fmt == "int8_channel":
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,): one per output row
        return {"codes": torch.round(w / scale[:, None]).to(torch.int8), "scale": scale}
    if fmt == "int8_block":
        idx, absmax = quantize_blockwise(w, INT8_LEVELS, INT8_BLOCK)
        return {"codes": (idx.long() - 127).to(torch.int8), "absmax": absmax}
    if fmt == "fp8_block":
        q, scale = weight_quant_ref(w)
        return {"codes": q, "scale": scale}
    if fmt in TABLES:
        codes, absmax = quantize_blockwise(w, TABLES[fmt], BLOCK_4BIT)
        out = {"codes": pack_bits(codes, 4, pad=int(nearest_level(torch.zeros(1), TABLES[fmt])))}  # as bnb
        return out | (double_quantize(absmax) if fmt == "nf4_dq" else {"absmax": absmax})
    if fmt in ("int4_g128", "int3_g128"):
        return rtn_grouped(w, grouped_bits(fmt), GROUP)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def dequantize(t: dict[str, torch.Tensor], fmt: str, shape) -> torch.Tensor:
    """The stored tensors -> the fp32 matrix they stand for."""
    N, K = shape
    if fmt in ("int8_tensor", "int8_channel"):
        scale = t["scale"] if fmt == "int8_tensor" else t["scale"][:, None]
        return t["codes"].float() * scale
    if fmt == "int8_block":
        return dequantize_blockwise((t["codes"].long() + 127).to(torch.uint8), t["absmax"], INT8_LEVELS,
                                    INT8_BLOCK, shape)
    if fmt == "fp8_block":
        return weight_dequant_ref(t["codes"], t["scale"])
    if fmt in TABLES:
        n_blocks = -(N * K // -BLOCK_4BIT)
        absmax = double_dequantize(t, n_blocks) if fmt == "nf4_dq" else t["absmax"]
        return dequantize_blockwise(unpack_bits(t["codes"], 4, N * K), absmax, TABLES[fmt], BLOCK_4BIT, shape)
    if fmt in ("int4_g128", "int3_g128"):
        return dequantize_grouped(t, grouped_bits(fmt), GROUP, shape)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def fake_quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w rounded through ``fmt`` and back (what the quantized model computes with)."""
    return dequantize(quantize(w, fmt), fmt, tuple(w.shape)).to(w.dtype)


def nbytes(t: dict[str, torch.Tensor]) -> int:
    """Bytes of the stored tensors."""
    return sum(v.numel() * v.element_size() for v in t.values())


def bits_per_weight(fmt: str, shape=(4096, 4096)) -> float:
    """Stored bits per weight of ``fmt`` for a matrix of ``shape`` (measured from the packed tensors)."""
    return 8 * nbytes(quantize(torch.randn(shape), fmt)) / math.prod(shape)


# ---------------------------------------------------------------------------------------------------------
# Files: safetensors holds the packed tensors, its metadata the format and shape of each layer
# ---------------------------------------------------------------------------------------------------------

def save_packed(path: str | os.PathLike, layers: dict[str, tuple[str, tuple, dict]],
                rest: dict[str, torch.Tensor] | None = None) -> int:
    """Write {layer name: (format, shape, stored tensors)} and the model's other (full precision) tensors to one
    safetensors file, atomically. Returns the file's size in bytes."""
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for name, (fmt, shape, t) in layers.items():
        meta[name] = {"format": fmt, "shape": list(shape)}
        tensors |= {f"{name}.{k}": v.contiguous() for k, v in t.items()}
    tensors |= {k: v.contiguous() for k, v in (rest or {}).items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"quantized_layers": json.dumps(meta)})
    os.replace(tmp, path)
    return path.stat().st_size


def load_packed(path: str | os.PathLike) -> tuple[dict[str, tuple[str, tuple, dict]], dict[str, torch.Tensor]]:
    """The inverse of save_packed: (layers, the other tensors)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("quantized_layers", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layers = {}
    for name, m in meta.items():
        prefix = name + "."
        layers[name] = (m["format"], tuple(m["shape"]),
                        {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)})
    return layers, tensors
