"""What both training stages (train_pretrain.py, train_summarize.py) train with: T5's optimizer. The objectives
and the loops stay in the stage scripts."""

from __future__ import annotations

import torch


def make_optimizer(params: list[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    """Adafactor (Shazeer & Stern 2018), T5's optimizer: factored second moments, and each update scaled by
    the RMS of the weight it changes. That matters for T5: its init gives the embedding entries of size 1
    and W_q entries of size 1/sqrt(C D) ~ 0.01, so one AdamW learning rate is tiny for the first and huge
    for the second (see the README). torch's Adafactor also caps the relative step at 1/sqrt(step), so
    after ~1,100 steps at 3e-2 it decays on its own."""
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                 lr=cfg.lr, betas=(0.9, 0.98))
    raise ValueError(f"optimizer must be adafactor or adamw; got {cfg.optimizer!r}")
