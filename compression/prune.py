"""Pruning: set weights to zero (unstructured, N:M) or remove whole channels (structured).

    python -m compression.evaluate --methods prune      # magnitude vs Wanda at 10-70 %, 2:4, MLP channels

Which weights to drop is a score per weight, lowest first:

    magnitude   |W_ij|                      compared across the whole matrix
    Wanda       |W_ij| * ||X_j||_2          compared within each output row i (Sun et al. 2023, eq. 1)

X_j is input feature j over the calibration tokens. A weight on an input that is large on real text matters
more than its size alone says; LLMs have a few such outlier features, and magnitude pruning cuts the small
weights on them first. Wanda needs no weight update (unlike SparseGPT) and one forward pass.

2:4 semi-structured: in every 4 consecutive inputs of a row keep the 2 best scores; the pattern NVIDIA's sparse
tensor cores (Ampere and later) run at up to twice the dense rate, which is why 50 % in this shape is worth
more than 50 % anywhere. On a CPU neither pattern is faster: a zero costs as much as any other weight in a dense
matmul (bench.py says so with figures).

Structured: drop whole SwiGLU channels (a row of gate_proj and up_proj and the matching column of down_proj)
by a Wanda-style score summed over the channel, so the model really shrinks: a transformers model with a
smaller intermediate_size, loaded with no custom code. The damage is larger; a short fine-tune recovers some.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .calibration import layer_by_layer
from .loading import decoder_linears


def magnitude_mask(W: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask dropping the ``sparsity`` fraction of smallest |W| in the whole matrix."""
    k = int(W.numel() * sparsity)
    if k == 0:
        return torch.ones_like(W, dtype=torch.bool)
    threshold = W.abs().flatten().kthvalue(k).values
    return W.abs() > threshold


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask dropping the ``sparsity`` fraction of lowest scores within each row."""
    k = int(score.shape[1] * sparsity)
    mask = torch.ones_like(score, dtype=torch.bool)
    if k:
        drop = score.topk(k, dim=1, largest=False).indices
        mask.scatter_(1, drop, False)
    return mask


def n_m_mask(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep-mask with exactly n kept in every m consecutive inputs of a row (2:4 by default); when the width is
    not a multiple of m, the last K mod m inputs are kept."""
    N, K = score.shape
    full = K - K % m
    groups = score[:, :full].reshape(N, full // m, m)
    keep = groups.topk(n, dim=2).indices
    mask = torch.ones_like(score, dtype=torch.bool)
    mask[:, :full] = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True).reshape(N, full)
    return mask


def wanda_score(W: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||: the weight's size times its input's size on the calibration text."""
    return W.abs() * x_norm[None, :]


@torch.no_grad()
def prune_magnitude(model: nn.Module, sparsity: float, pattern: str = "unstructured") -> None:
    """Zero the smallest weights of every decoder linear, in place (``pattern`` unstructured or 2:4)."""
    for lin in decoder_linears(model).values():
        W = lin.weight.data
        mask = n_m_mask(W.abs()) if pattern == "2:4" else magnitude_mask(W, sparsity)
        W.mul_(mask)


@torch.no_grad()
def input_norms(model: nn.Module, samples: torch.Tensor, batch: int = 4,
                change=None) -> dict[str, torch.Tensor]:
    """||X_j||_2 over the calibration tokens for the input of every decoder linear, layer by layer (``change(i,
    linears, norms)`` may edit layer i before its outputs feed layer i + 1)."""
    norms: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def observe(i, linears):
        current.clear()

        def see(name, x):
            sq = x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)
            current[name] = current.get(name, 0) + sq

        return see

    def after(i, linears):
        layer_norms = {n: v.sqrt().float() for n, v in current.items()}
        norms.update({f"model.layers.{i}.{n}": v for n, v in layer_norms.items()})
        if change is not None:
            change(i, linears, layer_norms)

    layer_by_layer(model, samples, batch, observe, after)
    return norms


@torch.no_grad()
def prune_wanda(model: nn.Module, samples: torch.Tensor, sparsity: float, pattern: str = "unstructured",
                batch: int = 4) -> None:
    """Wanda, layer by layer: each layer's norms come from the inputs the already-pruned layers below produce."""

    def change(i, linears, layer_norms):
        for name, lin in linears.items():
            score = wanda_score(lin.weight.data, layer_norms[name])
            mask = n_m_mask(score) if pattern == "2:4" else row_mask(score, sparsity)
            lin.weight.data.mul_(mask)

    input_norms(model, samples, batch, change)


def sparsity_of(model: nn.Module) -> float:
    """Fraction of exact zeros over the decoder linears."""
    ws = [m.weight for m in decoder_linears(model).values()]
    return sum((w == 0).sum().item() for w in ws) / sum(w.numel() for w in ws)


@torch.no_grad()
def prune_mlp_channels(model: nn.Module, samples: torch.Tensor, keep_ratio: float, batch: int = 4) -> int:
    """Remove the lowest-scoring SwiGLU channels of every layer (the same count per layer, so the result is a
    plain transformers config with a smaller intermediate_size). Channel c's score: sum_i |W_down[i, c]| * ||h_c||
    with h the down_proj input on the calibration text (Wanda's score summed over the column). Returns the new
    intermediate size."""
    norms = input_norms(model, samples, batch)
    layers = model.model.layers
    inter = layers[0].mlp.down_proj.in_features
    keep_n = max(1, int(round(inter * keep_ratio)))
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        score = (mlp.down_proj.weight.abs() * norms[f"model.layers.{i}.mlp.down_proj"][None, :]).sum(0)
        keep = score.topk(keep_n).indices.sort().values
        for name in ("gate_proj", "up_proj"):  # rows = channels
            old = getattr(mlp, name)
            new = nn.Linear(old.in_features, keep_n, bias=old.bias is not None)
            new.weight.data = old.weight.data[keep].clone()
            if old.bias is not None:
                new.bias.data = old.bias.data[keep].clone()
            setattr(mlp, name, new)
        old = mlp.down_proj  # columns = channels
        new = nn.Linear(keep_n, old.out_features, bias=old.bias is not None)
        new.weight.data = old.weight.data[:, keep].clone()
        if old.bias is not None:
            new.bias.data = old.bias.data.clone()
        mlp.down_proj = new
    model.config.intermediate_size = keep_n
    return keep_n
