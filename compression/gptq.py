"""GPTQ (Frantar et al. 2022): one-shot weight quantization that rounds one input column at a time and pushes
each column's rounding error onto the columns not yet rounded, weighted by the inverse Hessian of the layer's
reconstruction loss, so that the layer's *output* on real inputs moves as little as possible.

    python -m compression.evaluate --methods gptq       # int4 and int3, group 128, against round-to-nearest

For a linear layer W (N, K) with calibration inputs X (K, tokens), the loss ||W X - Q X||^2 has the Hessian
H = 2 X X^T (K, K), the same for every output row. The Optimal Brain Surgeon step for rounding column j to q_j:

    err = (w_j - q_j) / [H^-1]_jj           W[:, j+1:] -= err * [H^-1]_{j, j+1:}                (paper eq. 2-3)

GPTQ's three practical points (section 4): all rows share one order of columns (left to right), so H^-1 is
computed once; the inverse comes from a Cholesky factor (the rows of the upper factor are exactly the
[H^-1]_{j, j:} / sqrt([H^-1]_jj) the loop needs, numerically stable with damping); and updates are applied
lazily: inside a block of 128 columns at once, to the rest of the matrix once per block (one matmul).
Groups: every ``group`` columns get their own min-max scale and zero, stored in the int4_g128 / int3_g128 format
of quantize.py. In natural order they are chosen from the weights *as updated so far* when the loop reaches the
group's first column. With act_order (the default of evaluate.py: columns visited by decreasing H_jj, the
reference's --act-order) they are fixed up front from the original weights ("static groups"), so the groups stay
contiguous in storage; on SmolLM2 act-order is what makes GPTQ worth it (README).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .calibration import layer_by_layer
from .quantize import minmax_quantize, minmax_scale_zero, pack_bits, pack_grouped, unpack_bits


def slice_grouped(stored: dict, r0: int, r1: int, bits: int, K: int) -> dict:
    """Rows r0:r1 of a grouped format's stored tensors (codes are packed over the whole matrix)."""
    n_rows = stored["scales"].shape[0]
    codes = unpack_bits(stored["codes"], bits, n_rows * K).view(n_rows, K)[r0:r1]
    return {"codes": pack_bits(codes, bits), "scales": stored["scales"][r0:r1].clone(),
            "zeros": stored["zeros"][r0:r1].clone()}


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 (the reference's Hinv)."""
    H = H.clone()
    H += damp * torch.mean(torch.diag(H)) * torch.eye(len(H), dtype=H.dtype)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(Hinv, upper=True)


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group: int = 128, block: int = 128,
                  damp: float = 0.01, act_order: bool = False) -> tuple[dict, torch.Tensor]:
    """W (N, K) and its Hessian H (K, K) -> (the stored int<bits>_g<group> tensors, the dequantised W).
    ``block`` is the lazy-update width (a multiple of ``group`` or equal to it keeps groups inside blocks).

    act_order: visit the columns in order of decreasing H_jj (the inputs with the most energy first, while many
    columns are left to absorb their error; the reference's --act-order). Each group's scale and zero are then
    fixed up front from the original weights ("static groups"), so the stored format stays contiguous groups."""
    W = W.detach().float().clone()
    H = H.float().clone()
    N, K = W.shape
    dead = torch.diag(H) == 0  # an input that never fired: its weights cannot matter, zero them
    H[dead, dead] = 1
    W[:, dead] = 0

    n_groups = -(K // -group)
    scales, zeros = torch.zeros(N, n_groups), torch.zeros(N, n_groups)
    if act_order:
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = minmax_scale_zero(W[:, g * group:(g + 1) * group], bits)
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // group  # the (natural-order) group of each visited column
    Hinv = inverse_hessian_factor(H, damp)

    codes = torch.zeros(N, K)
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        W1, Hinv1 = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
        Err1 = torch.zeros_like(W1)
        for j in range(b1 - b0):
            col = b0 + j
            g = int(group_of[col])
            if not act_order and col % group == 0:  # a new group: its scale from the weights as they stand now
                scales[:, g], zeros[:, g] = minmax_scale_zero(torch.cat([W1[:, j:], W[:, b1:]], 1)[:, :group], bits)
            s, z = scales[:, g], zeros[:, g]
            w = W1[:, j]
            q_code = minmax_quantize(w[:, None], s, z, bits)[:, 0]
            q = (q_code - z) * s
            codes[:, col] = q_code
            err = (w - q) / Hinv1[j, j]
            W1[:, j:] -= err[:, None] * Hinv1[j, j:][None, :]  # 1) inside the block, column by column
            Err1[:, j] = err
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]  # 2) the lazy batch update of everything to the right
    natural = torch.empty_like(codes)
    natural[:, perm] = codes  # back to the input order
    stored = pack_grouped(natural, scales, zeros, bits)
    deq = (natural - zeros.repeat_interleave(group, 1)[:, :K]) * scales.repeat_interleave(group, 1)[:, :K]
    return stored, deq


@torch.no_grad()
def gptq_model(model: nn.Module, samples: torch.Tensor, bits: int, group: int = 128, batch: int = 4,
               damp: float = 0.01, act_order: bool = False) -> dict[str, dict]:
    """Quantize every decoder linear of ``model`` with GPTQ, layer by layer on the calibration ``samples``
    (B, T); the weights are replaced by their dequantised values in place (so the next layer calibrates on what
    the quantized one produces). Returns {full linear name: stored tensors} for QuantLinear / save_packed."""
    stored: dict[str, dict] = {}
    hessians: dict[int, torch.Tensor] = {}  # one per distinct input: q/k/v share theirs, gate/up theirs
    counts: dict[int, int] = {}
    site: dict[str, int] = {}  # linear name -> its input's key

    owner: dict[int, tuple[int, torch.Tensor]] = {}  # id of a batch's input tensor -> (its key, the tensor)

    def observe(i, linears):
        hessians.clear()
        counts.clear()
        site.clear()
        owner.clear()

        def see(name, x):
            if id(x) in owner:  # another linear already read this very tensor: share its Hessian
                site[name] = owner[id(x)][0]
                return
            key = site.setdefault(name, len(site))
            owner[id(x)] = (key, x)  # holding x keeps its id from being reused by a later tensor
            x = x.reshape(-1, x.shape[-1]).float()
            n = counts.get(key, 0)
            H = hessians.get(key, torch.zeros(x.shape[1], x.shape[1]))
            # running mean of 2 x x^T over tokens (the reference averages over sequences: a constant factor, and
            # GPTQ's updates and the relative damping do not depend on H's scale)
            H.mul_(n / (n + len(x))).add_(2 / (n + len(x)) * (x.T @ x))
            hessians[key], counts[key] = H, n + len(x)

        return see

    def change(i, linears):
        # the rows of every linear that reads the same input are quantized in one pass (GPTQ treats rows
        # independently given H): q/k/v together, gate/up together
        by_site: dict[int, list[str]] = {}
        for name in linears:
            by_site.setdefault(site[name], []).append(name)
        for key, names in by_site.items():
            W = torch.cat([linears[n].weight for n in names], 0)
            s, deq = gptq_quantize(W, hessians[key], bits, group, damp=damp, act_order=act_order)
            row = 0
            for n in names:
                lin = linears[n]
                rows = lin.out_features
                lin.weight.data.copy_(deq[row:row + rows])
                stored[f"model.layers.{i}.{n}"] = slice_grouped(s, row, row + rows, bits, lin.in_features)
                row += rows

    layer_by_layer(model, samples, batch, observe, change)
    return stored
