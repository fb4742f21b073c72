"""Learning-rate schedules, gradient accumulation and clipping."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def inverse_sqrt(step: int, warmup: int, d_model: int) -> float:
    """The schedule of "Attention Is All You Need" (sec. 5.3):
    lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)  (step counted from 1)."""
    step = step + 1
    return d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int,
                   d_model: int = 512, min_ratio: float = 0.1) -> LambdaLR:
    """``cosine``: warmup + cosine on the optimizer's lr; ``noam``: the 2017 paper's schedule,
    scaled by the optimizer's lr (set lr=1 for the paper's exact values)."""
    if kind == "cosine":
        fn = lambda s: warmup_cosine(s, warmup, total, min_ratio)  # noqa: E731
    elif kind == "noam":
        fn = lambda s: inverse_sqrt(s, warmup, d_model)  # noqa: E731
    elif kind == "constant":
        fn = lambda s: 1.0  # noqa: E731
    else:
        raise ValueError(f"schedule must be cosine, noam or constant; got {kind!r}")
    return LambdaLR(optimizer, fn)


def clip_grad(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm (no-op when ``max_norm <= 0``); returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    if max_norm <= 0:
        return float(torch.norm(torch.stack([p.grad.detach().norm() for p in params]))) if params else 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def accumulation_slices(batch_size: int, micro_batch: int) -> list[slice]:
    """Split a batch into micro-batches for gradient accumulation. Weight each micro loss by its
    share of the batch (``len(slice) / batch_size``) so the summed gradient equals the full batch's."""
    if micro_batch <= 0 or micro_batch >= batch_size:
        return [slice(0, batch_size)]
    return [slice(i, min(i + micro_batch, batch_size)) for i in range(0, batch_size, micro_batch)]
