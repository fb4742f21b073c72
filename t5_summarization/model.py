"""T5 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer", arXiv:1910.10683), written top to bottom with transformers' module and parameter names,
so that ``T5ForConditionalGeneration``'s state dict loads into ours and back.

What T5 changes in the 2017 encoder-decoder (sec. 2.1 of the paper):
  - pre-norm residual blocks, and the norm is RMS-style: no mean subtracted, no bias (``T5LayerNorm``);
  - no absolute positions at all: each attention adds a learned scalar bias per head that depends only
    on the (bucketed) distance between query and key (``T5Attention.compute_bias``). One bias table per
    stack, owned by its first layer and shared by all of its layers; cross-attention has none;
  - no 1/sqrt(D) in the attention logits (the initialisation absorbs it);
  - T5 v1.1 (``feed_forward_proj="gated-gelu"``): a gated-GELU FFN, no dropout in pretraining, and an
    output head untied from the embedding. The original T5 ties them and scales the decoder output by
    d_model^-0.5 before the tied head.
Shapes: B batch, S source length, T target length, C d_model, H heads, D d_kv, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class T5Config:
    """Sizes and switches of the model; field names are transformers' ``T5Config``'s."""

    vocab_size: int = 8000  # sentencepiece pieces, sentinels included (the chapter's tokenizer)
    d_model: int = 256  # C: width of the residual stream
    d_kv: int = 32  # D: width of one head (T5 decouples it from d_model / num_heads)
    d_ff: int = 768  # FFN hidden width
    num_layers: int = 4  # encoder blocks
    num_decoder_layers: int = 4  # decoder blocks
    num_heads: int = 8  # H
    relative_attention_num_buckets: int = 32  # distance buckets per direction pair (T5's default)
    relative_attention_max_distance: int = 128  # distances >= this share the last bucket
    dropout_rate: float = 0.1  # residual, attention-probability and FFN dropout
    layer_norm_epsilon: float = 1e-6  # inside the RMS norm
    feed_forward_proj: str = "gated-gelu"  # "relu" (T5) or "gated-gelu" (T5 v1.1)
    tie_word_embeddings: bool = True  # lm_head = shared embedding, decoder output scaled by C^-0.5 (see below)
    pad_token_id: int = 0  # also the decoder's start token (T5 convention)
    eos_token_id: int = 1  # </s>
    decoder_start_token_id: int = 0  # = pad
    initializer_factor: float = 1.0  # scales the T5 initialisation (below)
    adapter_dim: int = 0  # > 0: a bottleneck adapter after every FFN (Houlsby et al. 2019), for adapter tuning

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")


# The model size of each named preset: train_pretrain.py's --preset starts from it, and train_summarize.py's
# random-init control (--init-from "") has the size of the pretraining run of the same preset name.
MODEL_PRESETS = {
    "cpu": dict(d_model=128, d_kv=32, num_heads=4, d_ff=512, num_layers=2, num_decoder_layers=2),
    "gpu4gb": dict(d_model=512, d_kv=64, num_heads=8, d_ff=1024, num_layers=6, num_decoder_layers=6),
}


class T5LayerNorm(nn.Module):
    """RMS norm (no centring, no bias): y = w * x / sqrt(mean(x^2) + eps), the variance in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (what T5 v1.1 and transformers' "gelu_new" use)."""
    return F.gelu(x, approximate="tanh")


class T5DenseActDense(nn.Module):
    """T5's FFN: wo(relu(wi x)), no biases anywhere in T5."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.dropout(F.relu(self.wi(x))))


class T5DenseGatedActDense(nn.Module):
    """T5 v1.1's gated-GELU FFN (Shazeer 2020, arXiv:2002.05202): wo(gelu(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.dropout(gelu_new(self.wi_0(x)) * self.wi_1(x)))


class Adapter(nn.Module):
    """NEW (not in T5 or transformers): h + up(relu(down(h))), ``up`` zero-initialised so that a freshly
    added adapter changes nothing. Adapter tuning trains only these (and the norms)."""

    def __init__(self, d_model: int, dim: int):
        super().__init__()
        self.down = nn.Linear(d_model, dim)
        self.up = nn.Linear(dim, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.relu(self.down(h)))


class T5LayerFF(nn.Module):
    """Pre-norm residual around the FFN: x + dropout(FFN(norm(x))) (with the adapter, if any, on FFN's output)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg) if cfg.is_gated_act else T5DenseActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.adapter = Adapter(cfg.d_model, cfg.adapter_dim) if cfg.adapter_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.DenseReluDense(self.layer_norm(x))
        if self.adapter is not None:
            h = self.adapter(h)
        return x + self.dropout(h)


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Map a distance (key position - query position) to one of ``num_buckets`` buckets.

    Bidirectional (encoder): half the buckets for keys before the query, half for keys after. Causal
    (decoder): keys after the query cannot be seen, so all buckets go to the past. Within a direction,
    the first half of its buckets are exact distances 0, 1, 2, ...; the rest grow logarithmically up to
    ``max_distance``; anything farther shares the last bucket (Mesh TensorFlow's scheme, paper sec. 2.1).
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets  # keys to the right: upper half
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # only the past counts
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log-spaced buckets for max_exact <= distance < max_distance (float log of 0 is -inf: masked by is_small)
    log_bucket = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                              * (num_buckets - max_exact)).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, log_bucket)


class T5Attention(nn.Module):
    """Multi-head attention without the 1/sqrt(D) scale, plus (self-attention of a stack's first layer
    only) a learned relative position bias: one scalar per (head, distance bucket).

    Self-attention: keys/values from ``x``; cross-attention: from ``kv`` (the encoder output).
    ``cache`` holds past keys/values: for self-attention it grows by the new tokens, for
    cross-attention it is computed once from the encoder output and reused at every step.
    """

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool = False, is_decoder: bool = False):
        super().__init__()
        self.n_heads, self.d_kv, self.is_decoder = cfg.num_heads, cfg.d_kv, is_decoder
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.has_relative_attention_bias = has_relative_attention_bias
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, cfg.num_heads)
        self.dropout = cfg.dropout_rate

    def compute_bias(self, q_len: int, k_len: int, past: int = 0) -> torch.Tensor:
        """(1, H, q_len, k_len): the bias of query i (at absolute position past + i) towards key j."""
        device = self.relative_attention_bias.weight.device
        query_pos = torch.arange(q_len, device=device)[:, None] + past
        key_pos = torch.arange(k_len, device=device)[None, :]
        bucket = relative_position_bucket(key_pos - query_pos, bidirectional=not self.is_decoder,
                                          num_buckets=self.num_buckets, max_distance=self.max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)  # (q, k, H) -> (1, H, q, k)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, kv: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x (B, T, C); mask additive, broadcastable to (B, H, T, S); returns (out, position_bias, cache)."""
        B, T, _ = x.shape
        # 1) queries from x; keys/values from x (self) or from the encoder output (cross)  (B, H, *, D)
        q = self.q(x).view(B, T, self.n_heads, self.d_kv).transpose(1, 2)
        past = 0
        if kv is not None and cache is not None:  # cross-attention: the encoder's keys/values never change
            k, v = cache
        else:
            src = x if kv is None else kv
            k = self.k(src).view(B, -1, self.n_heads, self.d_kv).transpose(1, 2)
            v = self.v(src).view(B, -1, self.n_heads, self.d_kv).transpose(1, 2)
            if cache is not None:  # self-attention while decoding: append the new step
                past = cache[0].shape[2]
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        new_cache = (k, v)
        # 2) the position bias: computed by the first layer, passed on to the others
        if position_bias is None:
            if self.has_relative_attention_bias:
                position_bias = self.compute_bias(T, k.shape[2], past)
            else:
                position_bias = torch.zeros(1, self.n_heads, T, k.shape[2], dtype=q.dtype, device=q.device)
        # 3) scores = q k^T (no 1/sqrt(D): T5's init folds it into W_q) + bias + mask; softmax; weighted sum
        scores = q @ k.transpose(-2, -1) + position_bias
        if mask is not None:
            scores = scores + mask
        attn = F.dropout(scores.float().softmax(dim=-1).type_as(scores), self.dropout, self.training)
        out = (attn @ v).transpose(1, 2).reshape(B, T, -1)
        return self.o(out), position_bias, new_cache


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, is_decoder: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias, is_decoder)
        self.layer_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x, mask=None, position_bias=None, cache=None):
        out, position_bias, cache = self.SelfAttention(self.layer_norm(x), mask, position_bias=position_bias,
                                                       cache=cache)
        return x + self.dropout(out), position_bias, cache


