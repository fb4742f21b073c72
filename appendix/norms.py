"""BatchNorm, LayerNorm and RMSNorm from scratch: which axes share one mean and variance, which
parameters each learns, and proof that each equals torch's.

    python -m appendix.norms                     # parity table, the batch-dependence check, the figure
    python -m appendix.norms --png doc/appendix_norms.png

For activations x of shape (B, T, C) (a transformer's tokens) or (B, C, H, W) (a CNN's feature maps):

    BatchNorm  y = (x - mean) / sqrt(var + eps) * gamma + beta   statistics per channel, over the batch
               (and every position): (B, T) or (B, H, W). Training uses the batch's statistics and updates
               running averages; evaluation uses the running averages. (Ioffe & Szegedy 2015, Alg. 1)
    LayerNorm  same formula, statistics per token, over its C channels; no running state, so training and
               evaluation agree and one sample never depends on the others. (Ba et al. 2016)
    RMSNorm    y = x / sqrt(mean(x^2) + eps) * gamma: LayerNorm without centring and without beta.
               (Zhang & Sennrich 2019; LLaMA, T5, DeepSeek)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


class BatchNorm(nn.Module):
    """``nn.BatchNorm1d/2d/3d`` in one class: x (B, C, *) normalised per channel over every other axis.

    Running statistics: r <- (1 - momentum) r + momentum * batch_stat, where the running variance takes
    the *unbiased* batch variance (n / (n - 1)) while the normalisation uses the biased one (torch does
    the same; the paper's Alg. 2 uses the unbiased estimate for inference).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))  # gamma
        self.bias = nn.Parameter(torch.zeros(num_features))  # beta
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = [0] + list(range(2, x.dim()))  # every axis except the channels
        shape = [1, -1] + [1] * (x.dim() - 2)  # broadcast (C,) against (B, C, *)
        if self.training:
            # 1) this batch's statistics per channel (biased variance normalises)
            mean = x.mean(dim=axes)
            var = x.var(dim=axes, unbiased=False)
            # 2) update the running averages for evaluation (unbiased variance, as torch)
            n = x.numel() // x.shape[1]
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        # 3) normalise, then scale and shift per channel
        x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return x_hat * self.weight.view(shape) + self.bias.view(shape)


class LayerNorm(nn.Module):
    """``nn.LayerNorm(normalized_shape)``: statistics over the last len(normalized_shape) axes."""

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float = 1e-5):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps, self.dims = eps, tuple(range(-len(shape), 0))
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=self.dims, keepdim=True)  # per token: (B, T, 1)
        var = x.var(dim=self.dims, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class RMSNorm(nn.Module):
    """``nn.RMSNorm`` / transformers' ``LlamaRMSNorm``: y = x / rms(x) * gamma, rms over the last axis.
    Computed in float32 whatever the input dtype (as LLaMA does), then cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# the demo: parity, batch dependence, invariances, the figure
# ---------------------------------------------------------------------------------------------------

@dataclass
class NormsConfig:
    """Print the parity and property tables; draw the axes figure."""

    png: str = "runs/appendix/norms.png"  # where the which-axes figure goes (the README's copy: doc/appendix_norms.png)
    seed: int = 0  # random inputs


def parity_rows(seed: int = 0) -> list[dict]:
    """Ours vs torch's on random inputs with random affine parameters: max |difference|."""
    torch.manual_seed(seed)
    rows = []
    # BatchNorm: three training steps (outputs and running stats), then evaluation mode
    ours, ref = BatchNorm(6), nn.BatchNorm2d(6)
    with torch.no_grad():
        for p in (ref.weight, ref.bias):
            p.normal_()
    ours.load_state_dict(ref.state_dict())
    diffs = []
    for _ in range(3):
        x = torch.randn(4, 6, 5, 5) * 3 + 1
        diffs.append((ours(x) - ref(x)).abs().max().item())
    diffs.append((ours.running_var - ref.running_var).abs().max().item())
    rows.append({"norm": "BatchNorm (train)", "reference": "nn.BatchNorm2d", "max_diff": max(diffs)})
    ours.eval(), ref.eval()
    x = torch.randn(4, 6, 5, 5)
    rows.append({"norm": "BatchNorm (eval)", "reference": "nn.BatchNorm2d",
                 "max_diff": (ours(x) - ref(x)).abs().max().item()})
    x = torch.randn(2, 7, 16) * 2 + 0.5
    for name, ours, ref in (("LayerNorm", LayerNorm(16), nn.LayerNorm(16)),
                            ("RMSNorm", RMSNorm(16), nn.RMSNorm(16, eps=1e-6))):
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_()
        ours.load_state_dict(ref.state_dict())
        rows.append({"norm": name, "reference": f"nn.{type(ref).__name__}",
                     "max_diff": (ours(x) - ref(x)).abs().max().item()})
    return rows


def property_rows(seed: int = 0) -> list[dict]:
    """What each normalisation is invariant to, measured: change the rest of the batch, scale a token,
    shift a token. A 0 means the output did not move."""
    torch.manual_seed(seed)
    x = torch.randn(8, 10, 16)  # (B, T, C)
    other = torch.cat([x[:1], torch.randn(7, 10, 16)])  # same first sample, different batch mates
    scale = torch.rand(8, 10, 1) * 3 + 0.5  # a different positive factor per token
    shift = torch.randn(8, 10, 1)
    norms = {"BatchNorm": lambda t: BatchNorm(16)(t.transpose(1, 2)).transpose(1, 2),  # channels to axis 1
             "LayerNorm": LayerNorm(16), "RMSNorm": RMSNorm(16)}
    rows = []
    for name, f in norms.items():
        rows.append({"norm": name,
                     "batch_mates": (f(x)[0] - f(other)[0]).abs().max().item(),
                     "token_scale": (f(x * scale) - f(x)).abs().max().item(),
                     "token_shift": (f(x + shift) - f(x)).abs().max().item(),
                     "params": "gamma, beta (C) + running mean/var" if name == "BatchNorm" else
                               "gamma, beta (C)" if name == "LayerNorm" else "gamma (C)"})
    return rows


def draw_axes_figure(png: str) -> None:
    """Three grids of a (B*T tokens) x (C channels) activation; one colour = one set of statistics."""
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    n_tok, n_ch = 6, 8
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.1), dpi=90)
    for ax, (title, note, colour_of) in zip(axes, (
            ("BatchNorm", "one mean/var per channel,\nover the batch and positions", lambda t, c: c),
            ("LayerNorm", "one mean/var per token,\nover its channels", lambda t, c: t),
            ("RMSNorm", "one rms per token, over its\nchannels; no mean subtracted", lambda t, c: t))):
        cmap = plt.get_cmap("tab10")
        for t in range(n_tok):
            for c in range(n_ch):
                highlight = (c == 2) if title == "BatchNorm" else (t == 1)
                ax.add_patch(plt.Rectangle((c, n_tok - 1 - t), 1, 1, facecolor=cmap(colour_of(t, c) % 10),
                                           alpha=0.9 if highlight else 0.25, edgecolor="white"))
        ax.set_xlim(0, n_ch), ax.set_ylim(0, n_tok), ax.set_aspect("equal")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_xlabel("C channels"), ax.set_ylabel("B x T tokens")
        ax.set_title(f"{title}\n{note}", fontsize=9)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


def main(cfg: NormsConfig) -> dict:
    parity, props = parity_rows(cfg.seed), property_rows(cfg.seed)
    print("| norm | reference | max abs difference |\n|---|---|---|")
    for r in parity:
        print(f"| {r['norm']} | {r['reference']} | {r['max_diff']:.1e} |")
    print("\nHow far the output of the same token moves (max abs) when ...\n"
          "| norm | other batch mates | token scaled | token shifted | learned parameters |\n|---|---|---|---|---|")
    for r in props:
        print(f"| {r['norm']} | {r['batch_mates']:.2g} | {r['token_scale']:.2g} | {r['token_shift']:.2g} | "
              f"{r['params']} |")
    draw_axes_figure(cfg.png)
    print(f"\nfigure: {cfg.png}")
    return {"parity": parity, "properties": props}


if __name__ == "__main__":
    from common.cli import run_main

    run_main(main, NormsConfig)
