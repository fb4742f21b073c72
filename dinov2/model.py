"""DINOv2's backbone and heads, written from scratch with transformers' Dinov2 names.

Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision" (arXiv:2304.07193), on top of
DINO (Caron et al. 2021, arXiv:2104.14294) and iBOT (Zhou et al. 2022, arXiv:2111.07832).

The backbone is a plain pre-norm ViT (Dosovitskiy et al. 2021) with three additions that matter for
self-distillation:
- position embeddings are interpolated to the grid of any crop, so one network sees 28 px global crops and
  12 px local crops (``Dinov2Embeddings.interpolate_pos_encoding``);
- LayerScale (Touvron et al. 2021, CaiT): each residual branch is multiplied by a learned per-channel gain
  that starts small, so a deep network starts close to the identity;
- stochastic depth (Huang et al. 2016): in training a residual branch is dropped for a whole sample with
  probability ``drop_path_rate``.
Register tokens (Darcet et al. 2024, arXiv:2309.16588) are optional: extra learned tokens after [CLS] that the
network may use as scratch space instead of hijacking background patches.

The heads (``DinoHead``) map a token to K prototype scores: MLP -> bottleneck -> L2 normalisation -> cosine
against K weight-normalised prototypes. One head reads [CLS] (the DINO loss), a second reads patch tokens (iBOT).

    python -m dinov2.model        # parameter counts of the presets
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError


@dataclass
class Dinov2Config:
    """The backbone; field names are transformers' ``Dinov2Config``'s (``to_hf_dict`` writes its config.json)."""

    image_size: int = 28  # the size the position table is learned at (the global crop's)
    patch_size: int = 4  # 28 px -> a 7 x 7 grid; a 12 px local crop -> 3 x 3
    num_channels: int = 1  # grey silhouettes and digits; 3 for photos
    hidden_size: int = 128  # two thirds of ViT-Tiny's width: the CPU budget (python -m dinov2.bench times it)
    num_hidden_layers: int = 4
    num_attention_heads: int = 2  # head dim 64, as every ViT
    mlp_ratio: int = 4  # the MLP is mlp_ratio * hidden_size wide (transformers takes an int)
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6  # DINOv2's (transformers' default for this model too)
    layerscale_value: float = 1.0  # LayerScale's start. DINOv2's ViT-S/B/L/g start at 1e-5; in this small net that
    # start gives every image the same [CLS], centering turns the same into uniform targets and the run stays
    # there (README, lesson 1; python -m dinov2.bench --init-diversity). 1.0 is transformers' default
    drop_path_rate: float = 0.0  # stochastic depth, the same rate for every layer (DINOv2's "uniform");
    # 0 here: a 4-layer net trained for minutes underfits, it does not overfit
    num_register_tokens: int = 0  # 0 exports as transformers' Dinov2Model, > 0 as Dinov2WithRegistersModel
    initializer_range: float = 0.02
    hidden_act: str = "gelu"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"--hidden-size {self.hidden_size}: expected a multiple of --num-attention-heads "
                             f"{self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise UserError(f"--image-size {self.image_size}: expected a multiple of --patch-size {self.patch_size}")

    def to_hf_dict(self) -> dict:
        d = asdict(self)
        regs = d["num_register_tokens"] > 0
        d.update(model_type="dinov2_with_registers" if regs else "dinov2",
                 architectures=["Dinov2WithRegistersModel" if regs else "Dinov2Model"],
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, use_swiglu_ffn=False)
        if not regs:
            d.pop("num_register_tokens")
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> Dinov2Config:
        if d.get("use_swiglu_ffn"):
            raise ValueError("use_swiglu_ffn=True (the ViT-g MLP) is not implemented here; the plain GELU MLP is")
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("image_size", "patch_size"):  # transformers allows (h, w); the checkpoints use one number
            if isinstance(fields.get(k), (list, tuple)):
                fields[k] = fields[k][0]
        return cls(**fields)


MODEL_PRESETS = {
    "cpu": {},  # 0.8 M parameters: about 13 minutes of training on 2 cores
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2),  # tests
    "gpu4gb": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),  # ViT-S/4: 21 M
}


class Dinov2PatchEmbeddings(nn.Module):
    """Cut the image into P x P patches and project each to C: one strided convolution.
    (B, ch, H, W) -> (B, N, C), N = (H / P) (W / P)."""

    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.patch_size = config.patch_size
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class Dinov2Embeddings(nn.Module):
    """[CLS] + (registers) + patches, with learned positions interpolated to the crop's grid.

    The mask token replaces the embedding of each masked patch *before* the positions are added (iBOT: the
    student sees where a patch was hidden, not what it held)."""

    def __init__(self, config: Dinov2Config):
        super().__init__()
        C = config.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.mask_token = nn.Parameter(torch.zeros(1, C))
        self.register_tokens = (nn.Parameter(torch.zeros(1, config.num_register_tokens, C))
                                if config.num_register_tokens else None)
        self.patch_embeddings = Dinov2PatchEmbeddings(config)
        self.grid = config.image_size // config.patch_size
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, C))
        self.antialias = config.num_register_tokens > 0  # transformers' register model resizes with antialias

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """The position table for a (height, width) image: the learned grid resized bicubically to the crop's
        grid; [CLS]'s position is kept as it is. (1, 1 + N, C).

        Departure from the reference, on purpose: facebookresearch/dinov2 resizes by ``scale_factor = (new +
        0.1) / old`` (its ``interpolate_offset``), transformers by ``size = new``; the two differ slightly
        whenever the grid changes. This file follows transformers, so exported weights give the same features
        at every crop size (tests/test_dinov2.py checks both grids)."""
        P = self.patch_embeddings.patch_size
        h, w = height // P, width // P
        if h == self.grid and w == self.grid:
            return self.position_embeddings
        cls_pos, patch_pos = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        C = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, self.grid, self.grid, C).permute(0, 3, 1, 2)  # (1, C, g, g)
        patch_pos = F.interpolate(patch_pos.float(), size=(h, w), mode="bicubic", align_corners=False,
                                  antialias=self.antialias).to(cls_pos.dtype)
        return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, C)], dim=1)

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        # 1) patches                                                 (B, ch, H, W) -> (B, N, C)
        x = self.patch_embeddings(pixel_values)
        # 2) iBOT: masked patches become the learned mask token       bool_masked_pos (B, N)
        if bool_masked_pos is not None:
            x = torch.where(bool_masked_pos[..., None], self.mask_token.to(x.dtype), x)
        # 3) prepend [CLS], add the positions of this crop's grid      (B, 1 + N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(*pixel_values.shape[-2:])
        # 4) registers go after [CLS] and carry no position            (B, 1 + R + N, C)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        return x


class Dinov2Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask: every crop is whole):
    softmax(q k^T / sqrt(D)) v per head, then o_proj."""

    def __init__(self, config: Dinov2Config):
        super().__init__()
        C, self.n_head = config.hidden_size, config.num_attention_heads
        self.q_proj = nn.Linear(C, C, bias=config.qkv_bias)
        self.k_proj = nn.Linear(C, C, bias=config.qkv_bias)
        self.v_proj = nn.Linear(C, C, bias=config.qkv_bias)
        self.o_proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # 1) project and split into heads                   (B, T, C) -> (B, H, T, D)
        q, k, v = (p(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # 2) attend (the fused kernel computes exactly softmax(q k^T / sqrt(D)) v)
        y = F.scaled_dot_product_attention(q, k, v)
        # 3) merge the heads                                   (B, H, T, D) -> (B, T, C)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class Dinov2LayerScale(nn.Module):
    """y = lambda * x with a per-channel lambda that starts at ``layerscale_value`` (CaiT, sec. 2.1)."""

    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), config.layerscale_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: in training, zero the branch for a whole sample with probability p and scale the
    survivors by 1 / (1 - p), so the expected output is unchanged; the identity at evaluation."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device, dtype=x.dtype) >= p
    return x * keep / (1 - p)


class Dinov2MLP(nn.Module):
    def __init__(self, config: Dinov2Config):
        super().__init__()
        hidden = int(config.hidden_size * config.mlp_ratio)
        self.fc1 = nn.Linear(config.hidden_size, hidden)
        self.fc2 = nn.Linear(hidden, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Dinov2Layer(nn.Module):
    """Pre-norm block: x = x + DropPath(LayerScale(Attn(LN(x)))); x = x + DropPath(LayerScale(MLP(LN(x))))."""

    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Dinov2Attention(config)
        self.layer_scale1 = Dinov2LayerScale(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Dinov2MLP(config)
        self.layer_scale2 = Dinov2LayerScale(config)
        self.drop_path_rate = config.drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.layer_scale1(self.attention(self.norm1(x))), self.drop_path_rate, self.training)
        return x + drop_path(self.layer_scale2(self.mlp(self.norm2(x))), self.drop_path_rate, self.training)


class Dinov2Encoder(nn.Module):
    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.layer = nn.ModuleList(Dinov2Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class Dinov2Model(nn.Module):
    """The backbone. ``forward`` returns the final-normed tokens and their parts:
    ``last_hidden_state`` (B, 1 + R + N, C), ``cls`` (B, C) = ``pooler_output``, ``patches`` (B, N, C)."""

    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.config = config
        self.embeddings = Dinov2Embeddings(config)
        self.encoder = Dinov2Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.apply(self._init_weights)
        for name in ("position_embeddings", "cls_token"):
            nn.init.trunc_normal_(getattr(self.embeddings, name), std=config.initializer_range)
        # the mask token starts at zero (transformers' and the reference's init); registers likewise

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=self.config.initializer_range)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> dict:
        x = self.embeddings(pixel_values, bool_masked_pos)
        x = self.layernorm(self.encoder(x))
        R = self.config.num_register_tokens
        return {"last_hidden_state": x, "cls": x[:, 0], "pooler_output": x[:, 0], "patches": x[:, 1 + R:]}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass
class DinoHeadConfig:
    """The projection head: MLP (in -> hidden -> hidden -> bottleneck), L2 norm, K prototypes."""

    hidden_dim: int = 512  # DINOv2's is 2048: scaled to the 128-wide backbone
    bottleneck_dim: int = 128  # DINOv2's 256 (iBOT's 256 too)
    num_prototypes: int = 1024  # K; DINOv2 uses 65,536 for 142 M images, here 10 classes and 8,000 images
    nlayers: int = 3


class DinoHead(nn.Module):
    """s = cos(W v_k, z / |z|) over K prototypes, z = MLP(x): the scores the DINO and iBOT losses read.

    The prototypes are weight-normalised with a fixed gain of 1 (DINO's ``norm_last_layer``): each score is a
    cosine, so the head cannot raise its confidence by growing a prototype's norm. Written out instead of
    ``torch.nn.utils.parametrizations.weight_norm`` with a frozen g, which computes the same thing."""

    def __init__(self, in_dim: int, cfg: DinoHeadConfig):
        super().__init__()
        dims = [in_dim] + [cfg.hidden_dim] * (cfg.nlayers - 1) + [cfg.bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(cfg.nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < cfg.nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Parameter(torch.empty(cfg.num_prototypes, cfg.bottleneck_dim))
        nn.init.kaiming_uniform_(self.prototypes, a=math.sqrt(5))  # nn.Linear's init of the last layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)  # (..., bottleneck) on the unit sphere
        return z @ F.normalize(self.prototypes, dim=-1).t()  # (..., K) cosines


class DinoStudent(nn.Module):
    """One network of the pair: backbone + DINO head (+ a separate iBOT head). The teacher is a copy."""

    def __init__(self, config: Dinov2Config, head: DinoHeadConfig, separate_ibot_head: bool = True):
        super().__init__()
        self.backbone = Dinov2Model(config)
        self.dino_head = DinoHead(config.hidden_size, head)
        self.ibot_head = DinoHead(config.hidden_size, head) if separate_ibot_head else None

    def patch_head(self) -> DinoHead:
        return self.ibot_head if self.ibot_head is not None else self.dino_head

    def forward(self, global_crops: torch.Tensor, masks: torch.Tensor | None = None,
                local_crops: torch.Tensor | None = None, mask_input: bool = True) -> dict[str, torch.Tensor]:
        """The scores the losses read, from one call (DDP wants one forward per backward):
        - cls (n, C): the backbone's [CLS] of the global crops (KoLeo's input; the features we evaluate)
        - dino (n, K): the DINO head on it
        - ibot (M, K): the patch head at the M positions where ``masks`` (n, N) is True, in row order
        - local_dino (m, K): the DINO head on the local crops' [CLS]
        The student sees its masked patches as the mask token; the teacher (``mask_input=False``) sees the whole
        crop and is only read at the masked positions."""
        g = self.backbone(global_crops, masks if mask_input else None)
        out = {"cls": g["cls"], "dino": self.dino_head(g["cls"])}
        if masks is not None:
            out["ibot"] = self.patch_head()(g["patches"][masks])
        if local_crops is not None:
            out["local_dino"] = self.dino_head(self.backbone(local_crops)["cls"])
        return out

if __name__ == "__main__":
    for name, p in MODEL_PRESETS.items():
        m = DinoStudent(Dinov2Config(**p), DinoHeadConfig())
        print(f"{name:7s} backbone {m.backbone.num_parameters() / 1e6:.2f} M | heads "
              f"{(sum(q.numel() for q in m.parameters()) - m.backbone.num_parameters()) / 1e6:.2f} M")
