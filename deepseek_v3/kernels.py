"""Block-wise FP8 kernels in triton: act_quant (1 x 128 tiles), weight_quant / weight_dequant (128 x 128
blocks) and an FP8 GEMM that applies both scales inside its K loop, accumulating in fp32. fp8.py holds the
plain-torch reference each one equals (tests/test_deepseek_v3.py).

On a CUDA GPU (FP8 tensor cores from sm_89) they run natively. On a CPU triton runs them only in its
interpreter (TRITON_INTERPRET=1, set before triton is imported), whose own cast to fp8 rounds about 2 % of
values to the wrong neighbour: there the quantising kernels store the scaled fp32 values and torch does the
cast (`cast_in_kernel=False`, chosen automatically off CUDA). The scales, the blocking and the GEMM are
the kernels' own either way.

    TRITON_INTERPRET=1 python -m deepseek_v3.kernels        # checks every kernel against fp8.py, on a CPU
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fp8 import FP8

BLOCK = 128


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def act_quant_kernel(x_ptr, y_ptr, s_ptr, K, n_tiles_k, BLOCK: tl.constexpr, CAST: tl.constexpr):
    """One program per 1 x BLOCK tile of x (M, K): s = absmax / 448, y = x / s."""
    pid = tl.program_id(0)
    row, tile = pid // n_tiles_k, pid % n_tiles_k
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * K + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x)), 1e-12) / 448.0
    y = x / s
    if CAST:
        y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * K + cols, y, mask=mask)
    tl.store(s_ptr + pid, s)


@triton.jit
def weight_quant_kernel(w_ptr, y_ptr, s_ptr, N, K, BLOCK: tl.constexpr, CAST: tl.constexpr):
    """One program per BLOCK x BLOCK block of w (N, K)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    offs = rows[:, None] * K + cols[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(w)), 1e-12) / 448.0
    y = w / s
    if CAST:
        y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, y, mask=mask)
    tl.store(s_ptr + pid_n * tl.num_programs(1) + pid_k, s)


