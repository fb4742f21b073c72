"""A small modern decoder-only LLM (the Llama recipe, as minimind uses it), written from scratch.

    tokens -> embed_tokens -> N x [ x + Attn(RMSNorm(x)) ; x + FFN(RMSNorm(x)) ] -> RMSNorm -> lm_head

- RMSNorm instead of LayerNorm (Zhang & Sennrich 2019): no mean, no bias.
- RoPE (Su et al. 2021): queries and keys are rotated by an angle proportional to their position, so
  q_m . k_n depends only on m - n. Length extension: linear interpolation, NTK-aware base scaling, YaRN.
- Grouped-query attention (Ainslie et al. 2023): H query heads share H_kv key/value heads, which cuts
  the KV cache by H / H_kv.
- SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)).
- Optional mixture-of-experts FFN in the Qwen2-MoE layout: a softmax router picks the top-k of E
  experts per token, an optional always-on shared expert, and the Switch Transformer load-balancing loss.
- A KV cache for generation.

This file is the readable reference: one path through ``forward``, a plain KV cache, a naive
``generate``. The speed work (weights packed for decoding, a compiled fixed-shape decode step, the
output head and the loss in chunks) is in engine.py, which imports this file and is tested equal to it.

Module and parameter names are Hugging Face Llama's (``model.layers.0.self_attn.q_proj.weight`` ...),
so export to ``LlamaForCausalLM`` is an identity map of the state dict (export_hf.py).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class MiniMindConfig:
    """Architecture. Field names are transformers' LlamaConfig / Qwen2MoeConfig names."""

    vocab_size: int = 6400  # minimind's tokenizer size (small vocab, small embedding); 0 in train_*: the tokenizer's
    hidden_size: int = 256  # C, the residual stream width
    intermediate_size: int = 0  # SwiGLU hidden width; 0 = 8/3 * C rounded up to 64 (same params as a 4C GELU FFN)
    num_hidden_layers: int = 4  # decoder blocks
    num_attention_heads: int = 8  # H query heads
    num_key_value_heads: int = 2  # H_kv key/value heads (GQA); = H is MHA, = 1 is MQA
    max_position_embeddings: int = 512  # longest sequence the RoPE tables are built for
    rope_theta: float = 1e6  # RoPE base; large bases rotate slowly and suit long contexts (Qwen, minimind)
    rope_scaling: str = "none"  # none, linear, ntk or yarn: stretch RoPE past the trained length
    rope_factor: float = 1.0  # how many times longer than original_max_position_embeddings
    original_max_position_embeddings: int = 0  # the trained length, for rope scaling (0 = max_position_embeddings)
    rms_norm_eps: float = 1e-5  # added inside the RMS for stability
    tie_word_embeddings: bool = True  # lm_head shares embed_tokens' weight: saves V*C parameters
    dropout: float = 0.0  # on attention weights and residual branches; 0 for short pretraining
    use_moe: bool = False  # replace every FFN by a mixture of experts
    num_experts: int = 4  # E routed experts per MoE layer
    num_experts_per_tok: int = 2  # k experts each token is sent to
    moe_intermediate_size: int = 0  # hidden width of one expert (0 = intermediate_size)
    shared_expert_intermediate_size: int = 0  # width of the always-on shared expert (0 = none)
    norm_topk_prob: bool = True  # renormalise the k chosen router probabilities to sum to 1 (never with k = 1:
    # the one weight would always be 1 and the router would get no gradient from the LM loss)
    router_aux_loss_coef: float = 0.01  # weight of the load-balancing loss added to the LM loss
    attn_impl: str = "sdpa"  # sdpa (PyTorch's fused kernel) or math (softmax written out: for reading; which is
    # faster in bf16 on a CPU: python -m gpt_minimind.bench)
    gradient_checkpointing: bool = False  # recompute each block in backward: less memory, more compute
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self):
        # fields left at 0 are derived from others; _derived remembers which (common.config then shows and
        # rebuilds them as 0, so that --hidden-size 512 also changes the derived intermediate_size)
        self._derived = {f for f in ("intermediate_size", "moe_intermediate_size", "original_max_position_embeddings")
                         if getattr(self, f) == 0}
        if self.intermediate_size == 0:
            self.intermediate_size = 64 * math.ceil(self.hidden_size * 8 / 3 / 64)
        if self.moe_intermediate_size == 0:
            self.moe_intermediate_size = self.intermediate_size
        if self.original_max_position_embeddings == 0:
            self.original_max_position_embeddings = self.max_position_embeddings
        if self.use_moe and self.num_experts_per_tok == 1 and self.norm_topk_prob:
            warnings.warn("top-1 routing with norm_topk_prob=True: the chosen expert's weight is always 1, so the "
                          "router learns only from the load-balancing loss; use norm_topk_prob=False (Switch "
                          "Transformer) or k >= 2", stacklevel=2)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.rope_scaling not in ("none", "linear", "ntk", "yarn"):
            raise ValueError(f"rope_scaling must be none, linear, ntk or yarn, not {self.rope_scaling!r}")
        if self.attn_impl not in ("sdpa", "math"):
            raise ValueError(f"attn_impl must be sdpa or math, not {self.attn_impl!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MiniMindConfig:
        """From a saved config.json: keys in ``RETIRED`` (earlier releases) are dropped, others must be fields."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known - cls.RETIRED
        if unknown:
            raise ValueError(f"unknown MiniMindConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    # loss_chunk_size: a training option since the chunked loss moved to engine.py (saved by older runs)
    RETIRED: ClassVar[frozenset[str]] = frozenset({"loss_chunk_size"})


# Named sizes (train_pretrain.py's presets build on them). cpu: the best of the equal-budget sweep on a 2-core
# CPU (python -m gpt_minimind.sweep; README, "Which model for ten minutes"). gpu4gb: minimind-small (~26 M
# params with the 6400 vocabulary), meant for a 4 GB card with bf16 + gradient checkpointing (predicted by
# python -m gpt_minimind.bench --memory; not yet run on one). full: ~100 M, minimind's larger size.
MODEL_PRESETS = {
    "cpu": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "gpu4gb": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                   intermediate_size=1408, gradient_checkpointing=True),
    "full": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=2048, gradient_checkpointing=True),
}


class RMSNorm(nn.Module):
    r"""y = x / sqrt(mean(x^2) + eps) * weight  (no centring, no bias). Computed in float32.

    $$y = \frac{x}{\sqrt{\frac{1}{C}\sum_{c=1}^{C} x_c^2 + \epsilon}} \odot w$$"""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # half precision: square and average in float32, then cast back (fp32: no copies)
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------------------

def rope_inv_freq(cfg: MiniMindConfig) -> tuple[torch.Tensor, float]:
    r"""Per-pair rotation speeds theta_i = base^(-2i/D), i < D/2, and a scale for cos/sin.

    Length extension by ``rope_factor`` s beyond the trained length L:
    - linear (position interpolation, Chen et al. 2023): every speed / s, so position s*L looks like L;
    - ntk (NTK-aware, bloc97 2023): base * s^(D/(D-2)): slow pairs are interpolated, fast ones kept;
    - yarn (Peng et al. 2023, sec. 3.2): fast pairs (many turns within L) kept, slow pairs interpolated,
      a linear ramp between; cos/sin scaled by 0.1 ln(s) + 1 to keep attention entropy (as transformers).

    $$\theta_i = b^{-2i/D}, \quad i = 0, 1, \ldots, D/2 - 1$$"""
    d, base, s = cfg.head_dim, cfg.rope_theta, cfg.rope_factor
    exponents = torch.arange(0, d, 2, dtype=torch.float32) / d
    if cfg.rope_scaling == "ntk":
        base = base * s ** (d / (d - 2))
    inv_freq = 1.0 / base ** exponents
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / s
    if cfg.rope_scaling == "yarn" and s > 1:
        L = cfg.original_max_position_embeddings

        def dim_for_turns(turns: float) -> float:  # the pair index that turns `turns` times over L
            return d * math.log(L / (turns * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(dim_for_turns(32)), 0)  # beta_fast = 32 turns: keep these pairs as they are
        high = min(math.ceil(dim_for_turns(1)), d - 1)  # beta_slow = 1 turn: interpolate these fully
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        inv_freq = inv_freq / s * ramp + inv_freq * (1 - ramp)
        return inv_freq, 0.1 * math.log(s) + 1.0
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    """cos and sin tables, (T, D), for positions 0 .. max_position_embeddings * rope_factor."""

    def __init__(self, cfg: MiniMindConfig):
        super().__init__()
        inv_freq, scale = rope_inv_freq(cfg)
        n = int(cfg.max_position_embeddings * max(cfg.rope_factor, 1.0))
        angles = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)  # (T, D/2): position * speed
        angles = torch.cat([angles, angles], dim=-1)  # (T, D): Llama pairs dim i with dim i + D/2
        self.register_buffer("cos", angles.cos() * scale, persistent=False)
        self.register_buffer("sin", angles.sin() * scale, persistent=False)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + length > self.cos.shape[0]:
            raise ValueError(f"position {start + length} is past the RoPE table ({self.cos.shape[0]}); raise "
                             "max_position_embeddings or use rope_scaling with a rope_factor")
        return self.cos[start:start + length], self.sin[start:start + length]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: a 90-degree turn of each pair (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    r"""Rotate each pair of x (B, H, T, D) by its position's angle: x cos + rotate_half(x) sin.

    $$x'_m = x_m \cos(m\theta) + \mathrm{rot}(x_m) \sin(m\theta)$$
    for position $m$: then $\langle q'_m, k'_n \rangle$ depends on $m - n$ only."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Attention with a KV cache
# ---------------------------------------------------------------------------------------------------

class KVCache:
    """Keys and values of every layer, preallocated to ``max_len`` positions: (B, H_kv, max_len, D).

    Generation writes one new position per step instead of re-running the whole prefix, which turns
    O(T^2) work per token into O(T)."""

    def __init__(self, cfg: MiniMindConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.length = 0  # positions filled so far (advanced by the model after all layers ran)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions of ``layer`` and return all keys/values up to them."""
        end = self.length + k.shape[2]
        if end > self.k[layer].shape[2]:
            raise ValueError(f"KV cache holds {self.k[layer].shape[2]} positions; asked for {end}")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# torch >= 2.5: scaled_dot_product_attention broadcasts H_kv key/value heads over H query heads itself
_SDPA_GQA = {"enable_gqa": True} if "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "") else {}


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * n_rep, T, D): each key/value head serves n_rep query heads."""
    if n_rep == 1:
        return x
    B, H_kv, T, D = x.shape
    return x[:, :, None].expand(B, H_kv, n_rep, T, D).reshape(B, H_kv * n_rep, T, D)


def attention_math(q, k, v, mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    r"""softmax(q k^T / sqrt(D) + mask) v, written out. q (B, H, Tq, D), k/v (B, H, Tk, D);
    mask is additive (0 or -inf), broadcastable to (B, H, Tq, Tk).

    q is scaled before the product (Tq x D numbers instead of the Tq x Tk scores). The softmax takes the
    scores in their own dtype: for bf16/fp16 its kernel still sums in fp32 and rounds once, the same
    numbers as ``.float()`` and back without two copies of the layer's largest tensor.

    $$\mathrm{Attention}(q, k, v) = \mathrm{softmax}\left(\frac{q k^\top}{\sqrt{D}} + M\right) v$$"""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask
    weights = F.softmax(scores, dim=-1)
    return F.dropout(weights, dropout, training=dropout > 0) @ v


def causal_mask(q_len: int, k_len: int, device, key_padding: torch.Tensor | None = None,
                dtype=torch.float32) -> torch.Tensor:
    """Additive mask (B or 1, 1, Tq, Tk): query i (at absolute position k_len - q_len + i) sees keys <= it;
    ``key_padding`` (B, Tk) True where a key is padding, which no query may see."""
    offset = k_len - q_len
    future = torch.ones(q_len, k_len, dtype=torch.bool, device=device).triu(offset + 1)
    blocked = future[None, None]
    if key_padding is not None:
        blocked = blocked | key_padding[:, None, None, :]
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, float("-inf"))


class MiniMindAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE (Llama's LlamaAttention)."""

    def __init__(self, cfg: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        H, H_kv, D, C = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(C, H * D, bias=False)
        self.k_proj = nn.Linear(C, H_kv * D, bias=False)
        self.v_proj = nn.Linear(C, H_kv * D, bias=False)
        self.o_proj = nn.Linear(H * D, C, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C): softmax(q k^T / sqrt(D) + causal mask) v per head, then o_proj.
        ``key_padding`` (B, Tk) True where a key is padding (see causal_mask)."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, H_kv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # 1) project to queries (B, H, T, D) and keys/values (B, H_kv, T, D)
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
        k = self.k_proj(x).view(B, T, H_kv, D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H_kv, D).transpose(1, 2)
        # 2) rotate q and k by their absolute positions (RoPE); v is not rotated
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(self.attend(q, k, v, cache, key_padding))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None = None,
               key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """Steps 3-5 of forward: rotated q (B, H, T, D), k and v (B, H_kv, T, D) -> heads merged (B, T, H * D),
        before o_proj (engine.py reuses it)."""
        cfg = self.cfg
        B, H, T, D = q.shape
        H_kv = k.shape[1]
        # 3) with a cache: append this step's k/v, attend over everything so far
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        # 4) attend causally. One new token attending to a cache needs no mask; a padded batch or a
        #    multi-token chunk after a cache needs an explicit one.
        Tk = k.shape[2]
        dropout = cfg.dropout if self.training else 0.0
        mask = None
        if key_padding is not None or (T > 1 and Tk != T):
            mask = causal_mask(T, Tk, q.device, key_padding, q.dtype)
        if cfg.attn_impl == "math" or not _SDPA_GQA:
            k, v = repeat_kv(k, H // H_kv), repeat_kv(v, H // H_kv)  # (B, H, Tk, D): each k/v head serves H/H_kv
        if cfg.attn_impl == "math":
            if mask is None and T > 1:
                mask = causal_mask(T, Tk, q.device, dtype=q.dtype)
            y = attention_math(q, k, v, mask, dropout)
        else:  # the fused kernel; it shares each k/v head across its query heads itself (enable_gqa)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                               is_causal=mask is None and T > 1, **_SDPA_GQA)
        # 5) merge heads: (B, H, T, D) -> (B, T, H * D)
        return y.transpose(1, 2).reshape(B, T, H * D)


# ---------------------------------------------------------------------------------------------------
# Feed-forward: SwiGLU, and a mixture of SwiGLU experts
# ---------------------------------------------------------------------------------------------------

class MiniMindMLP(nn.Module):
    r"""SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants Improve Transformer").

    $$\mathrm{FFN}(x) = W_{down}\left(\mathrm{SiLU}(W_{gate} x) \odot W_{up} x\right),
    \quad \mathrm{SiLU}(z) = z \sigma(z)$$"""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def load_balancing_loss(router_probs: torch.Tensor, top_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4-6): E * sum_e f_e * P_e, where f_e is
    the number of tokens sent to expert e over the number of tokens (the f_e sum to k: each token goes to
    k experts) and P_e the mean router probability of e. It is smallest (= k) when both are uniform; it
    pushes the router to spread tokens over experts."""
    f = torch.zeros(n_experts, device=router_probs.device).index_add_(
        0, top_idx.reshape(-1), torch.ones(top_idx.numel(), device=router_probs.device)) / router_probs.shape[0]
    return n_experts * (f * router_probs.float().mean(0)).sum()


class MiniMindMoE(nn.Module):
    """Mixture of SwiGLU experts (the Qwen2-MoE layout, as in minimind's MOEFeedForward).

    router p = softmax(gate(x)) over E experts; each token goes to its top-k experts, whose outputs are
    summed weighted by p (renormalised over the k if norm_topk_prob); an optional shared expert sees
    every token, weighted by sigmoid(shared_expert_gate(x)). Compute per token ~ k experts, capacity E."""

    def __init__(self, cfg: MiniMindConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MiniMindMLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.num_experts))
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MiniMindMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.aux_loss = torch.zeros(())  # set by forward; summed over layers by the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C), N = B*T tokens
        # 1) route: probabilities over experts, keep the k largest per token      (N, E) -> (N, k)
        probs = F.softmax(self.gate(flat).float(), dim=-1)
        top_p, top_idx = probs.topk(cfg.num_experts_per_tok, dim=-1)
        if cfg.norm_topk_prob:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        # 2) each expert runs on the tokens routed to it; outputs are scattered back weighted by p
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(top_idx == e)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * top_p[token, slot, None].to(flat.dtype))
        # 3) the shared expert sees every token
        if cfg.shared_expert_intermediate_size:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        self.aux_loss = load_balancing_loss(probs, top_idx, cfg.num_experts) if self.training else probs.new_zeros(())
        return out.view(B, T, C)


# ---------------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------------

class MiniMindDecoderLayer(nn.Module):
    """Pre-norm block: x + Attn(RMSNorm(x)), then x + FFN(RMSNorm(x))."""

    def __init__(self, cfg: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MiniMindAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MiniMindMoE(cfg) if cfg.use_moe else MiniMindMLP(cfg.hidden_size, cfg.intermediate_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, key_padding=None):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache, key_padding))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class MiniMindModel(nn.Module):
    """Embeddings, the decoder stack and the final norm (Llama's LlamaModel)."""

    def __init__(self, cfg: MiniMindConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MiniMindDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)
        self.gradient_checkpointing = cfg.gradient_checkpointing

    def forward(self, input_ids: torch.Tensor | None, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``inputs_embeds`` (B, T, C) replaces the embedding look-up (prompt tuning feeds learned vectors)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        start = cache.length if cache is not None else 0
        cos, sin = self.rotary_emb(start, x.shape[1])
        key_padding = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_padding = attention_mask == 0  # (B, T) True at padding
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:  # (a cache is written in forward)
                x = checkpoint(layer, x, cos, sin, None, key_padding, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, key_padding)
        if cache is not None:
            cache.length += x.shape[1]
        return self.norm(x)


class MiniMindForCausalLM(nn.Module):
    """The language model: hidden states -> lm_head -> logits over the vocabulary."""

    def __init__(self, cfg: MiniMindConfig):
        super().__init__()
        self.config = cfg
        self.model = MiniMindModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection gets std 0.02 / sqrt(2 * layers),
        # so the residual stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.num_hidden_layers))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def forward(self, input_ids: torch.Tensor | None, labels: torch.Tensor | None = None, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> dict:
        """input_ids (B, T) -> {"logits": (B, T, V), and with labels "loss", "lm_loss" (and "aux_loss")}.

        ``labels`` are already aligned with the inputs: labels[:, t] is the token that follows
        input_ids[:, t] (the dataset builds inputs = ids[:-1], labels = ids[1:]); -100 is ignored.
        ``logits_to_keep`` N > 0: only the last N positions go through lm_head, (B, N, V); generation needs
        the last one only, and the head is the largest matrix of a small model (transformers' argument)."""
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep and labels exclude each other: the loss needs every position")
        # 1) the decoder: (B, T) -> hidden states (B, T, C)
        h = self.model(input_ids, cache, attention_mask, inputs_embeds)
        # 2) the head: (B, T, C) -> logits (B, T, V)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        out = {"logits": logits}
        if labels is not None:
            # 3) loss = mean over labelled positions of -log softmax(logits)[label], in fp32
            lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            out.update(self.add_aux_loss(lm_loss))
        return out

    def add_aux_loss(self, lm_loss: torch.Tensor) -> dict:
        """{"lm_loss", "loss"} (+ "aux_loss"): while training a mixture of experts, the loss adds
        router_aux_loss_coef times the layers' mean load-balancing loss."""
        out = {"lm_loss": lm_loss, "loss": lm_loss}
        if self.config.use_moe and self.training:
            out["aux_loss"] = sum(layer.mlp.aux_loss for layer in self.model.layers) / len(self.model.layers)
            out["loss"] = lm_loss + self.config.router_aux_loss_coef * out["aux_loss"]
        return out

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for ``max_len`` positions, on the model's device and in its dtype."""
        p = self.lm_head.weight
        return KVCache(self.config, batch, max_len, p.device, p.dtype)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, eos_token_id: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None):
        """Yield one new token per step, (B,) each, from prompts ``input_ids`` (B, T) of equal length.

        temperature 0 is greedy. Sampling: logits / temperature, then keep the top_k tokens and the
        smallest set whose probability reaches top_p (nucleus). repetition_penalty > 1 makes tokens that
        already appear less likely (CTRL, Keskar et al. 2019). Stops when every row has produced EOS.
        Without the cache each step re-runs the whole sequence: same tokens, O(T) times the work.
        (engine.generate yields the same tokens faster: packed weights, an optional compiled step.)"""
        self.eval()
        B, T = input_ids.shape
        max_new_tokens = min(max_new_tokens, room_to_generate(self.config, T))
        cache = self.new_cache(B, T + max_new_tokens) if use_cache else None
        seq, step_input = input_ids, input_ids  # with the cache, each step feeds only the newest token
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self(step_input if use_cache else seq, cache=cache, logits_to_keep=1)["logits"][:, -1].float()
            nxt = end_rows(sample_next(logits, seq, temperature, top_k, top_p, repetition_penalty, generator),
                           done, eos_token_id)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            yield nxt
            if eos_token_id is not None and bool(done.all()):
                return


class MiniMindForSequenceClassification(nn.Module):
    """The decoder with a scalar head instead of the vocabulary head: the reward model of RLHF and the
    value model of PPO (Ouyang et al. 2022, InstructGPT, sec. 3.5; Stiennon et al. 2020).

    ``score`` maps every position's hidden state to one number. A reward model reads it at the last
    non-padding token, after the whole prompt and answer; a value model reads it at every position, as
    the expected return from there. The names and the pooling rule are transformers'
    ``LlamaForSequenceClassification`` with ``num_labels=1`` (``model.*`` + ``score.weight``, no bias;
    the last position whose token is not ``pad_token_id``), so the export is an identity map."""

    def __init__(self, cfg: MiniMindConfig):
        super().__init__()
        self.config = cfg
        self.model = MiniMindModel(cfg)
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.apply(MiniMindForCausalLM._init_weights)

    @classmethod
    def from_causal_lm(cls, lm: MiniMindForCausalLM) -> MiniMindForSequenceClassification:
        """The language model's body (a copy) under a new, zero-initialised head: every score starts at 0."""
        out = cls(lm.config).to(lm.lm_head.weight.device)
        out.model.load_state_dict(lm.model.state_dict())
        nn.init.zeros_(out.score.weight)
        return out

    def forward(self, input_ids: torch.Tensor) -> dict:
        """input_ids (B, T), right-padded with pad_token_id -> {"values": (B, T) the head at every position,
        "scores": (B,) the head at each row's last non-padding token, "hidden": (B, T, C) what the head reads}."""
        hidden = self.model(input_ids)
        values = self.score(hidden).squeeze(-1).float()  # (B, T)
        return {"values": values, "scores": values.gather(1, last_token_index(input_ids, self.config.pad_token_id))
                .squeeze(1), "hidden": hidden}


def last_token_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """(B, 1) index of the rightmost token that is not padding (transformers' rule; 0 for an all-pad row)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1, keepdim=True)


def end_rows(nxt: torch.Tensor, done: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Rows that have produced EOS keep emitting it (B,); ``done`` (B,) is updated in place."""
    if eos_token_id is None:
        return nxt
    nxt = nxt.masked_fill(done, eos_token_id)
    done |= nxt == eos_token_id
    return nxt


def room_to_generate(cfg: MiniMindConfig, prompt_len: int) -> int:
    """How many tokens fit after a prompt of ``prompt_len`` in the context the RoPE table covers."""
    limit = int(cfg.max_position_embeddings * max(cfg.rope_factor, 1.0))
    if prompt_len >= limit:
        raise ValueError(f"the prompt has {prompt_len} tokens and the model's context holds {limit}: "
                         "shorten the prompt (or raise max_position_embeddings / use rope_scaling)")
    return limit - prompt_len


def sample_next(logits: torch.Tensor, seq: torch.Tensor, temperature: float, top_k: int, top_p: float,
                repetition_penalty: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token (B,) from logits (B, V) given the sequence so far (B, T)."""
    if repetition_penalty != 1.0:  # positive logits are divided, negative multiplied (as transformers)
        seen = logits.gather(1, seq)
        logits = logits.scatter(1, seq, torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty))
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # tokens after the nucleus is already full
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
