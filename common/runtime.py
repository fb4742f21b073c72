"""Seeding, determinism, device and dtype selection."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices). ``deterministic`` also asks torch for
    deterministic kernels (slower on GPU; on CPU most kernels already are)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; any other name is taken as it is."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_bf16_support(flags: set[str] | None = None, machine: str | None = None) -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 matrices natively, and why: on x86 the AVX512-BF16 or AMX-BF16
    instructions, on Arm the BF16 extension (``bf16`` in /proc/cpuinfo's Features). Without them bf16
    autocast is emulated and slower than fp32. ``flags`` and ``machine`` fake the CPU (tests)."""
    import platform

    machine = (machine or platform.machine()).lower()
    if flags is None:
        try:
            text = open("/proc/cpuinfo", encoding="utf-8").read()
        except OSError:  # not Linux: no flags to read, stay in fp32
            return False, f"{machine}: CPU flags unknown (no /proc/cpuinfo)"
        flags = {f for line in text.splitlines() if line.lower().startswith(("flags", "features"))
                 for f in line.split(":", 1)[1].split()}
    if machine in ("x86_64", "amd64", "i386", "i686"):
        found = sorted(flags & {"avx512_bf16", "amx_bf16"})
        return (True, f"x86 CPU with {' and '.join(found)}") if found else (False, "x86 CPU without AVX512-BF16/AMX")
    if machine in ("aarch64", "arm64"):
        return ("bf16" in flags, "Arm CPU " + ("with" if "bf16" in flags else "without") + " the BF16 extension")
    return False, f"{machine} CPU: no native bf16 known"


def pick_dtype(name: str, device: torch.device, cpu_bf16: bool = False) -> torch.dtype:
    """The autocast dtype: ``auto`` is bf16 on a GPU that supports it, fp16 on other GPUs, fp32 on mps
    and on CPU. ``cpu_bf16=True`` (a script whose bf16 recipe is faster on a CPU that has native bf16, see
    cpu_bf16_support) makes ``auto`` bf16 on such a CPU; emulated bf16 is slower than fp32."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name != "auto":
        if name not in table:
            raise ValueError(f"dtype must be one of auto, {', '.join(table)}; got {name!r}")
        return table[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_bf16 and cpu_bf16_support()[0]:
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision around the forward pass; a no-op in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_threads(n: int) -> None:
    """Intra-op CPU threads (0 leaves torch's default)."""
    if n > 0:
        torch.set_num_threads(n)
