"""Hiera: a hierarchical vision transformer with no convolutions, no relative positions and no shifted windows,
pretrained as a masked autoencoder (MAE). The whole model, top to bottom, for 2-D images and 3-D clips alike.

Ryali et al. 2023, "Hiera: A Hierarchical Vision Transformer without the Bells-and-Whistles" (arXiv:2306.00989);
He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners" (arXiv:2111.06377).
Module and parameter names are transformers' (``models/hiera/modeling_hiera.py``), so a random ``HieraModel``'s
state dict loads into ours unchanged (tests/test_hiera_mae.py proves the outputs equal).

The idea in four lines:
1. Patchify with a strided convolution; every token gets a learned position.
2. Stages: each later stage has half the resolution (a 2x2 max-pool of the queries, "query pooling") and twice
   the width. The first stages attend only inside a *mask unit* (an 8x8 token window in the paper), the last
   stages globally.
3. MAE: drop whole mask units (60 % of them); the encoder sees only the rest, which is why step 2 must never mix
   two mask units before the last stages. "Unroll" orders the tokens so that every pooling and every window is a
   reshape of contiguous memory, and dropping a unit is dropping a slice.
4. A small decoder puts a learnable mask token where the dropped units were and predicts the pixels of each
   final-stride patch (normalised per patch), with an MSE on the dropped units only.

Shapes: B batch, N tokens, C channels; "grid" is the token grid, (h, w) for images and (t, h, w) for clips.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError


@dataclass
class HieraConfig:
    """The sizes. Lists have one entry per spatial dimension: (H, W) for images, (T, H, W) for clips.
    The defaults are the CPU preset for 32 x 32 grey images (train_mae.py); Hiera-Tiny is
    embed_dim 96, depths [1, 2, 7, 2], heads [1, 2, 4, 8], patch 7 / stride 4, mask unit 8 x 8 at 224 px."""

    image_size: list[int] = field(default_factory=lambda: [32, 32])  # input size (H, W) or (T, H, W)
    num_channels: int = 1  # 1 grey, 3 RGB
    embed_dim: int = 32  # width of the first stage; each pooled stage multiplies it by embed_dim_multiplier
    patch_size: list[int] = field(default_factory=lambda: [3, 3])  # the patch convolution's kernel (Hiera: 7)
    patch_stride: list[int] = field(default_factory=lambda: [2, 2])  # its stride: pixels per token (Hiera: 4)
    patch_padding: list[int] = field(default_factory=lambda: [1, 1])  # its padding (Hiera: 3)
    mlp_ratio: float = 4.0  # MLP hidden width / width
    depths: list[int] = field(default_factory=lambda: [1, 2, 3])  # blocks per stage
    num_heads: list[int] = field(default_factory=lambda: [1, 2, 4])  # heads per stage (head dim stays 32)
    embed_dim_multiplier: float = 2.0  # width growth at each pooled stage
    num_query_pool: int = 2  # how many stage transitions pool (the first num_query_pool)
    query_stride: list[int] = field(default_factory=lambda: [2, 2])  # the pooling window (2 x 2: 4 tokens -> 1)
    masked_unit_size: list[int] = field(default_factory=lambda: [4, 4])  # a mask unit, in first-stage tokens
    masked_unit_attention: list[bool] = field(default_factory=lambda: [True, True, False])  # per stage: attend
    # inside the mask unit (True) or globally (False)
    drop_path_rate: float = 0.0  # stochastic depth at the last block (linear from 0)
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    # MAE decoder (train_mae.py)
    decoder_hidden_size: int = 64
    decoder_depth: int = 2
    decoder_num_heads: int = 2
    mask_ratio: float = 0.6  # share of mask units dropped (Hiera's image default; MAE's 0.75; video 0.9)
    normalize_pixel_loss: bool = True  # targets normalised per patch (MAE's "norm_pix_loss")
    # classification (train_finetune.py, train_video.py)
    num_labels: int = 10

    def __post_init__(self):
        # bad sizes fail here with the flags to change, not later inside a reshape
        def flag(name: str) -> str:
            v = getattr(self, name)
            return f"--{name.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"

        n = len(self.image_size)
        for name in ("patch_size", "patch_stride", "patch_padding", "query_stride", "masked_unit_size"):
            if len(getattr(self, name)) != n:
                raise UserError(f"{flag(name)}: expected {n} entries, one per axis of {flag('image_size')}")
        for name in ("num_heads", "masked_unit_attention"):
            if len(getattr(self, name)) != len(self.depths):
                raise UserError(f"{flag(name)}: expected one entry per stage of {flag('depths')}")
        if not 0 <= self.num_query_pool < len(self.depths):
            raise UserError(f"{flag('num_query_pool')}: expected 0 .. {len(self.depths) - 1} (stages - 1)")
        grid = self.tokens_spatial_shape
        for g, mu, q, s, i in zip(grid, self.masked_unit_size, self.query_stride, self.patch_stride, self.image_size):
            if i % s or g % mu or mu % q ** self.num_query_pool:
                raise UserError(f"{flag('image_size')}, {flag('patch_stride')}, {flag('masked_unit_size')}, "
                                f"{flag('query_stride')}: expected the token grid {grid} to tile by mask units, and "
                                f"mask units by query_stride^num_query_pool")

    @property
    def tokens_spatial_shape(self) -> list[int]:
        """The first stage's token grid."""
        return [i // s for i, s in zip(self.image_size, self.patch_stride)]

    @property
    def mask_spatial_shape(self) -> list[int]:
        """The grid of mask units."""
        return [g // m for g, m in zip(self.tokens_spatial_shape, self.masked_unit_size)]

    @property
    def hidden_size(self) -> int:
        """The last stage's width."""
        return int(self.embed_dim * self.embed_dim_multiplier ** (len(self.depths) - 1))

    @property
    def pred_stride(self) -> list[int]:
        """Pixels per final-stage token along each dimension: what one decoder output reconstructs."""
        return [s * q ** self.num_query_pool for s, q in zip(self.patch_stride, self.query_stride)]

    def to_hf_dict(self) -> dict:
        """config.json in transformers' HieraConfig vocabulary (2-D only there; clips keep our extra entries)."""
        d = asdict(self)
        return {"model_type": "hiera", "architectures": ["HieraForImageClassification"], **d,
                "hidden_act": "gelu", "layer_norm_init": 1.0}


# ---------------------------------------------------------------------------------------------------
# Unroll / reroll: the token order that makes pooling and mask units contiguous
# ---------------------------------------------------------------------------------------------------

def unroll(x: torch.Tensor, size: list[int], schedule: list[list[int]]) -> torch.Tensor:
    """(B, N, C) tokens in raster order over the grid ``size`` -> the same tokens reordered.

    For each stride s in ``schedule`` (the query strides, one per pooling), the position inside each s-window moves
    in front: after one 2x2 stride the order is [the 4 offsets] x [the (h/2, w/2) grid], so a 2x2 max-pool is
    ``x.view(B, 4, -1, C).amax(1)``. After all the strides, the last index runs over the mask units and the front
    ones over the positions inside a unit: unit u's tokens are x[:, j * n_units + u] for every j, so dropping a
    mask unit drops the same index in every row of a (B, tokens_per_unit, n_units, C) view.
    """
    B, _, C = x.shape
    cur = list(size)
    x = x.view(B, *cur, C)
    for strides in schedule:
        # 1) split each axis into (axis // s, s)                (B', h/s, s, w/s, s, C)
        cur = [c // s for c, s in zip(cur, strides)]
        x = x.view(B, *[v for pair in zip(cur, strides) for v in pair], C)
        # 2) move the offsets in front and fold them into the batch   (B' * s * s, h/s, w/s, C)
        nd = 2 * len(cur)
        x = x.permute(0, *range(2, nd + 1, 2), *range(1, nd + 1, 2), nd + 1)
        x = x.flatten(0, len(strides))
        B *= math.prod(strides)
    return x.reshape(-1, math.prod(size), C)


def undo_windowing(x: torch.Tensor, shape: list[int], mu_shape: list[int]) -> torch.Tensor:
    """(B, n_units, *mu_shape, C) with units in raster order over their grid -> (B, *shape, C) in raster order."""
    B, C, d = x.shape[0], x.shape[-1], len(shape)
    units = [s // m for s, m in zip(shape, mu_shape)]
    x = x.view(B, *units, *mu_shape, C)
    # interleave (unit index, position in unit) per axis: (B, u0, m0, u1, m1, ..., C)
    x = x.permute(0, *[i for k in range(d) for i in (1 + k, 1 + d + k)], 2 * d + 1)
    return x.reshape(B, *shape, C)


def reroll(x: torch.Tensor, size: list[int], schedule: list[list[int]], masked: bool = False) -> torch.Tensor:
    """The inverse of ``unroll`` for a stage's output (``schedule`` = the strides not yet consumed by pooling,
    ``size`` = that stage's grid). Returns (B, *size, C) in raster order, or, when ``masked`` (the tokens of
    dropped units are absent), (B, n_visible_units, *unit_shape, C): each kept unit as a small image."""
    B, N, C = x.shape
    mu = [1] * len(size)
    for strides in schedule:
        # (B, *strides, N / prod(strides), *mu, C) -> put each offset next to its axis inside the unit
        x = x.view(B, *strides, N // math.prod(strides), *mu, C)
        d = len(strides)
        x = x.permute(0, d + 1, *[i for k in range(d) for i in (1 + k, d + 2 + k)], 2 * d + 2)
        mu = [m * s for m, s in zip(mu, strides)]
        x = x.reshape(B, -1, *mu, C)
        N = x.shape[1]
    x = x.view(B, N, *mu, C)
    if masked:
        return x
    return undo_windowing(x, size, mu)


# ---------------------------------------------------------------------------------------------------
# Embeddings and masking
# ---------------------------------------------------------------------------------------------------

def random_masking(batch: int, n_units: int, mask_ratio: float, noise: torch.Tensor | None = None,
                   device=None) -> torch.Tensor:
    """(B, n_units) bool, True = *kept* (transformers' convention), the same count for every image:
    keep int(n_units * (1 - ratio)) units, those with the smallest noise (MAE's argsort trick)."""
    n_keep = int(n_units * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, n_units, device=device)
    ids_restore = noise.argsort(dim=1).argsort(dim=1)  # the rank of each unit's noise
    return ids_restore < n_keep


class HieraPatchEmbeddings(nn.Module):
    def __init__(self, config: HieraConfig):
        super().__init__()
        self.config = config
        conv = nn.Conv2d if len(config.image_size) == 2 else nn.Conv3d
        self.projection = conv(config.num_channels, config.embed_dim, kernel_size=config.patch_size,
                               stride=config.patch_stride, padding=config.patch_padding)

    def forward(self, pixel_values: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, ch, *image) -> (B, N, C) in raster order. With ``keep`` the pixels of dropped units are zeroed
        first, so the overlapping 3x3 / 7x7 kernel cannot leak them into a visible token (Hiera's masked conv)."""
        if keep is not None:
            unit_mask = keep.view(len(keep), 1, *self.config.mask_spatial_shape).float()
            pixel_values = pixel_values * F.interpolate(unit_mask, size=pixel_values.shape[2:])  # nearest
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class HieraEmbeddings(nn.Module):
    def __init__(self, config: HieraConfig):
        super().__init__()
        self.patch_embeddings = HieraPatchEmbeddings(config)
        # one learned position per token; departure: Hiera's video models learn separate spatial and temporal
        # tables (sep_pos_embed) - one table is the simpler path and costs 4 x 64 x 32 numbers here
        self.position_embeddings = nn.Parameter(torch.zeros(1, math.prod(config.tokens_spatial_shape),
                                                            config.embed_dim))

    def forward(self, pixel_values: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.patch_embeddings(pixel_values, keep) + self.position_embeddings


# ---------------------------------------------------------------------------------------------------
# The blocks
# ---------------------------------------------------------------------------------------------------

class HieraMaskUnitAttention(nn.Module):
    """Multi-head attention inside each mask unit (or over all tokens), with optional query pooling.

    softmax(q k^T / sqrt(D)) v per window, where q is max-pooled over the query stride: the output has
    1 / query_stride as many tokens as the input (Hiera sec. 3.1; keys and values stay at full resolution).
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, query_stride: int = 1, window_size: int = 0,
                 use_mask_unit_attn: bool = False):
        super().__init__()
        self.num_heads, self.query_stride, self.dim_out = num_heads, query_stride, dim_out
        self.head_dim = dim_out // num_heads
        self.window_size, self.use_mask_unit_attn = window_size, use_mask_unit_attn
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        # the windows: with the unrolled order, window w's tokens are x[:, j * n_windows + w]
        n_windows = N // (self.query_stride * self.window_size) if self.use_mask_unit_attn else 1
        # 1) q, k, v per head and window                     (B, N, C) -> 3 x (B, H, n_windows, N / n_windows, D)
        qkv = self.qkv(x).view(B, -1, n_windows, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 2, 1, 5)
        q, k, v = qkv.unbind(0)
        # 2) query pooling: the max over the query_stride offsets, which unroll put in front
        if self.query_stride > 1:
            q = q.view(B, self.num_heads, n_windows, self.query_stride, -1, self.head_dim).amax(dim=3)
        # 3) attend within each window                        (B, H, n_windows, N' / n_windows, D)
        #    written out: windows of 16-64 tokens are too short for the fused kernel to pay on a CPU (bench.py)
        attn = ((q * self.head_dim ** -0.5) @ k.transpose(-1, -2)).softmax(dim=-1)
        out = attn @ v
        # 4) back to (B, N', C_out), window index fastest again
        return self.proj(out.transpose(1, 3).reshape(B, -1, self.dim_out))


class HieraMlp(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class HieraDropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability p (training only)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class HieraLayer(nn.Module):
    """Pre-norm block. At a stage transition (dim != dim_out) the residual is projected and max-pooled too:
    x = pool(proj(norm(x))) + attn(norm(x)), then x = x + mlp(norm(x))."""

    def __init__(self, config: HieraConfig, dim: int, dim_out: int, num_heads: int, drop_path: float,
                 query_stride: int, window_size: int, use_mask_unit_attn: bool):
        super().__init__()
        self.dim, self.dim_out, self.query_stride = dim, dim_out, query_stride
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = HieraMaskUnitAttention(dim, dim_out, num_heads, query_stride, window_size, use_mask_unit_attn)
        self.layernorm_after = nn.LayerNorm(dim_out, eps=config.layer_norm_eps)
        self.mlp = HieraMlp(dim_out, config.mlp_ratio)
        self.drop_path = HieraDropPath(drop_path)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x_norm = self.layernorm_before(x)
        if self.dim != self.dim_out:
            x = self.proj(x_norm).view(B, self.query_stride, -1, self.dim_out).amax(dim=1)  # pooled residual
        x = x + self.drop_path(self.attn(x_norm))
        return x + self.drop_path(self.mlp(self.layernorm_after(x)))


class HieraStage(nn.Module):
    def __init__(self, config: HieraConfig, depth: int, dim: int, dim_out: int, num_heads: int,
                 drop_path: list[float], query_stride: list[int], window_size: int, use_mask_unit_attn: bool,
                 prev_mask_unit_attn: bool = False):
        super().__init__()
        # the first block of a stage that follows a mask-unit stage still attends within units: its queries are
        # pooled, so "lag by one layer" keeps global attention for the pooled resolution (Hiera's code)
        self.layers = nn.ModuleList([
            HieraLayer(config, dim if i == 0 else dim_out, dim_out, num_heads, drop_path[i], query_stride[i],
                       window_size, use_mask_unit_attn or (prev_mask_unit_attn and i == 0))
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class HieraEncoder(nn.Module):
    def __init__(self, config: HieraConfig):
        super().__init__()
        total = sum(config.depths)
        dpr = torch.linspace(0, config.drop_path_rate, total).tolist()
        ends = torch.tensor(config.depths).cumsum(0).tolist()
        q_area, mu_area = math.prod(config.query_stride), math.prod(config.masked_unit_size)
        # the first block of each of the first num_query_pool later stages pools its queries
        pool_at = set(ends[:config.num_query_pool])
        strides = [q_area if i in pool_at else 1 for i in range(total)]
        self.stages = nn.ModuleList()
        dim, start = config.embed_dim, 0
        for s, depth in enumerate(config.depths):
            dim_out = int(config.embed_dim * config.embed_dim_multiplier ** s)
            self.stages.append(HieraStage(
                config, depth, dim, dim_out, config.num_heads[s], dpr[start:start + depth],
                strides[start:start + depth], window_size=int(mu_area * q_area ** -s),  # a unit shrinks per pool
                use_mask_unit_attn=config.masked_unit_attention[s],
                prev_mask_unit_attn=config.masked_unit_attention[s - 1 if s > 0 else 0]))
            dim, start = dim_out, start + depth
        # what reroll needs after each stage: the strides not yet consumed and the grid at that stage
        self.schedule: list[tuple[list[list[int]], list[int]]] = []
        todo, size = [list(config.query_stride)] * (len(config.depths) - 1), config.tokens_spatial_shape
        for s in range(len(config.depths)):
            self.schedule.append((todo, size))
            if s < config.num_query_pool:
                size, todo = [g // q for g, q in zip(size, config.query_stride)], todo[1:]

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the last stage's tokens (B, N_last, C) and each stage's output rerolled (images, or with
        ``keep`` each kept unit as a small image; MAE's decoder fuses them)."""
        maps = []
        for s, stage in enumerate(self.stages):
            x = stage(x)
            todo, size = self.schedule[s]
            maps.append(reroll(x, size, todo, masked=keep is not None))
        return x, maps


class HieraPooler(nn.Module):
    def __init__(self, config: HieraConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layernorm(x.mean(dim=1))  # average over tokens, then norm


class HieraModel(nn.Module):
    """The backbone: pixels -> last-stage tokens (and their pooled average)."""

    def __init__(self, config: HieraConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = HieraEmbeddings(config)
        self.encoder = HieraEncoder(config)
        self.unroll_schedule = [list(config.query_stride)] * (len(config.depths) - 1)
        self.pooler = HieraPooler(config) if add_pooling_layer else None
        init_weights(self, config)

    def forward(self, pixel_values: torch.Tensor, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """pixel_values (B, ch, *image); ``keep`` (B, n_units) bool (True = visible, the same count per row)
        runs MAE's encoder: only the kept units' tokens go through the stages."""
        # 1) patches + positions, then the unrolled order              (B, N, C)
        x = self.embeddings(pixel_values, keep)
        x = unroll(x, self.config.tokens_spatial_shape, self.unroll_schedule)
        # 2) MAE: drop the masked units (unit u's tokens are x[:, j * n_units + u])
        if keep is not None:
            B, N, C = x.shape
            n_units = keep.shape[1]
            kept_ids = keep.float().argsort(dim=1, descending=True, stable=True)[:, :int(keep[0].sum())]
            kept_ids = kept_ids.sort(dim=1).values  # the kept units, in order
            x = x.view(B, N // n_units, n_units, C)
            x = x.gather(2, kept_ids[:, None, :, None].expand(B, N // n_units, -1, C)).flatten(1, 2)
        # 3) the stages
        x, maps = self.encoder(x, keep)
        out = {"last_hidden_state": x, "feature_maps": maps}
        if self.pooler is not None:
            out["pooler_output"] = self.pooler(x)
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class HieraForImageClassification(nn.Module):
    """Hiera + a linear classifier on the pooled tokens (images or clips: the input's rank decides)."""

    def __init__(self, config: HieraConfig):
        super().__init__()
        self.config = config
        self.hiera = HieraModel(config, add_pooling_layer=True)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        init_weights(self.classifier, config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hiera(pixel_values)["pooler_output"])  # (B, num_labels) logits


# ---------------------------------------------------------------------------------------------------
# MAE: multi-scale fusion, the decoder, the loss
# ---------------------------------------------------------------------------------------------------

class HieraMultiScaleHead(nn.Module):
    """Hiera's MAE decodes from the sum of the pooled stages' features: each early stage's unit (4 x 4 tokens
    at stage 1 here) is shrunk to the final unit's size by a strided conv and projected to the last width."""

    def __init__(self, config: HieraConfig):
        super().__init__()
        final_mu = [m // q ** config.num_query_pool for m, q in zip(config.masked_unit_size, config.query_stride)]
        conv = nn.Conv2d if len(config.image_size) == 2 else nn.Conv3d
        heads, mu = [], list(config.masked_unit_size)
        for s in range(config.num_query_pool):
            kernel = [m // f for m, f in zip(mu, final_mu)]
            heads.append(conv(int(config.embed_dim * config.embed_dim_multiplier ** s), config.hidden_size,
                              kernel_size=kernel, stride=kernel))
            mu = [m // q for m, q in zip(mu, config.query_stride)]
        heads.append(nn.Identity())  # the last stage is already at the final size and width
        self.multi_scale_fusion_heads = nn.ModuleList(heads)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """maps: (B, n_kept, *unit, C_s) per fused stage -> (B, n_kept, *final_unit, C_last), summed."""
        out = 0.0
        for head, x in zip(self.multi_scale_fusion_heads, maps):
            if not isinstance(head, nn.Identity):
                B, n = x.shape[:2]
                y = head(x.flatten(0, 1).movedim(-1, 1))  # (B * n_kept, C_last, *final_unit)
                x = y.movedim(1, -1).unflatten(0, (B, n))
            out = out + x
        return out


class HieraDecoder(nn.Module):
    def __init__(self, config: HieraConfig):
        super().__init__()
        self.config = config
        self.final_grid = [g // q ** config.num_query_pool
                           for g, q in zip(config.tokens_spatial_shape, config.query_stride)]
        self.final_mu = [m // q ** config.num_query_pool for m, q in zip(config.masked_unit_size, config.query_stride)]
        d = config.decoder_hidden_size
        self.decoder_embeddings = nn.Linear(config.hidden_size, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_position_embeddings = nn.Parameter(torch.zeros(1, math.prod(self.final_grid), d))
        self.decoder_block = HieraStage(config, config.decoder_depth, d, d, config.decoder_num_heads,
                                        [0.0] * config.decoder_depth, [1] * config.decoder_depth, 0, False)
        self.decoder_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        # one output per final token: the pixels of its pred_stride patch, channel-major (C, *pred_stride)
        self.decoder_pred = nn.Linear(d, math.prod(config.pred_stride) * config.num_channels)

    def forward(self, fused: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """fused (B, n_kept, *final_unit, C) -> (B, N_final, pixels per patch), raster order over the final grid."""
        x = self.decoder_embeddings(fused)
        B, n_units = keep.shape
        # 1) every unit slot: its visible features, or the learnable mask token where the unit was dropped
        slot = (keep.long().cumsum(1) - 1).clamp_min(0)  # unit u's row among the kept ones
        idx = slot.view(B, n_units, *[1] * (x.ndim - 2)).expand(B, n_units, *x.shape[2:])
        full = x.gather(1, idx)  # (B, n_units, *final_unit, d)
        mask_token = self.mask_token.view(1, 1, *[1] * len(self.final_mu), -1)
        full = torch.where(keep.view(B, n_units, *[1] * (x.ndim - 2)), full, mask_token)
        # 2) raster order over the final grid, positions, the blocks, the pixel head
        x = undo_windowing(full, self.final_grid, self.final_mu).flatten(1, -2)
        x = self.decoder_block(x + self.decoder_position_embeddings)
        return self.decoder_pred(self.decoder_norm(x))


def patchify(pixel_values: torch.Tensor, stride: list[int]) -> torch.Tensor:
    """(B, ch, *image) -> (B, N_final, ch * prod(stride)): each final-stride patch as a vector, patches in raster
    order, values channel-major (ch, then each axis), which is transformers' order for images."""
    x = pixel_values
    for axis, s in enumerate(stride):
        x = x.unfold(2 + axis, s, s)  # (B, ch, *grid, *stride) once all axes are unfolded
    d = len(stride)
    x = x.permute(0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))  # (B, *grid, ch, *stride)
    return x.flatten(1, d).flatten(2)


def unpatchify(patches: torch.Tensor, stride: list[int], grid: list[int], channels: int) -> torch.Tensor:
    """The inverse of patchify: (B, N_final, ch * prod(stride)) -> (B, ch, *image)."""
    B, d = patches.shape[0], len(stride)
    x = patches.view(B, *grid, channels, *stride)
    # (B, ch, g0, s0, g1, s1, ...)
    x = x.permute(0, d + 1, *[i for k in range(d) for i in (1 + k, d + 2 + k)])
    return x.reshape(B, channels, *[g * s for g, s in zip(grid, stride)])


class HieraForPreTraining(nn.Module):
    """The MAE: encoder on the visible units, multi-scale fusion, decoder, MSE on the dropped units' pixels."""

    def __init__(self, config: HieraConfig):
        super().__init__()
        self.config = config
        self.hiera = HieraModel(config, add_pooling_layer=False)
        self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.multiscale_fusion = HieraMultiScaleHead(config)
        self.decoder = HieraDecoder(config)
        init_weights(self, config)

    def targets(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, N_final, P) the pixels to predict, normalised per patch when configured (mean 0, var 1; the
        unbiased variance, as the reference). Predicting 0 for a normalised target scores an MSE of about 1."""
        t = patchify(pixel_values, self.config.pred_stride)
        if self.config.normalize_pixel_loss:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        return t

    def token_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """(B, n_units) kept units -> (B, N_final) kept final tokens, raster order (each unit covers final_mu)."""
        dec = self.decoder
        B, n = keep.shape
        m = keep.view(B, n, *[1] * len(dec.final_mu), 1).expand(B, n, *dec.final_mu, 1)
        return undo_windowing(m, dec.final_grid, dec.final_mu).flatten(1)

    def forward(self, pixel_values: torch.Tensor, noise: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``noise`` (B, n_units) fixes the masking (transformers' argument); ``keep`` gives it outright."""
        cfg = self.config
        if keep is None:
            keep = random_masking(len(pixel_values), math.prod(cfg.mask_spatial_shape), cfg.mask_ratio, noise,
                                  pixel_values.device)
        # 1) encode the visible units; fuse the pooled stages and the last one
        out = self.hiera(pixel_values, keep)
        maps = out["feature_maps"]
        fused = self.encoder_norm(self.multiscale_fusion(maps[:cfg.num_query_pool] + [maps[-1]]))
        # 2) decode every position
        logits = self.decoder(fused, keep)  # (B, N_final, P)
        # 3) the MSE on the dropped units' patches only
        masked = ~self.token_mask(keep)
        loss = F.mse_loss(logits[masked], self.targets(pixel_values)[masked])
        return {"loss": loss, "logits": logits, "keep": keep, "token_mask": ~masked}

    def reconstruct(self, pixel_values: torch.Tensor, logits: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Pictures: the predicted patches back in pixel space (each with its true patch's mean and std when the
        targets were normalised, as MAE's figures do), the visible patches kept as they were."""
        cfg = self.config
        grid = self.decoder.final_grid
        true = patchify(pixel_values, cfg.pred_stride)
        pred = logits
        if cfg.normalize_pixel_loss:
            pred = pred * (true.var(-1, keepdim=True) + 1e-6) ** 0.5 + true.mean(-1, keepdim=True)
        mixed = torch.where(token_mask[..., None], true, pred)
        return unpatchify(mixed, cfg.pred_stride, grid, cfg.num_channels)


@torch.no_grad()
def init_weights(module: nn.Module, config: HieraConfig) -> None:
    """transformers' Hiera init: truncated normal (std 0.02) for weights and the learned tables, bias 0.02
    (sic, the reference's constant), LayerNorm weight 1."""
    std = config.initializer_range
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.constant_(m.bias, std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, std)
        elif isinstance(m, HieraEmbeddings):
            nn.init.trunc_normal_(m.position_embeddings, std=std)
        elif isinstance(m, HieraDecoder):
            nn.init.trunc_normal_(m.mask_token, std=std)
            nn.init.trunc_normal_(m.decoder_position_embeddings, std=std)
