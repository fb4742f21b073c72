"""Benchmark figures: throughput, peak memory, and model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / peak FLOP/s of this machine. The peak is *measured* here with a
large matmul (not read off a datasheet), so the ratio is meaningful on any CPU or GPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """CUDA: max allocated since the last reset. CPU: the process's peak resident set size."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        # Linux: this process's own high-water mark. (ru_maxrss is not: Linux carries it over from the
        # parent through fork and exec, so a subprocess of a big process reports its parent's peak.)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        # ru_maxrss is KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if os.uname().sysname == "Darwin" else rss * 1024
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], repeats: int = 3, warmup: int = 1,
            device: torch.device | None = None) -> tuple[float, float]:
    """Best and spread (max - min) of ``repeats`` timed calls, in seconds."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), max(times) - min(times)


def time_rounds(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                device: torch.device | None = None) -> dict[str, list[float]]:
    """Time several contenders in rounds (A B C, A B C, ...), so that a slow spell of a shared machine
    hits all of them alike. -> name: the seconds of each round, in order."""
    device = device or torch.device("cpu")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                     device: torch.device | None = None) -> dict[str, tuple[float, float]]:
    """``time_rounds`` summed up: name -> (best seconds, max - min)."""
    times = time_rounds(fns, repeats, warmup, device)
    return {name: (min(t), max(t) - min(t)) for name, t in times.items()}


def paired_ratio(reference: list[float], contender: list[float]) -> tuple[float, float, float]:
    """Speed of ``contender`` relative to ``reference`` from the same rounds of ``time_rounds``:
    (median, lowest, highest) of reference[i] / contender[i]. Pairing each round with itself cancels
    the slow spells that hit both; the median ignores the rounds where only one of them was hit."""
    ratios = sorted(r / c for r, c in zip(reference, contender, strict=True))
    n = len(ratios)
    median = ratios[n // 2] if n % 2 else (ratios[n // 2 - 1] + ratios[n // 2]) / 2
    return median, ratios[0], ratios[-1]


def matmul_peak_flops(device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                      n: int | None = None, repeats: int = 3) -> float:
    """Measured FLOP/s of an n x n matmul (2 n^3 FLOPs), best of ``repeats``."""
    device = device or torch.device("cpu")
    n = n or (4096 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, _ = time_fn(lambda: a @ b, repeats=repeats, device=device)
    return 2 * n**3 / best


def transformer_flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token, 6N + 12 L C T (PaLM appendix B / nanoGPT's estimate):
    6 per parameter (forward 2, backward 4) plus attention's QK^T and AV."""
    return 6 * n_params + 12 * n_layers * d_model * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Fraction of the machine's measured peak that the training run achieves."""
    return tokens_per_s * flops_per_token / peak_flops
