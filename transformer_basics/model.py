"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), written from scratch.

    source ids --Embedding*sqrt(C) + sinusoid--> Encoder (N x [self-attn, FFN]) --> memory
    target ids --Embedding*sqrt(C) + sinusoid--> Decoder (N x [causal self-attn, cross-attn, FFN])
               --> lm_head --> logits over the target vocabulary

Module and parameter names follow Hugging Face's encoder-decoders (MarianMT/BART: ``self_attn``,
``encoder_attn``, ``q_proj``, ``fc1``, ``final_layer_norm``, ``lm_head``), so this file can be read
side by side with ``transformers/models/marian/modeling_marian.py``.

Shapes: B batch, S source length, T target length, C d_model, H heads, D head dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TransformerConfig:
    src_vocab_size: int = 4000  # source (English BPE) vocabulary size: the BPE target, then the real size
    tgt_vocab_size: int = 3000  # target (Chinese character) vocabulary size, set from the tokenizer
    d_model: int = 192  # C; the paper's base model uses 512, small is better on a CPU budget
    n_heads: int = 4  # H; D = C / H = 48
    n_encoder_layers: int = 3  # the paper uses 6; 3 trains in minutes
    n_decoder_layers: int = 3  # the paper uses 6
    ffn_mult: int = 4  # FFN hidden size = ffn_mult * C (paper: 2048 = 4 * 512)
    dropout: float = 0.1  # on attention weights, sub-layer outputs and embeddings (paper: 0.1; the CPU run: 0.2)
    max_len: int = 256  # longest sequence the positional table covers
    norm_first: bool = False  # False: post-LN as in the paper; True: pre-LN (trains more easily)
    tie_embeddings: bool = False  # share lm_head.weight with the decoder's input embedding
    pad_id: int = 0  # padding token id (both vocabularies)
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon (torch's default)

    def to_dict(self) -> dict:
        return asdict(self)


# The model of each named preset (train_translate.py's --preset starts from it; bench.py times it).
MODEL_PRESETS = {
    # pre-LN: with the paper's post-LN the same CPU budget ends far behind (README, "post-LN vs pre-LN");
    # dropout 0.2, not the paper's 0.1: 7.3k pairs overfit (README, "How the default recipe was chosen")
    "cpu": dict(norm_first=True, dropout=0.2),
    # fits a 4 GB GPU with room to spare: the paper's base width, 6 + 6 layers
    "gpu4gb": dict(norm_first=True, dropout=0.3, d_model=512, n_heads=8, n_encoder_layers=6, n_decoder_layers=6),
}


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Attention(Q, K, V) = softmax(Q K^T / sqrt(D)) V   (paper sec. 3.2.1).

    q: (B, H, Tq, D), k and v: (B, H, Tk, D). ``mask`` is boolean, broadcastable to (B, H, Tq, Tk),
    True where a query may attend to a key. Masked scores are set to -inf *before* the softmax, so
    they get exactly zero weight; multiplying the scores by 0 instead would leave exp(0) = 1.

    Why divide by sqrt(D): for unit-variance q and k the dot product has variance D, so without the
    scale the logits grow with D and the softmax saturates into a one-hot with vanishing gradients.
    Returns the output (B, H, Tq, D) and the attention weights (B, H, Tq, Tk).

    $$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\left(\frac{Q K^\top}{\sqrt{d_k}}\right) V$$"""
    d = q.size(-1)
    # 1) similarity of every query with every key               (B, H, Tq, Tk)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    # 2) forbidden positions get -inf, hence weight exp(-inf) = 0
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # 3) normalise over the keys
    weights = scores.softmax(dim=-1)
    # 4) weighted average of the values                          (B, H, Tq, D)
    out = F.dropout(weights, dropout_p, training) @ v
    return out, weights


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_H) W_o,  head_i = Attention(Q W_q^i, K W_k^i, V W_v^i)
    (paper sec. 3.2.2). The H projections of size D are done as one C x C matmul and reshaped."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.head_dim, self.dropout = n_heads, d_model // n_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, Tq, C) queries; kv: (B, Tk, C) keys/values source (None: self-attention)."""
        kv = x if kv is None else kv
        B, Tq, C = x.shape
        Tk = kv.size(1)
        # 1) project and split into heads                        (B, T, C) -> (B, H, T, D)
        q = self.q_proj(x).view(B, Tq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(kv).view(B, Tk, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(kv).view(B, Tk, self.n_heads, self.head_dim).transpose(1, 2)
        # 2) every head attends independently
        out, weights = scaled_dot_product_attention(q, k, v, mask, self.dropout, self.training)
        # 3) concatenate the heads and mix them with W_o          (B, H, Tq, D) -> (B, Tq, C)
        out = out.transpose(1, 2).reshape(B, Tq, C)
        return self.o_proj(out), weights


def padding_mask(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T) ids -> (B, 1, 1, T) bool, True for real tokens: no query may attend to a padded key."""
    return (ids != pad_id)[:, None, None, :]


def causal_mask(T: int, device: torch.device | None = None) -> torch.Tensor:
    """(1, 1, T, T) bool lower triangle: position t sees positions <= t, never the future."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]


# ----------------------------------------------------------------------------------------------
# Feed-forward, positions, embeddings
# ----------------------------------------------------------------------------------------------
class PositionwiseFeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2, applied to every position alike (paper sec. 3.3)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


def sinusoidal_table(max_len: int, d_model: int) -> torch.Tensor:
    r"""PE(pos, 2i) = sin(pos / 10000^(2i/C)), PE(pos, 2i+1) = cos(pos / 10000^(2i/C))  (sec. 3.5).
    Each pair of channels is a rotation at its own frequency, so PE(pos + k) is a linear function of
    PE(pos): relative offsets are easy to attend to.

    $$PE_{pos, 2i} = \sin\left(\frac{pos}{10000^{2i/C}}\right), \quad
    PE_{pos, 2i+1} = \cos\left(\frac{pos}{10000^{2i/C}}\right)$$"""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]  # (T, 1)
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table


class TransformerEmbedding(nn.Module):
    """token embedding * sqrt(C) + sinusoidal position, then dropout (sec. 3.4 and 3.5).
    The table is a buffer, not a parameter: nothing about positions is learned."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int, pad_id: int, dropout: float):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.register_buffer("positions", sinusoidal_table(max_len, d_model), persistent=False)
        self.scale = math.sqrt(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.size(1)
        if T > self.positions.size(0):
            raise ValueError(f"sequence length {T} exceeds max_len {self.positions.size(0)}")
        return self.dropout(self.embed_tokens(ids) * self.scale + self.positions[:T])


# ----------------------------------------------------------------------------------------------
# Encoder and decoder layers
# ----------------------------------------------------------------------------------------------
class TransformerEncoderLayer(nn.Module):
    """Self-attention then FFN, each wrapped as a residual with LayerNorm (sec. 3.1).
    post-LN (paper):  x = LN(x + Sublayer(x))      pre-LN (option): x = x + Sublayer(LN(x))"""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        C = cfg.d_model
        self.norm_first = cfg.norm_first
        self.self_attn = MultiHeadAttention(C, cfg.n_heads, cfg.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.ffn = PositionwiseFeedForward(C, cfg.ffn_mult * C, cfg.dropout)
        self.final_layer_norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), mask=src_mask)[0])
            x = x + self.dropout(self.ffn(self.final_layer_norm(x)))
        else:
            x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, mask=src_mask)[0]))
            x = self.final_layer_norm(x + self.dropout(self.ffn(x)))
        return x


class TransformerDecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the encoder memory, FFN; residual + LN around each.
    Returns the cross-attention weights too (what the attention picture shows)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        C = cfg.d_model
        self.norm_first = cfg.norm_first
        self.self_attn = MultiHeadAttention(C, cfg.n_heads, cfg.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.encoder_attn = MultiHeadAttention(C, cfg.n_heads, cfg.dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.ffn = PositionwiseFeedForward(C, cfg.ffn_mult * C, cfg.dropout)
        self.final_layer_norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, y: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor,
                src_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.norm_first:
            y = y + self.dropout(self.self_attn(self.self_attn_layer_norm(y), mask=tgt_mask)[0])
            h, cross = self.encoder_attn(self.encoder_attn_layer_norm(y), memory, src_mask)
            y = y + self.dropout(h)
            y = y + self.dropout(self.ffn(self.final_layer_norm(y)))
        else:
            y = self.self_attn_layer_norm(y + self.dropout(self.self_attn(y, mask=tgt_mask)[0]))
            h, cross = self.encoder_attn(y, memory, src_mask)
            y = self.encoder_attn_layer_norm(y + self.dropout(h))
            y = self.final_layer_norm(y + self.dropout(self.ffn(y)))
        return y, cross


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.embed = TransformerEmbedding(cfg.src_vocab_size, cfg.d_model, cfg.max_len, cfg.pad_id, cfg.dropout)
        self.layers = nn.ModuleList(TransformerEncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        # pre-LN leaves the residual stream un-normalised, so it needs one LN at the end; post-LN doesn't
        self.layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm_first else nn.Identity()

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, S, C) embedded source -> memory (B, S, C)."""
        for layer in self.layers:
            x = layer(x, src_mask)
        return self.layer_norm(x)


class TransformerDecoder(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.embed = TransformerEmbedding(cfg.tgt_vocab_size, cfg.d_model, cfg.max_len, cfg.pad_id, cfg.dropout)
        self.layers = nn.ModuleList(TransformerDecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm_first else nn.Identity()

    def forward(self, y: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor, src_mask: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """y: (B, T, C) embedded target prefix -> hidden (B, T, C), cross-attention weights per layer."""
        crosses = []
        for layer in self.layers:
            y, cross = layer(y, memory, tgt_mask, src_mask)
            crosses.append(cross)
        return self.layer_norm(y), crosses


# ----------------------------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------------------------
class Transformer(nn.Module):
    """Encoder-decoder for sequence-to-sequence tasks (sec. 3, figure 1)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.encoder = TransformerEncoder(cfg)
        self.decoder = TransformerDecoder(cfg)
        # untied by default: source and target vocabularies differ here (English BPE vs Chinese chars).
        # The paper ties the pre-softmax matrix with the embeddings (sec. 3.4); --tie-embeddings does
        # that on the decoder side (the only tie possible with two vocabularies).
        self.lm_head = nn.Linear(cfg.d_model, cfg.tgt_vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.decoder.embed.embed_tokens.weight

    def _init_weights(self, m: nn.Module) -> None:
        # Xavier-uniform for matrices, as in the reference implementation (tensor2tensor / nn.Transformer);
        # embeddings N(0, C^-0.5) so that embedding * sqrt(C) has unit scale
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=self.config.d_model ** -0.5)
            nn.init.zeros_(m.weight[self.config.pad_id])

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src ids (B, S) -> memory (B, S, C) and the source padding mask (B, 1, 1, S)."""
        src_mask = padding_mask(src, self.config.pad_id)
        return self.encoder(self.encoder.embed(src), src_mask), src_mask

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor,
               return_attention: bool = False):
        """target prefix ids (B, T) -> logits (B, T, V) for the next token at every position."""
        T = tgt_in.size(1)
        # a target position may see neither padding nor the future
        tgt_mask = padding_mask(tgt_in, self.config.pad_id) & causal_mask(T, tgt_in.device)
        h, crosses = self.decoder(self.decoder.embed(tgt_in), memory, tgt_mask, src_mask)
        logits = self.lm_head(h)
        return (logits, crosses) if return_attention else logits

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: all T next-token predictions in one parallel pass."""
        memory, src_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_mask)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
