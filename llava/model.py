"""LLaVA: a frozen CLIP vision tower, a small projector, and a pretrained language model that reads the
projected patches as if they were words.

    picture --CLIP ViT--> patch features (layer -2, CLS dropped or kept) --projector--> "visual words"
    "<|im_start|>user\\n<image><image>...<image>\\nwhat is the red shape?<|im_end|>..." --embed--> (B, T, C)
    the visual words replace the <image> placeholders, one per patch, and the LLM answers as usual

The paper is Liu et al. 2023, "Visual Instruction Tuning" (LLaVA, a linear projector), and Liu et al. 2024,
"Improved Baselines with Visual Instruction Tuning" (LLaVA-1.5: a two-layer MLP with GELU, features from the
penultimate layer). LLaVA-NeXT (v1.6) cuts a large picture into tiles of the tower's size plus a downscaled
view of the whole, and marks the end of each row of patches with a learned "newline" vector (``anyres_*``).

The vision tower and the language model are transformers' own classes, loaded from directories
(``loading.py``) exactly as one loads real ones from a hub; what this file writes is the LLaVA part: the
projector, the splice of image features into the token embeddings, and the anyres tiling and packing. The
names are those of transformers' ``LlavaForConditionalGeneration`` (``vision_tower``,
``multi_modal_projector.linear_1/linear_2``, ``language_model``), so the export is a renaming of the keys
(tests/test_llava.py checks the logits against transformers' class built from the same weights).

Shapes: B batch, T tokens, N patches per image, Cv the tower's width, C the language model's width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # labels at prompt and image positions: cross_entropy skips them


@dataclass
class LlavaConfig:
    """The LLaVA part; the tower's and the language model's configs live in their own directories."""

    projector_type: str = "mlp2x_gelu"  # linear (LLaVA v1) or mlp2x_gelu (v1.5: Linear-GELU-Linear)
    vision_feature_layer: int = -2  # which hidden state of the tower (-2: the penultimate layer, as v1.5)
    vision_feature_select_strategy: str = "default"  # default drops the CLS token (LLaVA-1.5); full keeps it first
    pool: int = 1  # average s x s neighbouring patches before the projector (1: none; 2: 64 -> 16 tokens)
    image_token_id: int = -1  # the placeholder token's id; set from the tokenizer (loading.py)
    anyres: bool = False  # LLaVA-NeXT: tiles of a best-fit grid plus a global view, a newline after each row
    image_grid_pinpoints: list = field(default_factory=lambda: [[64, 128], [128, 64], [128, 128]])  # (H, W)
    # the grids anyres may choose, multiples of the tower's image size

    def __post_init__(self):
        if self.projector_type not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"projector_type {self.projector_type!r}: expected linear or mlp2x_gelu")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {self.vision_feature_select_strategy!r}: "
                             "expected default or full")
        if self.anyres and self.vision_feature_select_strategy != "default":
            raise ValueError("anyres stitches the tiles' patch grids: it takes vision_feature_select_strategy "
                             "default (the CLS token dropped)")

    def num_image_tokens(self, grid: int) -> int:
        """Tokens one (non-anyres) picture becomes on a tower with a grid x grid patches: (grid / pool)^2, plus 1
        when the CLS token is kept."""
        g = grid // self.pool
        return g * g + (self.vision_feature_select_strategy == "full")


class LlavaMultiModalProjector(nn.Module):
    """Tower features -> the language model's embedding space. v1: one Linear (``linear_1``); v1.5:
    Linear -> GELU -> Linear (LLaVA's ``mlp2x_gelu``; transformers' names)."""

    def __init__(self, kind: str, vision_dim: int, text_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.act = nn.GELU() if kind == "mlp2x_gelu" else None
        self.linear_2 = nn.Linear(text_dim, text_dim) if kind == "mlp2x_gelu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        if self.linear_2 is not None:
            x = self.linear_2(self.act(x))
        return x


class LlavaModel(nn.Module):
    """vision_tower (a transformers CLIPVisionModel, frozen) + multi_modal_projector + language_model (a
    transformers causal LM; peft may wrap it for LoRA). ``image_newline`` exists with ``anyres`` only."""

    def __init__(self, config: LlavaConfig, vision_tower: nn.Module, language_model: nn.Module):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower.requires_grad_(False).eval()
        vcfg, tcfg = vision_tower.config, language_model.config
        self.multi_modal_projector = LlavaMultiModalProjector(config.projector_type, vcfg.hidden_size,
                                                              tcfg.hidden_size)  # pooling keeps the width
        self.language_model = language_model
        if config.anyres:  # LLaVA-NeXT's init: randn / sqrt(C)
            self.image_newline = nn.Parameter(torch.randn(tcfg.hidden_size) / math.sqrt(tcfg.hidden_size))

    # -- the image side ---------------------------------------------------------------------------------
    @property
    def grid(self) -> int:
        """Patches per side of one view: image_size // patch_size (8 for a 64 px tower with 8 px patches)."""
        return self.vision_tower.config.image_size // self.vision_tower.config.patch_size

    def num_image_tokens(self) -> int:
        """Tokens one (non-anyres) picture becomes (``LlavaConfig.num_image_tokens`` for this tower's grid)."""
        return self.config.num_image_tokens(self.grid)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, C): the tower's hidden state ``vision_feature_layer`` (not post-LN: hidden
        state -1 is the last block's output, before post_layernorm), CLS dropped or kept in front (the strategy),
        the patches pooled, all projected."""
        # 1) the frozen tower; no graph is kept through it
        with torch.no_grad():
            out = self.vision_tower(pixel_values, output_hidden_states=True)
            h = out.hidden_states[self.config.vision_feature_layer]  # (B, 1 + N, Cv)
        # 2) LLaVA-1.5 drops the CLS token ("default"): the patches keep their places; "full" keeps it in front
        cls, h = h[:, :1], h[:, 1:]
        # 3) NEW (not in LLaVA-1.5): average s x s neighbouring patches, s^2 times fewer tokens for the LLM to read
        s = self.config.pool
        if s > 1:
            B, N, Cv = h.shape
            g = int(math.isqrt(N))
            h = F.avg_pool2d(h.transpose(1, 2).reshape(B, Cv, g, g), s).flatten(2).transpose(1, 2)
        if self.config.vision_feature_select_strategy == "full":
            h = torch.cat([cls, h], dim=1)
        # 4) into the language model's space                                        (B, N, Cv) -> (B, N, C)
        return self.multi_modal_projector(h)

    def anyres_features(self, image: torch.Tensor) -> torch.Tensor:
        """One normalised picture of any size (3, H, W) -> its LLaVA-NeXT visual words (L, C): every view
        through the tower and the projector, then stitched and packed with the newline vector."""
        tile = self.vision_tower.config.image_size
        views, grid = anyres_views(image, self.config.image_grid_pinpoints, tile)
        return pack_anyres(self.image_features(views), tuple(image.shape[-2:]), grid, self.image_newline)

    # -- the splice -------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with each image's features written over its run of placeholder tokens, in order:
        the k-th <image> token of the batch (row-major) gets the k-th feature vector of ``image_features``
        (B_img, N, C) flattened. The placeholder's own id may lie outside the vocabulary (it is replaced
        before the lookup), so the language model's embedding table needs no new row."""
        is_image = input_ids == self.config.image_token_id  # (B, T)
        embeds = self.language_model.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # (B, T, C)
        n_slots = int(is_image.sum())
        n_feats = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_slots != n_feats:
            raise ValueError(f"{n_slots} image placeholder tokens but {n_feats} image features: a prompt needs "
                             f"one placeholder per patch ({self.num_image_tokens()} per picture here)")
        if n_slots:
            feats = image_features.reshape(-1, image_features.shape[-1]).to(embeds.dtype)
            embeds = embeds.masked_scatter(is_image[..., None], feats)
        return embeds

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """logits (B, T, V) without labels; with labels (B, T) the mean next-token cross-entropy over the
        positions whose label is not -100 (the answer), and the logits of those positions only: the
        vocabulary projection of the other positions would be thrown away. ``attention_mask`` is the usual
        (B, T) padding mask, or a boolean (B, 1, T, T) one (True = may attend; training.py:pack_questions
        builds it) that is used as it is, with ``position_ids`` to go with it."""
        if attention_mask is not None and attention_mask.ndim == 4:
            attention_mask = self.custom_mask(attention_mask)
        # 1) pictures -> visual words (or features the caller computed: anyres, a cache)
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values)
        # 2) splice them into the token embeddings                                       (B, T, C)
        embeds = self.embed(input_ids, image_features)
        # 3) the language model, unchanged, on embeddings instead of ids
        if labels is None:
            logits = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                         position_ids=position_ids).logits
            return {"logits": logits}
        hidden = self.language_model.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                                   position_ids=position_ids).last_hidden_state  # (B, T, C)
        # 4) position t predicts token t + 1; only the supervised ones are scored
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        logits = self.language_model.get_output_embeddings()(hidden[:, :-1][keep])  # (K, V)
        return {"loss": F.cross_entropy(logits.float(), target[keep]), "logits": logits}

    def custom_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean (B, 1, T, T) mask as the language model's attention wants a ready-made 4-D one:
        boolean for sdpa, additive for the eager attention, which adds it to the scores (0 where allowed, fp32's
        minimum elsewhere: added to bf16 scores it promotes them to fp32 before the softmax, no overflow)."""
        impl = self.language_model.config._attn_implementation
        if impl.startswith("flash"):
            raise ValueError(f"attention {impl!r} takes no ready-made 4-D mask: load the language model with sdpa or "
                             "eager attention, or train with --no-pack-questions")
        if impl != "eager":
            return allowed
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, torch.finfo(torch.float32).min)

    # -- decoding ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None,
                 max_new_tokens: int, eos_token_id: int, image_features: torch.Tensor | None = None
                 ) -> list[list[int]]:
        """Greedy decoding with the language model's KV cache. Prompts are left-padded (B, T), so every row's
        next token goes at the same column; positions count real tokens only. Returns each row's new ids,
        stopped at (and without) eos."""
        from transformers import DynamicCache

        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values)
        embeds = self.embed(input_ids, image_features)
        mask = attention_mask.clone()
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache()
        out_ids: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                         cache=cache, use_cache=True).logits[:, -1]
            nxt = logits.argmax(-1)  # (B,)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t == eos_token_id:
                        done[i] = True
                    else:
                        out_ids[i].append(t)
            if bool(done.all()):
                break
            embeds = self.language_model.get_input_embeddings()(nxt[:, None])
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            positions = positions[:, -1:] + 1
        return out_ids


# ---------------------------------------------------------------------------------------------------------
# anyres (LLaVA-NeXT): a picture larger than the tower's input becomes a grid of tiles plus a global view
# ---------------------------------------------------------------------------------------------------------

def select_best_resolution(size: tuple[int, int], pinpoints: list) -> tuple[int, int]:
    """The grid (H, W) among ``pinpoints`` that keeps the most of the picture's pixels once it is scaled to fit
    (aspect kept), ties broken by the least padding. ``size`` is the picture's (H, W)."""
    h, w = size
    best, best_kept, best_waste = None, -1, math.inf
    for gh, gw in pinpoints:
        scale = min(gw / w, gh / h)
        kept = min(int(w * scale) * int(h * scale), w * h)  # a grid larger than the picture adds no detail
        waste = gh * gw - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (gh, gw), kept, waste
    return best


