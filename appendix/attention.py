"""Multi-head, multi-query, grouped-query and multi-head latent attention side by side, with the
parameters and KV-cache bytes per token each costs.

    python -m appendix.attention                 # the table (measured from real caches), and the checks

All four take x (B, T, C) and an optional cache and return (y, cache), so they swap in one model:

    MHA  H query heads, H key/value heads: the cache holds 2 H D numbers per token per layer
         (Vaswani et al. 2017)
    MQA  H query heads share 1 key/value head: 2 D per token (Shazeer 2019, arXiv:1911.02150)
    GQA  H query heads in G groups, one key/value head per group: 2 G D per token; G = H is MHA, G = 1
         is MQA (Ainslie et al. 2023, arXiv:2305.13245)
    MLA  keys and values are rebuilt from one small latent c_kv (d_c numbers) plus one shared RoPE key
         (d_r numbers): d_c + d_r per token, whatever H (DeepSeek-V2, arXiv:2405.04434 sec. 2.1)

MLA's trick at inference ("absorption", DeepSeek-V2 sec. 2.1.2): k_nope = W_UK c_kv, so
q_nope . k_nope = (W_UK^T q_nope) . c_kv - fold W_UK into the query and score against the cached latent
directly; likewise fold W_UV into the output. The keys and values of each head are never materialised.
Names follow transformers' ``LlamaAttention`` and ``DeepseekV3Attention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.cli import run_main

from .norms import RMSNorm
from .positions import apply_rope, rope_cos_sin


class GroupedQueryAttention(nn.Module):
    """GQA with ``n_kv_heads`` key/value heads; ``n_kv_heads == n_heads`` is MHA, ``1`` is MQA.
    The cache is (k, v), each (B, G, T, D): what a decoder keeps per layer."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, bias: bool = False, rope: bool = True):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim, self.rope = n_heads, n_kv_heads, dim // n_heads, rope
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        B, T, _ = x.shape
        past = 0 if cache is None else cache[0].shape[2]
        # 1) project: H query heads, G key/value heads                    (B, T, C) -> (B, H|G, T, D)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # 2) rotate by absolute position (past tokens already are), append to the cache
        if self.rope:
            cos, sin = rope_cos_sin(torch.arange(past, past + T), self.head_dim)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        cache = (k, v)
        # 3) each group of H/G query heads reads the same key/value head    (B, G, S, D) -> (B, H, S, D)
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # 4) causal attention (queries sit at the end of the cached sequence)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal(T, past))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), cache


