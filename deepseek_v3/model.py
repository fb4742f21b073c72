"""DeepSeek-V3, small: multi-head latent attention, DeepSeekMoE with auxiliary-loss-free balancing, and
multi-token prediction. One file, top to bottom, with transformers' `DeepseekV3*` names so that
export_hf.py is a near-identity map (the packed experts aside).

Papers: DeepSeek-V2 (arXiv 2405.04434) sec. 2.1 for MLA; DeepSeek-V3 (arXiv 2412.19437) sec. 2.1.2 for the
routing and its bias, sec. 2.2 for MTP; Wang et al. 2024 (arXiv 2408.15664) for loss-free balancing.
The official inference code (deepseek-ai/DeepSeek-V3 inference/model.py) is the reference read beside it.

Shapes: B batch, T new positions, S cached + new positions, C hidden, H heads, R kv_lora_rank,
Dn / Dr / Dv the no-RoPE, RoPE and value head dims, E routed experts, K experts per token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError


@dataclass
class DeepseekV3Config:
    """The sizes, with DeepseekV3Config's field names. The defaults are the CPU preset (train.py); the
    real model is hidden 7168, 61 layers (3 dense), 128 heads, q_lora_rank 1536, kv_lora_rank 512,
    Dn 128 / Dr 64 / Dv 128, 256 routed experts of width 2048 in 8 groups (top-4 groups, top-8 experts),
    one shared expert, routed_scaling_factor 2.5, one MTP module."""

    vocab_size: int = 4096  # tokens (the tokenizer's)
    hidden_size: int = 128  # C: the residual stream's width
    intermediate_size: int = 384  # the dense MLP's width (the first first_k_dense_replace layers)
    moe_intermediate_size: int = 48  # one routed (or shared) expert's width: fine-grained = narrow
    num_hidden_layers: int = 4  # decoder layers
    first_k_dense_replace: int = 1  # the first layers keep a dense MLP (V3: 3), the rest are MoE
    num_attention_heads: int = 4  # H
    q_lora_rank: int = 64  # the query's low-rank bottleneck; 0 = a full q_proj (V2-Lite does this)
    kv_lora_rank: int = 32  # R: the compressed KV latent, the only per-head-free thing cached besides k_pe
    qk_nope_head_dim: int = 32  # Dn: the query/key part without position
    qk_rope_head_dim: int = 16  # Dr: the decoupled RoPE part; its key is one vector shared by all heads
    v_head_dim: int = 32  # Dv
    n_routed_experts: int = 16  # E
    num_experts_per_tok: int = 4  # K: routed experts per token
    n_shared_experts: int = 1  # experts every token goes through (one MLP of width n * moe_intermediate_size)
    n_group: int = 4  # expert groups (V3: one per node); 1 = no group-limited routing
    topk_group: int = 2  # groups a token may use (V3: 4 of 8 nodes)
    routed_scaling_factor: float = 1.0  # the routed output's scale (V3: 2.5 for 8 of 256 experts)
    norm_topk_prob: bool = True  # normalise the K gate values to sum to 1 (before the scale)
    aux_loss_alpha: float = 0.0  # > 0: the sequence-wise balance loss (V3 eq. 17-20) with this weight
    num_nextn_predict_layers: int = 1  # D: MTP modules, each predicting one token further (0 = none)
    max_position_embeddings: int = 128  # the context length trained at
    rope_theta: float = 10000.0  # RoPE base
    rope_factor: float = 1.0  # > 1: YaRN, the context stretched this many times past the original
    original_max_position_embeddings: int = 128  # YaRN: the context the model was trained at
    beta_fast: int = 32  # YaRN: rotations per context above which a frequency is left alone
    beta_slow: int = 1  # YaRN: below which it is fully interpolated
    mscale: float = 1.0  # YaRN: the attention-temperature factor 0.1 * mscale * ln(factor) + 1, squared
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False  # V3 keeps embed_tokens and lm_head apart
    initializer_range: float = 0.02  # std of the normal init

    def __post_init__(self):
        if self.n_routed_experts % self.n_group:
            raise UserError(f"--n-routed-experts {self.n_routed_experts}: expected a multiple of --n-group "
                             f"{self.n_group}")
        if self.n_routed_experts // self.n_group < 2 and self.n_group > 1:
            raise UserError(f"--n-group {self.n_group}: each group needs >= 2 experts (its score is the sum of "
                             f"its top 2); expected --n-routed-experts >= {2 * self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            raise UserError(f"--topk-group {self.topk_group}: expected 1 .. --n-group {self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        if not 1 <= self.num_experts_per_tok <= self.topk_group * per_group:
            raise UserError(f"--num-experts-per-tok {self.num_experts_per_tok}: expected 1 .. "
                             f"{self.topk_group * per_group} (--topk-group x experts per group)")
        if self.qk_rope_head_dim % 2:
            raise UserError(f"--qk-rope-head-dim {self.qk_rope_head_dim}: expected an even number (RoPE "
                             "rotates pairs)")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DeepseekV3Config:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown DeepseekV3Config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


class DeepseekV3RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Rotary positions, with YaRN for a longer context
# ---------------------------------------------------------------------------------------------------

def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature: 1 for factor <= 1, else 0.1 * mscale * ln(factor) + 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(cfg: DeepseekV3Config) -> torch.Tensor:
    """The Dr/2 angular frequencies theta^(-2i/Dr). With YaRN (rope_factor > 1) the low frequencies, those
    that turn fewer than beta_slow times over the original context, are divided by the factor
    (interpolated); those turning more than beta_fast times are kept; a linear ramp joins the two
    (YaRN, arXiv 2309.00071 sec. 3.2; official precompute_freqs_cis)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.rope_factor <= 1:
        return freqs

    def dim_for(rotations: float) -> float:  # the dimension index whose wavelength fits `rotations` times
        return dim * math.log(cfg.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_for(cfg.beta_fast)), 0)
    high = min(math.ceil(dim_for(cfg.beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequency, left alone), 0: interpolate
    return freqs / cfg.rope_factor * (1 - keep) + freqs * keep


def apply_rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x0, x1), (x2, x3) ... of the last dim by position * frequency, as the
    official code's complex multiply does. x (B, T, ..., Dr), positions (T,)."""
    angles = positions.float()[:, None] * freqs  # (T, Dr/2)
    shape = (1, angles.shape[0]) + (1,) * (x.dim() - 3) + (angles.shape[1],)
    cos, sin = angles.cos().view(shape), angles.sin().view(shape)
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Multi-head latent attention and its cache
# ---------------------------------------------------------------------------------------------------

class MLACache:
    """Per layer, only what MLA needs again: the normalised latent c_kv (B, S, R) and the rotated shared key
    k_pe (B, S, Dr). An MHA cache holds 2 * H * D values per token and layer; this one R + Dr."""

    def __init__(self):
        self.latent: dict[int, torch.Tensor] = {}
        self.k_pe: dict[int, torch.Tensor] = {}

    def length(self, layer: int = 0) -> int:
        return self.latent[layer].shape[1] if layer in self.latent else 0

    def update(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.latent:
            c_kv = torch.cat([self.latent[layer], c_kv], dim=1)
            k_pe = torch.cat([self.k_pe[layer], k_pe], dim=1)
        self.latent[layer], self.k_pe[layer] = c_kv, k_pe
        return c_kv, k_pe

    def crop(self, length: int, layers=None) -> None:
        """Keep the first `length` positions (speculative decoding drops a rejected draft this way)."""
        for i in self.latent if layers is None else layers:
            self.latent[i], self.k_pe[i] = self.latent[i][:, :length], self.k_pe[i][:, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.latent, self.k_pe) for t in d.values())


def causal_mask(T: int, S: int, device) -> torch.Tensor:
    """(T, S) True where new position t may see position s: the T new positions are the last of S."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


class DeepseekV3Attention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 sec. 2.1).

    q   = W_UQ RMSNorm(W_DQ x)                      low-rank query (or a full q_proj)
    c   = RMSNorm(W_DKV x)         (R)              the KV latent: all that is cached, with k_pe
    k_i = [W_UK,i c ; RoPE(W_KR x)]                 per-head no-RoPE key + one RoPE key shared by all heads
    v_i = W_UV,i c
    softmax(q_i . k_i / sqrt(Dn + Dr)) v_i, then o_proj.
    RoPE cannot sit on W_UK c (it would stop W_UK from being absorbed into the query), hence the decoupled key.
    """

    def __init__(self, cfg: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        H, C = cfg.num_attention_heads, cfg.hidden_size
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(C, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = DeepseekV3RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(C, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(C, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = DeepseekV3RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)  # on the latent only
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, C, bias=False)
        # YaRN lengthens the context; its temperature enters the softmax scale squared (official code)
        self.scale = cfg.qk_head_dim ** -0.5 * yarn_mscale(cfg.rope_factor, cfg.mscale) ** 2

    def forward(self, x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor,
                cache: MLACache | None = None, absorb: bool = False) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        H, Dn, Dr, Dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        # 1) queries, per head                                    (B, T, C) -> (B, T, H, Dn + Dr)
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if cfg.q_lora_rank else self.q_proj(x)
        q_nope, q_pe = q.view(B, T, H, Dn + Dr).split([Dn, Dr], dim=-1)
        q_pe = apply_rope(q_pe, positions, freqs)
        # 2) the latent and the shared RoPE key                   (B, T, C) -> (B, T, R), (B, T, Dr)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, Dr], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rope(k_pe.unsqueeze(2), positions, freqs).squeeze(2)
        # 3) the cache holds c_kv and k_pe only                   -> (B, S, R), (B, S, Dr)
        if cache is not None:
            c_kv, k_pe = cache.update(self.layer_idx, c_kv, k_pe)
        S = c_kv.shape[1]
        mask = causal_mask(T, S, x.device)
        w_kv = self.kv_b_proj.weight.view(H, Dn + Dv, cfg.kv_lora_rank)  # W_UK (H, Dn, R) over W_UV (H, Dv, R)
        if not absorb:
            # 4a) naive: expand the latent into per-head keys and values, then ordinary attention
            kv = self.kv_b_proj(c_kv).view(B, S, H, Dn + Dv)
            k_nope, v = kv.split([Dn, Dv], dim=-1)
            k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, H, Dr)], dim=-1)
            qh = torch.cat([q_nope, q_pe], dim=-1)
            out = F.scaled_dot_product_attention(qh.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, scale=self.scale)  # (B, H, T, Dv)
            out = out.transpose(1, 2)
        else:
            # 4b) absorbed (decoding): q_nope . (W_UK c) = (W_UK^T q_nope) . c, so fold W_UK into the query
            # and attend over the latent directly; W_UV is applied after the weighted sum. Nothing per head
            # is ever built for the S cached positions.
            q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w_kv[:, :Dn])  # (B, T, H, R)
            scores = (torch.einsum("bthr,bsr->bhts", q_lat, c_kv)
                      + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)) * self.scale
            p = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1, dtype=torch.float32).to(x.dtype)
            o_lat = torch.einsum("bhts,bsr->bthr", p, c_kv)  # (B, T, H, R)
            out = torch.einsum("bthr,hdr->bthd", o_lat, w_kv[:, Dn:])  # (B, T, H, Dv)
        return self.o_proj(out.reshape(B, T, H * Dv))