@triton.jit
def weight_dequant_kernel(q_ptr, s_ptr, y_ptr, N, K, BLOCK: tl.constexpr):
    """y = q * s, one program per block (the official kernel.py's weight_dequant)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    offs = rows[:, None] * K + cols[None, :]
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + pid_n * tl.num_programs(1) + pid_k)
    tl.store(y_ptr + offs, q * s, mask=mask)


@triton.jit
def fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, M, N, K, n_k,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c (M, N) = a (M, K) @ b (N, K)^T, both fp8. For each K block: the fp8 x fp8 product accumulated in fp32,
    times a's per-row tile scale and b's block scale, added to the fp32 accumulator."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(n_k):
        ks = kb * BLOCK_K + rk
        a = tl.load(a_ptr + rm[:, None] * K + ks[None, :], mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rn[None, :] * K + ks[:, None], mask=(rn[None, :] < N) & (ks[:, None] < K), other=0.0)
        a_s = tl.load(a_s_ptr + rm * n_k + kb, mask=rm < M, other=0.0)  # (BLOCK_M,) one per row and K block
        b_s = tl.load(b_s_ptr + (pid_n * BLOCK_N // BLOCK_K) * n_k + kb)  # one per (N block, K block)
        acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def act_quant(x: torch.Tensor, block: int = BLOCK, cast_in_kernel: bool | None = None):
    """x (..., K) -> (fp8 (..., K), fp32 scales (..., ceil(K / block)))."""
    cast = x.is_cuda if cast_in_kernel is None else cast_in_kernel
    x2 = x.contiguous().view(-1, x.shape[-1])
    M, K = x2.shape
    n_tiles = triton.cdiv(K, block)
    y = torch.empty(M, K, device=x.device, dtype=FP8 if cast else torch.float32)
    s = torch.empty(M, n_tiles, device=x.device, dtype=torch.float32)
    act_quant_kernel[(M * n_tiles,)](x2, y, s, K, n_tiles, BLOCK=block, CAST=cast)
    if not cast:
        y = y.to(FP8)  # torch's cast: the interpreter's rounds some values wrongly
    return y.view(x.shape), s.view(*x.shape[:-1], n_tiles)


def weight_quant(w: torch.Tensor, block: int = BLOCK, cast_in_kernel: bool | None = None):
    """w (N, K) -> (fp8 (N, K), fp32 scales (ceil(N / block), ceil(K / block)))."""
    cast = w.is_cuda if cast_in_kernel is None else cast_in_kernel
    w = w.contiguous()
    N, K = w.shape
    grid = (triton.cdiv(N, block), triton.cdiv(K, block))
    y = torch.empty(N, K, device=w.device, dtype=FP8 if cast else torch.float32)
    s = torch.empty(*grid, device=w.device, dtype=torch.float32)
    weight_quant_kernel[grid](w, y, s, N, K, BLOCK=block, CAST=cast)
    return (y if cast else y.to(FP8)), s


def weight_dequant(q: torch.Tensor, s: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    N, K = q.shape
    y = torch.empty(N, K, device=q.device, dtype=torch.float32)
    weight_dequant_kernel[(triton.cdiv(N, block), triton.cdiv(K, block))](q.contiguous(), s.contiguous(), y, N, K,
                                                                           BLOCK=block)
    return y


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, block: int = BLOCK,
             block_m: int = 64) -> torch.Tensor:
    """a (..., K) fp8 with act_quant's scales, b (N, K) fp8 with weight_quant's scales -> a @ b^T (..., N), fp32."""
    a2, a_s2 = a.contiguous().view(-1, a.shape[-1]), a_s.contiguous().view(-1, a_s.shape[-1])
    M, K = a2.shape
    N = b.shape[0]
    c = torch.empty(M, N, device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block))
    fp8_gemm_kernel[grid](a2, b.contiguous(), c, a_s2, b_s.contiguous(), M, N, K, triton.cdiv(K, block),
                          BLOCK_M=block_m, BLOCK_N=block, BLOCK_K=block)
    return c.view(*a.shape[:-1], N)


def self_check(device: str = "cpu", M: int = 50, N: int = 200, K: int = 300) -> dict:
    """Every kernel against fp8.py's reference on random data -> {name: difference}: the share of fp8 values that
    differ, the largest relative difference of the scales and of the dequantised weights, and the GEMM's
    relative (Frobenius) error against the reference GEMM."""
    from . import fp8

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(M, K, generator=g) * torch.logspace(-3, 3, M)[:, None]).to(device)
    w = torch.randn(N, K, generator=g).to(device) * 0.05
    qx, sx = act_quant(x)
    rqx, rsx = fp8.act_quant_ref(x)
    qw, sw = weight_quant(w)
    rqw, rsw = fp8.weight_quant_ref(w)
    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

    out = {"act_quant_values": (qx.float() != rqx.float()).float().mean().item(),
           "act_quant_scales": rel(sx, rsx),
           "weight_quant_values": (qw.float() != rqw.float()).float().mean().item(),
           "weight_quant_scales": rel(sw, rsw),
           "weight_dequant": rel(weight_dequant(qw, sw), fp8.weight_dequant_ref(rqw, rsw))}
    c, ref = fp8_gemm(qx, sx, qw, sw), fp8.fp8_gemm_ref(rqx, rsx, rqw, rsw)
    out["fp8_gemm_relative"] = fp8.relative_error(c, ref)
    return out


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() and not interpreted() else "cpu"
    if dev == "cpu" and not interpreted():
        raise SystemExit("no CUDA GPU: run with TRITON_INTERPRET=1 (triton's CPU interpreter)")
    for name, value in self_check(dev).items():
        print(f"{name:22s} {value:.3g}")
    print(f"device {dev}{' (TRITON_INTERPRET=1: fp8 cast by torch)' if interpreted() else ''}")