def fit_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of the picture scaled to fit ``target`` with its aspect kept: the limiting side fills the target,
    the other side rounds up (at most the target)."""
    (h, w), (th, tw) = size, target
    if tw / w < th / h:
        return min(math.ceil(h * tw / w), th), tw
    return th, min(math.ceil(w * th / h), tw)


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) float -> (3, h, w): bicubic with antialiasing (what torchvision's resize does on tensors)."""
    return F.interpolate(image[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]


def anyres_views(image: torch.Tensor, pinpoints: list, tile: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, H, W) -> (1 + gh * gw, 3, tile, tile): the whole picture resized to one tile, then the tiles of the
    best grid, row by row. The picture is scaled to fit the grid (aspect kept) and padded with zeros evenly on
    both sides. Returns the views and the grid (rows, cols)."""
    H, W = image.shape[-2:]
    gh, gw = select_best_resolution((H, W), pinpoints)
    fh, fw = fit_size((H, W), (gh, gw))
    fitted = resize(image, (fh, fw))
    left, top = (gw - fw) // 2, (gh - fh) // 2
    canvas = F.pad(fitted, (left, gw - fw - left, top, gh - fh - top))  # zeros: the normalised mean colour
    tiles = [canvas[:, i:i + tile, j:j + tile] for i in range(0, gh, tile) for j in range(0, gw, tile)]
    return torch.stack([resize(image, (tile, tile)), *tiles]), (gh // tile, gw // tile)


def unpad_features(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) features of the padded canvas -> the rows or columns that cover the picture itself: the
    padding added by ``anyres_views`` carries nothing, so its tokens are dropped."""
    H, W = size
    h, w = x.shape[1:]
    if W / H > w / h:  # the picture is wider than the grid: padding above and below
        new_h = int(round(H * (w / W), 7))
        pad = (h - new_h) // 2
        return x[:, pad:h - pad, :]
    new_w = int(round(W * (h / H), 7))
    pad = (w - new_w) // 2
    return x[:, :, pad:w - pad]


def pack_anyres(features: torch.Tensor, size: tuple[int, int], grid: tuple[int, int],
                newline: torch.Tensor | None) -> torch.Tensor:
    """(1 + rows * cols, n * n, C) projected features of ``anyres_views`` -> (L, C), the picture's visual words:
    the global view's n * n, then the tiles stitched back into one (rows * n, cols * n) map, unpadded, read row
    by row with ``newline`` after each row (so the language model can tell where a row ends)."""
    rows, cols = grid
    base, tiles = features[0], features[1:]
    n = int(math.isqrt(tiles.shape[1]))
    C = tiles.shape[-1]
    # 1) tiles (rows*cols, n*n, C) -> one map (C, rows*n, cols*n)
    m = tiles.view(rows, cols, n, n, C).permute(4, 0, 2, 1, 3).reshape(C, rows * n, cols * n)
    # 2) drop the padding's rows or columns
    m = unpad_features(m, size)
    # 3) a newline column at the end of each row, then read row by row
    if newline is not None:
        m = torch.cat([m, newline[:, None, None].expand(C, m.shape[1], 1).to(m)], dim=2)
    return torch.cat([base, m.flatten(1).t()], dim=0)


def anyres_num_tokens(size: tuple[int, int], pinpoints: list, tile: int, n: int) -> int:
    """How many visual words ``pack_anyres`` gives a (H, W) picture (with newlines), without computing them: the
    prompt needs that many placeholders."""
    gh, gw = select_best_resolution(size, pinpoints)
    dummy = torch.zeros(1, gh // tile * n, gw // tile * n)
    h, w = unpad_features(dummy, size).shape[1:]
    return n * n + h * (w + 1)