class T5LayerCrossAttention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(cfg, has_relative_attention_bias=False, is_decoder=True)
        self.layer_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x, encoder_out, mask=None, cache=None):
        out, _, cache = self.EncDecAttention(self.layer_norm(x), mask, kv=encoder_out, cache=cache)
        return x + self.dropout(out), cache


class T5Block(nn.Module):
    """Encoder block: self-attention, FFN. Decoder block: causal self-attention, cross-attention, FFN.
    ``layer`` is a ModuleList so the parameter names match transformers' (``block.0.layer.1.EncDecAttention``)."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias, is_decoder)])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(cfg))
        self.layer.append(T5LayerFF(cfg))

    def forward(self, x, mask=None, position_bias=None, encoder_out=None, encoder_mask=None, cache=None):
        self_cache, cross_cache = cache if cache is not None else (None, None)
        x, position_bias, self_cache = self.layer[0](x, mask, position_bias, self_cache)
        if self.is_decoder:
            x, cross_cache = self.layer[1](x, encoder_out, encoder_mask, cross_cache)
        return self.layer[-1](x), position_bias, (self_cache, cross_cache)


class T5Stack(nn.Module):
    """Embedding (shared with the other stack) -> dropout -> blocks -> final RMS norm -> dropout."""

    def __init__(self, cfg: T5Config, embed_tokens: nn.Embedding, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.embed_tokens = embed_tokens
        n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        # only block 0 owns a relative-position table; the bias it computes is reused by blocks 1..n-1
        self.block = nn.ModuleList(T5Block(cfg, has_relative_attention_bias=i == 0, is_decoder=is_decoder)
                                   for i in range(n))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_out: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                cache: list | None = None):
        """ids (B, L); attention_mask (B, L) 1 = real token (encoder) / None; returns (hidden, new cache)."""
        x = self.dropout(self.embed_tokens(ids))
        B, L = ids.shape
        dtype_min = torch.finfo(x.dtype).min
        # additive masks: 0 where attention is allowed, the dtype's minimum where it is not
        mask = None
        if attention_mask is not None:  # padding keys (encoder)
            mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * dtype_min
        if self.is_decoder:
            past = cache[0][0][0].shape[2] if cache is not None else 0
            causal = torch.ones(L, past + L, dtype=torch.bool, device=ids.device).tril(past)
            mask = torch.zeros(L, past + L, dtype=x.dtype, device=ids.device).masked_fill(~causal, dtype_min)
            mask = mask[None, None]  # (1, 1, L, past + L)
        enc_mask = None
        if encoder_attention_mask is not None:
            enc_mask = (1.0 - encoder_attention_mask[:, None, None, :].to(x.dtype)) * dtype_min
        position_bias, new_cache = None, []
        for i, block in enumerate(self.block):
            x, position_bias, layer_cache = block(x, mask, position_bias, encoder_out, enc_mask,
                                                  cache[i] if cache is not None else None)
            new_cache.append(layer_cache)
        return self.dropout(self.final_layer_norm(x)), new_cache


class T5ForConditionalGeneration(nn.Module):
    """Encoder-decoder with a language-model head: ids -> encoder; (shifted) targets -> decoder -> logits."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, self.shared, is_decoder=False)
        self.decoder = T5Stack(cfg, self.shared, is_decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """T5's initialisation (Mesh TensorFlow; transformers' ``T5PreTrainedModel._init_weights``):
        normal with std 1/sqrt(fan_in); W_q additionally by 1/sqrt(D), which replaces the missing
        1/sqrt(D) of the attention logits."""
        f, C = self.config.initializer_factor, self.config.d_model
        self.shared.weight.normal_(0.0, f * 1.0)
        self.lm_head.weight.normal_(0.0, f * C**-0.5)
        for m in self.modules():
            if isinstance(m, T5LayerNorm):
                m.weight.fill_(f * 1.0)
            elif isinstance(m, (T5DenseActDense, T5DenseGatedActDense)):
                for name in ("wi", "wi_0", "wi_1"):
                    if hasattr(m, name):
                        getattr(m, name).weight.normal_(0.0, f * C**-0.5)
                m.wo.weight.normal_(0.0, f * self.config.d_ff**-0.5)
            elif isinstance(m, T5Attention):
                D, H = self.config.d_kv, self.config.num_heads
                m.q.weight.normal_(0.0, f * (C * D) ** -0.5)
                m.k.weight.normal_(0.0, f * C**-0.5)
                m.v.weight.normal_(0.0, f * C**-0.5)
                m.o.weight.normal_(0.0, f * (H * D) ** -0.5)
                if m.has_relative_attention_bias:
                    m.relative_attention_bias.weight.normal_(0.0, f * C**-0.5)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs: the start token, then the labels without their last token (-100 -> pad)."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask)[0]

    def decode(self, decoder_input_ids: torch.Tensor, encoder_out: torch.Tensor,
               attention_mask: torch.Tensor | None = None, cache: list | None = None):
        """Logits (B, T, V) for the decoder inputs given the encoder output, and the updated cache."""
        h, cache = self.decoder(decoder_input_ids, None, encoder_out, attention_mask, cache)
        if self.config.tie_word_embeddings:
            h = h * self.config.d_model**-0.5  # the tied head sees embeddings of norm ~sqrt(C): rescale
        return self.lm_head(h), cache

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None):
        """Teacher forcing: returns (loss or None, logits). Label positions set to -100 are ignored."""
        if decoder_input_ids is None:
            decoder_input_ids = self.shift_right(labels)
        logits, _ = self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return loss, logits


def to_hf_config(cfg: T5Config):
    """The transformers ``T5Config`` of the same model."""
    from transformers import T5Config as HFT5Config

    if cfg.adapter_dim:
        raise ValueError("transformers' T5 has no adapters: merge or drop them before exporting")
    return HFT5Config(**{k: v for k, v in cfg.to_dict().items() if k != "adapter_dim"})
