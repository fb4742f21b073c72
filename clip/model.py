"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"), top to
bottom in one file, with transformers' module and parameter names (models/clip/modeling_clip.py), so a
transformers CLIPModel's state dict loads into ours unchanged and the two give the same embeddings.

    image (B, 3, S, S) -> CLIPVisionEmbeddings: bias-free conv patchify (P x P, stride P)   -> (B, N, C)
                          + a learned class token, + learned positions                    -> (B, 1 + N, C)
                       -> pre_layrnorm -> L x CLIPEncoderLayer (pre-LN, bidirectional) -> class token
                       -> post_layernorm -> visual_projection (no bias)                   -> (B, E)
    text (B, T) ids    -> CLIPTextEmbeddings: tokens + learned positions                  -> (B, T, C)
                       -> L x CLIPEncoderLayer (pre-LN, *causal*) -> final_layer_norm
                       -> the state at the end-of-text token -> text_projection (no bias) -> (B, E)
    logits[i, j] = exp(logit_scale) * cos(image_i, text_j)                                 (B, B)

Training pulls each image towards its own caption and away from the other B-1 captions of the batch,
and the other way round (train_clip.py: the symmetric InfoNCE loss, and the sigmoid loss of SigLIP).

Departures from the famous code, each marked where it happens: none in the forward. The OpenAI towers use
quick_gelu, x * sigmoid(1.702 x), and so does this one. `pre_layrnorm` is spelled as transformers spells it
(sic), because the name is the key in every CLIP checkpoint. `logit_scale` starts at ln(1/0.07) and the
training loop clamps it to ln(100) after every step, as open_clip does (transformers' forward never clamps).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class CLIPConfig:
    """Sizes of both towers, flat (one flag each); ``to_hf_dict`` writes transformers' nested config.json."""

    projection_dim: int = 128  # E: the shared embedding space both towers project into
    logit_scale_init_value: float = 2.6592  # ln(1 / 0.07): the paper's initial temperature 0.07
    # the vision tower (a ViT)
    image_size: int = 64  # S: square input images
    patch_size: int = 8  # P: (S / P)^2 patches = N tokens, plus the class token
    num_channels: int = 3
    vision_hidden_size: int = 128  # C of the vision tower
    vision_num_hidden_layers: int = 4
    vision_num_attention_heads: int = 4
    vision_intermediate_size: int = 512  # its MLP width (4 C)
    # the text tower (a causal transformer, like a GPT without its head)
    vocab_size: int = 1000  # the chapter's BPE vocabulary (set from the tokenizer)
    text_hidden_size: int = 128  # C of the text tower
    text_num_hidden_layers: int = 2
    text_num_attention_heads: int = 4
    text_intermediate_size: int = 512
    max_position_embeddings: int = 32  # T: the longest caption in tokens, <|startoftext|> and <|endoftext|> included
    pad_token_id: int = 0
    eos_token_id: int = 1  # the text feature is read at the first token with this id (not 2: see to_hf_dict)
    bos_token_id: int = 2
    # both towers
    hidden_act: str = "quick_gelu"  # x * sigmoid(1.702 x), the OpenAI CLIP activation
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0  # CLIP pretrains without dropout

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CLIPConfig:
        """Our flat config.json, or transformers' nested one (text_config / vision_config)."""
        if "text_config" in d or "vision_config" in d:
            t, v = d.get("text_config") or {}, d.get("vision_config") or {}
            d = {**{k: d[k] for k in ("projection_dim", "logit_scale_init_value") if k in d},
                 **{k: v[k] for k in ("image_size", "patch_size", "num_channels") if k in v},
                 **{f"vision_{k}": v[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "intermediate_size") if k in v},
                 **{k: t[k] for k in ("vocab_size", "max_position_embeddings", "pad_token_id", "eos_token_id",
                                      "bos_token_id") if k in t},
                 **{f"text_{k}": t[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                "intermediate_size") if k in t},
                 **{k: t[k] for k in ("hidden_act", "layer_norm_eps", "attention_dropout") if k in t}}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_hf_dict(self) -> dict:
        """config.json in transformers' CLIPConfig layout (model_type clip), which both loaders read. An
        eos_token_id of 2 would switch transformers to its legacy pooling (the argmax of the ids): ours is not 2."""
        both = dict(hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps,
                    attention_dropout=self.attention_dropout, projection_dim=self.projection_dim)
        text = dict(vocab_size=self.vocab_size, hidden_size=self.text_hidden_size,
                    num_hidden_layers=self.text_num_hidden_layers, num_attention_heads=self.text_num_attention_heads,
                    intermediate_size=self.text_intermediate_size, max_position_embeddings=self.max_position_embeddings,
                    pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id, bos_token_id=self.bos_token_id,
                    **both)
        vision = dict(image_size=self.image_size, patch_size=self.patch_size, num_channels=self.num_channels,
                      hidden_size=self.vision_hidden_size, num_hidden_layers=self.vision_num_hidden_layers,
                      num_attention_heads=self.vision_num_attention_heads,
                      intermediate_size=self.vision_intermediate_size, **both)
        return {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": self.projection_dim,
                "logit_scale_init_value": self.logit_scale_init_value, "text_config": text, "vision_config": vision}


# The model of each named preset (train_clip.py's --preset starts from it). cpu: 64x64 images in 8x8 patches
# (65 tokens: 16-pixel patches lose the shapes' outlines in the patch projection), a 4-layer vision tower and a
# 2-layer text tower (the captions are short), width 128 (1.3 M parameters). gpu4gb: the same 64-pixel pictures
# with two 8-layer towers of width 512 (~51 M parameters; make gpu-check measures its memory at batch 128).
MODEL_PRESETS = {
    "cpu": dict(image_size=64, patch_size=8, vision_hidden_size=128, vision_num_hidden_layers=4,
                vision_num_attention_heads=4, vision_intermediate_size=512, text_hidden_size=128,
                text_num_hidden_layers=2, text_num_attention_heads=4, text_intermediate_size=512,
                projection_dim=128),
    "gpu4gb": dict(image_size=64, patch_size=8, vision_hidden_size=512, vision_num_hidden_layers=8,
                   vision_num_attention_heads=8, vision_intermediate_size=2048, text_hidden_size=512,
                   text_num_hidden_layers=8, text_num_attention_heads=8, text_intermediate_size=2048,
                   projection_dim=512),
}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The OpenAI CLIP activation: a sigmoid approximation of GELU, x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


ACT = {"quick_gelu": quick_gelu, "gelu": F.gelu}


@dataclass
class TowerSizes:
    """What one encoder stack needs; CLIPModel builds one for each tower from CLIPConfig."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    attention_dropout: float


def tower_sizes(cfg: CLIPConfig, tower: str) -> TowerSizes:
    return TowerSizes(getattr(cfg, f"{tower}_hidden_size"), getattr(cfg, f"{tower}_num_hidden_layers"),
                      getattr(cfg, f"{tower}_num_attention_heads"), getattr(cfg, f"{tower}_intermediate_size"),
                      cfg.hidden_act, cfg.layer_norm_eps, cfg.attention_dropout)


# ---------------------------------------------------------------------------------------------------
# Embeddings: patches + class token + positions; tokens + positions
# ---------------------------------------------------------------------------------------------------

class CLIPVisionEmbeddings(nn.Module):
    """x_0 = [class; W p_1; ...; W p_N] + pos: a P x P patch is one token, cut and projected in one strided
    convolution without bias (paper sec. 2.4 / ViT eq. 1)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        C = cfg.vision_hidden_size
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.image_size = cfg.image_size
        self.class_embedding = nn.Parameter(torch.randn(C))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, C, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                         bias=False)
        self.num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, C)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, _, H, W = pixel_values.shape
        if H != self.image_size or W != self.image_size:
            raise ValueError(f"images of {H}x{W} pixels; this model takes {self.image_size}x{self.image_size}")
        # 1) patchify and project in one conv       (B, 3, S, S) -> (B, C, S/P, S/P) -> (B, N, C)
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        # 2) the class token in front, whose final state represents the image          (B, 1 + N, C)
        x = torch.cat([self.class_embedding.expand(B, 1, -1), patches], dim=1)
        # 3) learned positions, one per slot
        return x + self.position_embedding.weight[None]

    @torch.no_grad()
    def init_sincos_positions(self, scale: float = 1.0) -> None:
        """Start the learned positions at a 2-D sine-cosine table (MAE; Beyer et al. 2022, "Better plain ViT
        baselines"): the first C/2 numbers encode the patch's row, the last C/2 its column, each as sin and cos
        at C/4 frequencies; the class slot starts at zero. They stay trainable, so the checkpoint is still a
        plain CLIP. From transformers' start (normal, std 0.02) the ViT must learn where each patch is; here
        it knows from step 0, and in this chapter position is a caption word (train_clip.py,
        --sincos-positions). ``scale`` is the table's amplitude: each entry is a sine or cosine, so at 1 a
        position vector has norm sqrt(C/2) (8 in the cpu preset); at 0.1 (norm 0.8) the place words
        stayed near chance in every run (README, lesson 4)."""
        C, side = self.position_embedding.embedding_dim, int((self.num_positions - 1) ** 0.5)
        if C % 4:
            raise ValueError(f"vision_hidden_size {C}: a 2-D sine-cosine table needs a multiple of 4")
        omega = 1.0 / 10000 ** (torch.arange(C // 4, dtype=torch.float64) / (C // 4))  # (C/4,)
        coord = torch.arange(side, dtype=torch.float64)
        rows, cols = torch.meshgrid(coord, coord, indexing="ij")  # (side, side) each; patch order is row-major

        def table(t: torch.Tensor) -> torch.Tensor:  # (side, side) -> (N, C/2)
            angle = t.reshape(-1, 1) * omega[None]
            return torch.cat([angle.sin(), angle.cos()], dim=1)

        pos = torch.cat([table(rows), table(cols)], dim=1)  # (N, C)
        w = self.position_embedding.weight
        w[0].zero_()
        w[1:].copy_(scale * pos.to(w.dtype))


class CLIPTextEmbeddings(nn.Module):
    """e_t = token[x_t] + position[t] (learned positions, as GPT-2)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.text_hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.position_embedding.num_embeddings:
            raise ValueError(f"captions of {T} tokens; this model has {self.position_embedding.num_embeddings} "
                             "positions (max_position_embeddings)")
        return self.token_embedding(input_ids) + self.position_embedding.weight[:T][None]


# ---------------------------------------------------------------------------------------------------
# The encoder layer, shared by both towers: pre-LN attention and MLP
# ---------------------------------------------------------------------------------------------------

class CLIPAttention(nn.Module):
    """softmax(q k^T / sqrt(D) + mask) v, H heads; the text tower passes a causal + padding mask, the vision
    tower none (every patch sees every patch)."""

    def __init__(self, t: TowerSizes):
        super().__init__()
        if t.hidden_size % t.num_attention_heads:
            raise ValueError(f"hidden size {t.hidden_size} is not a multiple of {t.num_attention_heads} heads")
        self.H, self.D = t.num_attention_heads, t.hidden_size // t.num_attention_heads
        self.dropout = t.attention_dropout
        self.k_proj = nn.Linear(t.hidden_size, t.hidden_size)
        self.v_proj = nn.Linear(t.hidden_size, t.hidden_size)
        self.q_proj = nn.Linear(t.hidden_size, t.hidden_size)
        self.out_proj = nn.Linear(t.hidden_size, t.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C); mask (B, 1, T, T) True where a query may look at a key, or None."""
        B, T, C = x.shape
        # 1) project and split into heads                                       (B, T, C) -> (B, H, T, D)
        q, k, v = (proj(x).view(B, T, self.H, self.D).transpose(1, 2) for proj in (self.q_proj, self.k_proj,
                                                                                  self.v_proj))
        # 2) attend (sdpa computes softmax(q k^T / sqrt(D) + mask) v; the equation, written out, is in the appendix)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        # 3) concatenate the heads and mix them                                 (B, H, T, D) -> (B, T, C)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    """fc2(act(fc1 x)), 4x wide."""

    def __init__(self, t: TowerSizes):
        super().__init__()
        self.act = ACT[t.hidden_act]
        self.fc1 = nn.Linear(t.hidden_size, t.intermediate_size)
        self.fc2 = nn.Linear(t.intermediate_size, t.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """x = x + attn(LN1 x); x = x + mlp(LN2 x): pre-LN, like GPT-2 (and unlike BERT's post-LN)."""

    def __init__(self, t: TowerSizes):
        super().__init__()
        self.self_attn = CLIPAttention(t)
        self.layer_norm1 = nn.LayerNorm(t.hidden_size, eps=t.layer_norm_eps)
        self.mlp = CLIPMLP(t)
        self.layer_norm2 = nn.LayerNorm(t.hidden_size, eps=t.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, t: TowerSizes):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(t) for _ in range(t.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


# ---------------------------------------------------------------------------------------------------
# The two towers
# ---------------------------------------------------------------------------------------------------

class CLIPVisionTransformer(nn.Module):
    """A ViT whose class token, after the last layer and post_layernorm, is the image's feature."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        t = tower_sizes(cfg, "vision")
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(t.hidden_size, eps=t.layer_norm_eps)  # (sic): the checkpoints' key
        self.encoder = CLIPEncoder(t)
        self.post_layernorm = nn.LayerNorm(t.hidden_size, eps=t.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (every token's last state (B, 1 + N, C), the pooled image feature (B, C))."""
        h = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        return h, self.post_layernorm(h[:, 0])


class CLIPTextTransformer(nn.Module):
    """A causal transformer: the state at the end-of-text token has read the whole caption, and is the
    caption's feature (a bidirectional encoder would pool; causal keeps the tower usable as a language model)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        t = tower_sizes(cfg, "text")
        self.eos_token_id = cfg.eos_token_id
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(t)
        self.final_layer_norm = nn.LayerNorm(t.hidden_size, eps=t.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, T), attention_mask (B, T) 1 on real tokens. Returns (the last states (B, T, C), the
        state at each caption's first end-of-text token (B, C))."""
        B, T = input_ids.shape
        # 1) a query sees the keys at or before it (causal) that are not padding           (B, 1, T, T)
        mask = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        h = self.final_layer_norm(self.encoder(self.embeddings(input_ids), mask))
        # 2) read each caption at its first <|endoftext|> (every caption must have one: the tokenizer adds it).
        # Checkpoints written before transformers' PR #24773 (OpenAI's) say eos_token_id 2 and mean the largest
        # id, which <|endoftext|> is in their vocabulary: transformers reads those at the argmax, and so do we
        if self.eos_token_id == 2:
            eos = input_ids.argmax(-1)
        else:
            eos = (input_ids == self.eos_token_id).int().argmax(-1)
        return h, h[torch.arange(B, device=h.device), eos]


def init_weights(m: nn.Module, n_layers: int) -> None:
    """transformers' CLIP initialisation (factor 1): normal(0.02) embeddings; the projections into the
    residual stream scaled by 1/sqrt(width) and by 1/sqrt(2 L), as GPT-2 does, so the stream keeps its scale."""
    if isinstance(m, CLIPTextEmbeddings):
        nn.init.normal_(m.token_embedding.weight, std=0.02)
        nn.init.normal_(m.position_embedding.weight, std=0.02)
    elif isinstance(m, CLIPVisionEmbeddings):
        nn.init.normal_(m.class_embedding, std=m.class_embedding.shape[0] ** -0.5)
        nn.init.normal_(m.patch_embedding.weight, std=0.02)
        nn.init.normal_(m.position_embedding.weight, std=0.02)
    elif isinstance(m, CLIPAttention):
        C = m.q_proj.in_features
        for proj in (m.q_proj, m.k_proj, m.v_proj):
            nn.init.normal_(proj.weight, std=C ** -0.5 * (2 * n_layers) ** -0.5)
        nn.init.normal_(m.out_proj.weight, std=C ** -0.5)
    elif isinstance(m, CLIPMLP):
        C = m.fc1.in_features
        nn.init.normal_(m.fc1.weight, std=(2 * C) ** -0.5)
        nn.init.normal_(m.fc2.weight, std=C ** -0.5 * (2 * n_layers) ** -0.5)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


class CLIPModel(nn.Module):
    """Both towers, their projections into one E-dimensional space, and the learned temperature."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.vision_model = CLIPVisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.vision_hidden_size, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text_hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init_value))
        for tower, n_layers in ((self.text_model, cfg.text_num_hidden_layers),
                                (self.vision_model, cfg.vision_num_hidden_layers)):
            for m in tower.modules():
                init_weights(m, n_layers)
        nn.init.normal_(self.visual_projection.weight, std=cfg.vision_hidden_size ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=cfg.text_hidden_size ** -0.5)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, E), not normalised (as transformers' get_image_features)."""
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, E), not normalised."""
        return self.text_projection(self.text_model(input_ids, attention_mask)[1])

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """logits_per_image[i, j] = exp(logit_scale) <img_i / |img_i|, txt_j / |txt_j|>; logits_per_text is
        its transpose. Also returns both normalised embeddings (B, E)."""
        img = F.normalize(self.get_image_features(pixel_values), dim=-1)
        txt = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)
        logits_per_text = self.logit_scale.exp() * txt @ img.t()  # (B_text, B_image)
        return {"logits_per_image": logits_per_text.t(), "logits_per_text": logits_per_text,
                "image_embeds": img, "text_embeds": txt}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


MAX_LOGIT_SCALE = math.log(100.0)  # open_clip clamps exp(logit_scale) at 100 after every optimizer step