def _causal(T: int, past: int) -> torch.Tensor:
    """(T, past + T) boolean mask: query t sees keys 0 .. past + t."""
    return torch.ones(T, past + T, dtype=torch.bool).tril(diagonal=past)


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 MLA. Per head a query/key has ``qk_nope_dim`` position-free channels (from the
    latent) and ``qk_rope_dim`` rotated channels (the key's are one shared head); values have ``v_dim``.

    ``absorb=False`` materialises k and v per head (training form); ``absorb=True`` folds W_UK into the
    query and W_UV into the output and attends over the latent (inference form). The cache is
    (c_kv (B, S, d_c), k_pe (B, S, d_r)) in both forms.
    """

    def __init__(self, dim: int, n_heads: int, kv_lora_rank: int, qk_nope_dim: int, qk_rope_dim: int, v_dim: int,
                 q_lora_rank: int = 0, absorb: bool = False):
        super().__init__()
        self.n_heads, self.kv_lora_rank, self.absorb = n_heads, kv_lora_rank, absorb
        self.qk_nope_dim, self.qk_rope_dim, self.v_dim = qk_nope_dim, qk_rope_dim, v_dim
        q_head = qk_nope_dim + qk_rope_dim
        if q_lora_rank:  # queries also go through a low-rank bottleneck (saves activations, not cache)
            self.q_a_proj = nn.Linear(dim, q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(q_lora_rank)
            self.q_b_proj = nn.Linear(q_lora_rank, n_heads * q_head, bias=False)
        else:
            self.q_proj = nn.Linear(dim, n_heads * q_head, bias=False)
        # down-projection to the latent, plus the shared RoPE key, in one matmul
        self.kv_a_proj_with_mqa = nn.Linear(dim, kv_lora_rank + qk_rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank)
        # up-projection: latent -> per-head k_nope (W_UK) and v (W_UV), stacked
        self.kv_b_proj = nn.Linear(kv_lora_rank, n_heads * (qk_nope_dim + v_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * v_dim, dim, bias=False)
        self.scale = q_head ** -0.5

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        B, T, _ = x.shape
        H, dn, dr, dv = self.n_heads, self.qk_nope_dim, self.qk_rope_dim, self.v_dim
        past = 0 if cache is None else cache[0].shape[1]
        cos, sin = rope_cos_sin(torch.arange(past, past + T), dr)
        # 1) queries                                                  (B, T, C) -> (B, H, T, dn + dr)
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
        q = q.view(B, T, H, dn + dr).transpose(1, 2)
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        # 2) the latent and the shared rotated key: all that is cached     (B, T, d_c), (B, T, dr)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, dr], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rope(k_pe[:, None], cos, sin)[:, 0]
        if cache is not None:
            c_kv, k_pe = torch.cat([cache[0], c_kv], dim=1), torch.cat([cache[1], k_pe], dim=1)
        cache = (c_kv, k_pe)
        mask = _causal(T, past)
        w = self.kv_b_proj.weight.view(H, dn + dv, self.kv_lora_rank)
        w_uk, w_uv = w[:, :dn], w[:, dn:]  # (H, dn, d_c), (H, dv, d_c)
        if not self.absorb:
            # 3a) naive: rebuild every head's keys and values from the latent     (B, H, S, dn), (B, H, S, dv)
            k_nope = torch.einsum("bsc,hdc->bhsd", c_kv, w_uk)
            v = torch.einsum("bsc,hdc->bhsd", c_kv, w_uv)
            k = torch.cat([k_nope, k_pe[:, None].expand(-1, H, -1, -1)], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            # 3b) absorbed: q_nope . (W_UK c) = (W_UK^T q_nope) . c; score against the latent itself
            q_lat = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # (B, H, T, d_c)
            scores = (torch.einsum("bhtc,bsc->bhts", q_lat, c_kv) +
                      torch.einsum("bhtr,bsr->bhts", q_pe, k_pe)) * self.scale
            p = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            o_lat = torch.einsum("bhts,bsc->bhtc", p, c_kv)  # attend over the latent: (B, H, T, d_c)
            y = torch.einsum("bhtc,hdc->bhtd", o_lat, w_uv)  # then apply W_UV once per head
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * dv)), cache


# ---------------------------------------------------------------------------------------------------
# the table: parameters and cache bytes per token, read off real modules and real caches
# ---------------------------------------------------------------------------------------------------

@dataclass
class AttentionConfig:
    """Build each variant at one size and count what it stores."""

    dim: int = 4096  # model width (LLaMA-2-7B's)
    n_heads: int = 32  # query heads
    gqa_groups: int = 8  # key/value heads of the GQA row (LLaMA-2-70B uses 8)
    kv_lora_rank: int = 512  # MLA latent size d_c (DeepSeek-V2: 4 x head size)
    qk_rope_dim: int = 64  # MLA shared RoPE key size d_r (DeepSeek-V2: head size / 2)
    q_lora_rank: int = 1536  # MLA query bottleneck (DeepSeek-V2)
    bytes_per_value: int = 2  # bf16 cache
    n_layer: int = 32  # to turn bytes per token per layer into a whole model's
    context: int = 4096  # ... and a whole context's


def variants(cfg: AttentionConfig, device: str | torch.device = "meta") -> dict[str, nn.Module]:
    D = cfg.dim // cfg.n_heads
    return {
        "MHA": GroupedQueryAttention(cfg.dim, cfg.n_heads, cfg.n_heads),
        f"GQA ({cfg.gqa_groups} groups)": GroupedQueryAttention(cfg.dim, cfg.n_heads, cfg.gqa_groups),
        "MQA": GroupedQueryAttention(cfg.dim, cfg.n_heads, 1),
        "MLA": MultiHeadLatentAttention(cfg.dim, cfg.n_heads, cfg.kv_lora_rank, D, cfg.qk_rope_dim, D,
                                        q_lora_rank=cfg.q_lora_rank, absorb=True),
    }


def cache_values_per_token(module: nn.Module, dim: int, T: int = 3) -> int:
    """Run the module on T tokens and count the numbers its cache holds, per token (batch 1)."""
    with torch.no_grad():
        _, cache = module(torch.randn(1, T, dim))
    return sum(t.numel() for t in cache) // T


def table(cfg: AttentionConfig) -> list[dict]:
    """Parameters from the full-size modules (built on the meta device: no memory), cache per token from
    a real forward of the same module built at 1/8 width (the per-token count scales exactly: checked)."""
    small = AttentionConfig(**{**vars(cfg), "dim": cfg.dim // 8, "n_heads": cfg.n_heads // 8 or 1,
                               "gqa_groups": max(cfg.gqa_groups // 8, 1)})
    rows = []
    with torch.device("meta"):
        full = variants(cfg)
    for (name, module), small_module in zip(full.items(), variants(small).values()):
        measured = cache_values_per_token(small_module, small.dim)
        if isinstance(module, MultiHeadLatentAttention):
            per_token = cfg.kv_lora_rank + cfg.qk_rope_dim  # independent of width and heads
            assert measured == small.kv_lora_rank + small.qk_rope_dim
        else:
            per_token = 2 * module.n_kv_heads * module.head_dim
            assert measured == 2 * small_module.n_kv_heads * small_module.head_dim
        b = per_token * cfg.bytes_per_value
        rows.append({"variant": name, "params": sum(p.numel() for p in module.parameters()),
                     "cache_values_per_token": per_token, "cache_bytes_per_token": b,
                     "cache_gib_context": b * cfg.n_layer * cfg.context / 2**30})
    return rows


def main(cfg: AttentionConfig) -> list[dict]:
    rows = table(cfg)
    mha = rows[0]["cache_values_per_token"]
    print(f"dim {cfg.dim}, {cfg.n_heads} heads of {cfg.dim // cfg.n_heads}; cache in {8 * cfg.bytes_per_value}-bit; "
          f"whole-model figure for {cfg.n_layer} layers x {cfg.context} tokens\n")
    print("| variant | attention params | cache values / token / layer | bytes / token / layer | vs MHA | "
          f"cache, {cfg.n_layer} layers x {cfg.context} tokens |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['params'] / 1e6:.1f} M | {r['cache_values_per_token']:,} | "
              f"{r['cache_bytes_per_token']:,} | {r['cache_values_per_token'] / mha:.1%} | "
              f"{r['cache_gib_context']:.2f} GiB |")
    # the checks the tests make, printed for the reader
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64)
    mla = MultiHeadLatentAttention(64, 4, 32, 16, 8, 16, q_lora_rank=24)
    naive = mla(x)[0]
    mla.absorb = True
    print(f"\nMLA absorbed vs naive, max |difference|: {(mla(x)[0] - naive).abs().max():.1e}")
    return rows


if __name__ == "__main__":
    run_main(main, AttentionConfig)