# ---------------------------------------------------------------------------------------------------
# DeepSeekMoE
# ---------------------------------------------------------------------------------------------------

class DeepseekV3MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x). The dense MLP, each expert, and the shared experts."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeepseekV3TopkRouter(nn.Module):
    """V3's gate (sec. 2.1.2):
    s_i = sigmoid(u . e_i)                                   affinity of the token to expert i
    choose top-K of s_i + b_i, within the topk_group groups of the highest sum-of-top-2 (s + b)
    g_i = s_i / sum of the chosen s_j (the UNbiased scores), times routed_scaling_factor.
    b (e_score_correction_bias) is a buffer: no optimizer touches it; it only steers which experts are chosen,
    never how much they weigh. update_routing_bias() moves it after each optimizer step."""

    def __init__(self, cfg: DeepseekV3Config):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        # tokens sent to each expert since the last bias update (not saved: a step's statistic)
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> chosen experts (N, K), their weights (N, K), all sigmoid scores (N, E)."""
        cfg = self.cfg
        N, E, G = x.shape[0], cfg.n_routed_experts, cfg.n_group
        with torch.autocast(x.device.type, enabled=False):  # in fp32, as the reference, even under autocast
            scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        biased = scores + self.e_score_correction_bias
        if G > 1:  # node-limited routing: keep the topk_group groups whose two best biased scores sum highest
            group_scores = biased.view(N, G, E // G).topk(2, dim=-1).values.sum(-1)  # (N, G)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
            biased = biased.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
        idx = biased.topk(cfg.num_experts_per_tok, dim=-1).indices  # (N, K): the bias decides who...
        weights = scores.gather(1, idx)  # ...but the unbiased scores decide how much
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        self.load += torch.bincount(idx.flatten(), minlength=E).to(self.load.dtype)  # read by the balancing
        return idx, weights * cfg.routed_scaling_factor, scores


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """V3's complementary sequence-wise balance loss (eq. 17-20), per sequence then averaged:
    f_i = E / (K T) * #tokens of the sequence routed to i,  P_i = mean over its tokens of s_i / sum_j s_j,
    L = sum_i f_i P_i  (1 when perfectly even; larger when the load and the affinity pile up together)."""
    E, K = scores.shape[-1], idx.shape[-1]
    counts = F.one_hot(idx.view(B, T * K), E).sum(1).float()  # (B, E)
    f = counts * E / (K * T)
    p = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)  # (B, E)
    return (f * p).sum(-1).mean()


class DeepseekV3MoE(nn.Module):
    """y = shared(x) + sum over the K chosen experts of g_i * expert_i(x) (DeepSeekMoE: many narrow routed
    experts for specialisation, a shared one for what every token needs). No capacity, no token dropped."""

    def __init__(self, cfg: DeepseekV3Config):
        super().__init__()
        self.cfg = cfg
        self.gate = DeepseekV3TopkRouter(cfg)
        self.experts = nn.ModuleList(DeepseekV3MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = DeepseekV3MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        self.balance_loss: torch.Tensor | None = None  # set by forward when aux_loss_alpha > 0 and training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        idx, weights, scores = self.gate(flat)  # (N, K), (N, K), (N, E)
        routed = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):  # each expert runs once, on the tokens that chose it
            token, slot = torch.where(idx == e)
            if token.numel():
                routed.index_add_(0, token, expert(flat[token]) * weights[token, slot, None].to(x.dtype))
        if self.training and self.cfg.aux_loss_alpha > 0:
            self.balance_loss = sequence_balance_loss(scores, idx, B, T)
        return self.shared_experts(x) + routed.view(B, T, C)


@torch.no_grad()
def update_routing_bias(model: nn.Module, speed: float, all_reduce=None) -> list[torch.Tensor]:
    """Auxiliary-loss-free balancing (V3 sec. 2.1.2): after each step, b_i += speed * sign(mean load - load_i):
    an overloaded expert's bias falls, so fewer tokens choose it next time; an idle one's rises.
    `all_reduce` sums the loads over processes first (DDP), so every rank makes the same move.
    Returns each MoE layer's load of this step; the counters restart at zero."""
    loads = []
    for m in model.modules():
        if isinstance(m, DeepseekV3TopkRouter):
            load = m.load.clone()
            if all_reduce is not None:
                all_reduce(load)
            if speed > 0:
                m.e_score_correction_bias += speed * torch.sign(load.mean() - load)
            m.load.zero_()
            loads.append(load)
    return loads


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean load - 1 (Wang et al. 2024): 0 when perfectly even."""
    return (load.max() / load.float().mean() - 1).item()


# ---------------------------------------------------------------------------------------------------
# The decoder, the MTP modules, the language model
# ---------------------------------------------------------------------------------------------------

class DeepseekV3DecoderLayer(nn.Module):
    """Pre-norm: x + MLA(norm(x)), then h + MLP-or-MoE(norm(h))."""

    def __init__(self, cfg: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.self_attn = DeepseekV3Attention(cfg, layer_idx)
        moe = layer_idx >= cfg.first_k_dense_replace and cfg.n_routed_experts > 0
        self.mlp = DeepseekV3MoE(cfg) if moe else DeepseekV3MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = DeepseekV3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, positions, freqs, cache=None, absorb=False):
        h = x + self.self_attn(self.input_layernorm(x), positions, freqs, cache, absorb)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekV3MTPModule(nn.Module):
    """One multi-token-prediction depth k (V3 sec. 2.2): from the previous depth's hidden state at position i
    and the embedding of token i+k, predict token i+k+1, keeping the causal chain (unlike Gloeckle et al.'s
    parallel heads):
        h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]),  h^k = block(h'),  logits = head(norm(h^k)).
    The embedding and the output head are the main model's (shared, not copied). The order in the
    concatenation is the released weights' (embedding first; the paper writes the hidden state first)."""

    def __init__(self, cfg: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.enorm = DeepseekV3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = DeepseekV3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = DeepseekV3DecoderLayer(cfg, layer_idx)
        self.norm = DeepseekV3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # the official "shared_head.norm"

    def forward(self, h_prev, emb_next, positions, freqs, cache=None, absorb=False):
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(h, positions, freqs, cache, absorb)


class DeepseekV3ForCausalLM(nn.Module):
    """Embedding -> decoder layers -> norm -> lm_head; plus the MTP modules during training.

    loss = CE(main) + mtp_loss_weight * mean over depths k of CE(depth k)  (+ alpha * balance loss, if on).
    """

    def __init__(self, cfg: DeepseekV3Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DeepseekV3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = DeepseekV3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # MTP depth k uses cache slot num_hidden_layers + k - 1
        self.mtp = nn.ModuleList(DeepseekV3MTPModule(cfg, cfg.num_hidden_layers + k)
                                 for k in range(cfg.num_nextn_predict_layers))
        self.register_buffer("rope_freqs", rope_frequencies(cfg), persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, DeepseekV3TopkRouter):
            nn.init.normal_(m.weight, std=std)

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or those one token uses (K of the E routed experts; V3: 37 B of 671 B)."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            cfg = self.config
            per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
            n_moe = sum(isinstance(layer.mlp, DeepseekV3MoE) for layer in self.layers)
            n_moe += sum(isinstance(m.block.mlp, DeepseekV3MoE) for m in self.mtp)
            n -= n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
        return n

    def hidden(self, input_ids: torch.Tensor, cache: MLACache | None = None, absorb: bool = False) -> torch.Tensor:
        """input_ids (B, T) -> the final normalised hidden states (B, T, C), appended to `cache` if given."""
        start = cache.length(0) if cache is not None else 0
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, self.rope_freqs, cache, absorb)
        return self.norm(x)

    def mtp_hidden(self, k: int, h_prev: torch.Tensor, next_ids: torch.Tensor, cache: MLACache | None = None,
                   absorb: bool = False) -> torch.Tensor:
        """Depth k (1-based): h_prev (B, T, C) at positions i, next_ids (B, T) the tokens i+k -> h^k (B, T, C)
        (normalised by the module's own norm, ready for lm_head)."""
        module = self.mtp[k - 1]
        slot = self.config.num_hidden_layers + k - 1
        start = cache.length(slot) if cache is not None else 0
        positions = torch.arange(start, start + h_prev.shape[1], device=h_prev.device)
        h = module(h_prev, self.embed_tokens(next_ids), positions, self.rope_freqs, cache, absorb)
        return module.norm(h), h

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, mtp_loss_weight: float = 0.3,
                cache: MLACache | None = None, absorb: bool = False) -> dict:
        """input_ids (B, T); labels (B, T) = the next tokens (-100 ignored). -> {"logits" (B, T, V), and with
        labels "loss", "lm_loss", "mtp_losses" (one per depth), "balance_loss"}."""
        h = self.hidden(input_ids, cache, absorb)
        logits = self.lm_head(h)
        out = {"logits": logits, "hidden": h}
        if labels is None:
            return out
        V = self.config.vocab_size
        lm_loss = F.cross_entropy(logits.float().view(-1, V), labels.reshape(-1), ignore_index=-100)
        loss, mtp_losses = lm_loss, []
        # MTP: depth k sees h^{k-1} at positions 0..T-k-1 and the tokens k..T-1 (inputs shifted by k), and
        # predicts labels[k:] (the token k+1 ahead of each position)
        T = input_ids.shape[1]
        h_prev = h
        for k in range(1, len(self.mtp) + 1):
            if T <= k:
                break
            h_norm, h_raw = self.mtp_hidden(k, h_prev[:, :T - k], input_ids[:, k:])
            mtp_logits = self.lm_head(h_norm)
            mtp_losses.append(F.cross_entropy(mtp_logits.float().reshape(-1, V), labels[:, k:].reshape(-1),
                                              ignore_index=-100))
            h_prev = h_raw
        if mtp_losses:
            loss = loss + mtp_loss_weight * torch.stack(mtp_losses).mean()
        moes = [m for m in self.modules() if isinstance(m, DeepseekV3MoE)]
        balance = [m.balance_loss for m in moes if m.balance_loss is not None]
        balance_loss = torch.stack(balance).mean() if balance else torch.zeros((), device=loss.device)
        if balance:
            loss = loss + self.config.aux_loss_alpha * balance_loss
            for m in moes:
                m.balance_loss = None
        out.update(loss=loss, lm_loss=lm_loss, mtp_losses=mtp_losses, balance_loss=balance_loss)
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                 absorb: bool = True, use_cache: bool = True) -> torch.Tensor:
        """Greedy decoding (B = 1 or equal-length prompts) -> the new tokens (B, <= max_new_tokens).
        With the cache: the prompt once, then one token at a time with the absorbed MLA; without it, the
        whole sequence again at every step (the slow reference the cache must equal)."""
        cache = MLACache() if use_cache else None
        ids, new = input_ids, []
        step_in = input_ids
        done = torch.zeros(input_ids.shape[0], 1, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            h = self.hidden(step_in if use_cache else ids, cache, absorb and use_cache)
            nxt = self.lm_head(h[:, -1]).argmax(-1, keepdim=True)
            if eos_token_id is not None:  # a row that has ended keeps emitting eos
                nxt = nxt.masked_fill(done, eos_token_id)
                done = done | (nxt == eos_token_id)
            new.append(nxt)
            ids = torch.cat([ids, nxt], dim=1)
            step_in = nxt
            if bool(done.all()):
                break
        return torch.cat(new, dim=1) if new else input_ids.new_zeros(input_ids.shape[0], 0)


@torch.no_grad()
def speculative_generate(model: DeepseekV3ForCausalLM, input_ids: torch.Tensor, max_new_tokens: int,
                         eos_token_id: int | None = None, absorb: bool = True) -> tuple[torch.Tensor, dict]:
    """Greedy decoding where the first MTP module drafts one token ahead and the main model verifies it in the
    same forward pass as the next token (V3 sec. 5.4.3; self-speculative: no second model). B = 1.

    Each step feeds [t, d] (the token just chosen and the draft after it) to the main model:
      the prediction at t is the true next token n; if n == d the draft is accepted and the prediction at d
      is a second token for free; otherwise d's cache entry is dropped. Either way the MTP module then
      drafts from the last accepted position. Output = plain greedy decoding (the test checks it), up to float
      rounding: the verify step runs two positions in one forward, so a near-tie could break the other way.
    -> (new tokens (1, <= max_new_tokens), {"drafted", "accepted", "forward_passes"})."""
    if not model.mtp:
        raise ValueError("speculative decoding needs an MTP module: num_nextn_predict_layers >= 1")
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one sequence; got a batch of {input_ids.shape[0]}")
    if max_new_tokens <= 0:
        return input_ids.new_zeros(1, 0), {"drafted": 0, "accepted": 0, "forward_passes": 0}
    L = model.config.num_hidden_layers
    main_layers = list(range(L))  # the MTP module's cache slot (L) only ever holds accepted positions
    cache = MLACache()
    h = model.hidden(input_ids, cache, absorb)  # (1, n, C)
    nxt = model.lm_head(h[:, -1:]).argmax(-1)  # (1, 1)
    # the MTP module's own cache over the prompt: position i pairs h_i with the embedding of token i+1
    g, _ = model.mtp_hidden(1, h, torch.cat([input_ids[:, 1:], nxt], 1), cache, absorb)
    draft = model.lm_head(g[:, -1:]).argmax(-1)
    out, stats = [nxt], {"drafted": 0, "accepted": 0, "forward_passes": 1}

    def done() -> bool:
        return len(out) >= max_new_tokens or (eos_token_id is not None and int(out[-1]) == eos_token_id)

    while not done():
        start = cache.length(0)
        h2 = model.hidden(torch.cat([nxt, draft], 1), cache, absorb)  # positions start, start + 1
        pred = model.lm_head(h2).argmax(-1)  # (1, 2): after nxt, after draft
        stats["forward_passes"] += 1
        stats["drafted"] += 1
        if int(pred[0, 0]) == int(draft):
            stats["accepted"] += 1
            out.append(draft)
            if not done():
                out.append(pred[:, 1:])
            nxt = pred[:, 1:]
            g, _ = model.mtp_hidden(1, h2, torch.cat([draft, nxt], 1), cache, absorb)
        else:
            cache.crop(start + 1, main_layers)  # forget the rejected draft
            nxt = pred[:, :1]
            out.append(nxt)
            g, _ = model.mtp_hidden(1, h2[:, :1], nxt, cache, absorb)
        draft = model.lm_head(g[:, -1:]).argmax(-1)
    new = torch.cat(out, 1)[:, :max_new_tokens]
    return new, stats
