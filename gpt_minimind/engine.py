"""Speed work for the GPT chapter, kept beside the readable reference in model.py.

model.py is what a reader studies; this file makes the same model train and decode faster, and every
piece here is tested equal to the reference path (tests/test_gpt_minimind_engine.py). The arrow runs one
way: this file imports model.py, model.py never imports this file, and ``MiniMindForCausalLM.forward``
knows nothing of what is here. The training script or the caller chooses:

- ``ChunkedLossCausalLM`` / ``linear_cross_entropy``: the output head and the loss in chunks, so that
  the (B, T, V) logits are never stored (train_pretrain.py with ``--loss-chunk-size``).
- ``generate``: the same tokens as ``MiniMindForCausalLM.generate``, with the weights packed for
  decoding (``packed_weights``) and, optionally, a torch.compile'd fixed-shape ``decode_step``
  (infer.py, eval.py and the RL rollouts use it).

How much each one gains on this machine: ``python -m gpt_minimind.bench`` (gpt_minimind/BENCHMARKS.md).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .model import (
    KVCache,
    MiniMindConfig,
    MiniMindForCausalLM,
    MiniMindMLP,
    apply_rotary,
    end_rows,
    room_to_generate,
    sample_next,
)

# ---------------------------------------------------------------------------------------------------
# 1) The output head and the loss, chunk by chunk
# ---------------------------------------------------------------------------------------------------

class LinearCrossEntropy(torch.autograd.Function):
    """mean cross_entropy(h @ W^T, labels) over the labels that are not -100, without the (N, V) logits
    (NaN when every label is -100, as F.cross_entropy gives).

    With a small model and a 6,400-token vocabulary the logits are the largest activation of a training
    step: at 2,048 positions, 52 MB in fp32, written by the head, read by log_softmax, written again as
    log-probabilities, and their gradient the same again. Here the positions go through in chunks: each
    chunk's logits (chunk x V, a few MB, in cache) become the loss and, in the same pass, their gradient
    softmax - one_hot, which goes straight into the gradients of h and W. Backward only scales what
    forward stored. The FLOPs are those of the plain head (forward and backward products); what goes is
    the traffic to memory and the stored logits (the trick of Liger Kernel's fused linear cross-entropy
    and of Apple's Cut Cross-Entropy, Wijmans et al. 2024, written here with plain torch ops)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        # h (N, C), weight (V, C), labels (N,)
        valid = labels != -100
        n_valid = valid.sum().clamp(min=1)  # (the gradients of an all-ignored batch are zeros)
        target = labels.clamp(min=0)  # any index for the ignored rows; their terms are zeroed below
        acc = torch.promote_types(weight.dtype, torch.float32)  # softmax and sums: fp32 at least
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        # the products' dtype: under autocast, h and W are cast once here (not in each chunk's three products)
        cast = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        h, w = h.to(cast), weight.to(cast)
        total = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, tc, vc = h[s:s + chunk], target[s:s + chunk], valid[s:s + chunk]
            logits = (hc @ w.t()).to(acc)  # (chunk, V)
            picked = logits.gather(1, tc[:, None]).squeeze(1)  # the target's logit
            m = logits.amax(-1, keepdim=True)
            p = logits.sub_(m).exp_()  # in place: exp(logit - max), the logits are not needed again
            z = p.sum(-1, keepdim=True)
            lse = (m + z.log()).squeeze(1)  # log sum exp(logits)
            total += ((lse - picked) * vc).sum()  # -log softmax(logits)[target]
            if grad_h is None and grad_w is None:
                continue
            # d loss_i / d logits_i = softmax(logits_i) - one_hot(target_i); ignored rows get 0
            p.div_(z).scatter_add_(1, tc[:, None], -torch.ones_like(picked)[:, None])
            p.mul_(vc[:, None])
            g = p.to(cast)
            if grad_h is not None:
                grad_h[s:s + chunk] = g @ w
            if grad_w is not None:
                if cast != grad_w.dtype:  # the product in bf16/fp16, summed over the chunks in fp32
                    grad_w += g.t() @ hc
                else:  # in place, no (V, C) temporary
                    grad_w.addmm_(g.t(), hc)
        # the loss is a mean over the valid labels: every gradient carries the same 1 / n_valid
        if grad_h is not None:
            grad_h.div_(n_valid)
        if grad_w is not None:
            grad_w = grad_w.div_(n_valid).to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return total / valid.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable  # the stored gradients are constants: no second order
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
                None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype), None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """The loss of ``LinearCrossEntropy`` for h (..., C) and labels (...). Under torch.no_grad (evaluation)
    only the loss is computed, chunk by chunk: no gradient is formed."""
    h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    bad = (labels < 0) & (labels != -100) | (labels >= weight.shape[0])
    if bool(bad.any()):  # gather would score them silently as some other token
        raise ValueError(f"labels must be token ids in [0, {weight.shape[0]}) or -100 (ignored); got "
                         f"{labels[bad][:5].tolist()}")
    if not torch.is_grad_enabled():  # (autograd.Function would still report needs_input_grad)
        h, weight = h.detach(), weight.detach()
    return LinearCrossEntropy.apply(h, weight, labels, chunk)




def is_plain_linear(lin: nn.Module) -> bool:
    """An nn.Linear with no bias and no hooks: its weight alone says what it computes. A LoRA wrapper, an
    adapter, BitFit's bias or a quantized layer is not, and keeps its own call."""
    return type(lin) is nn.Linear and lin.bias is None and not lin._forward_hooks and not lin._forward_pre_hooks


class ChunkedLossCausalLM(MiniMindForCausalLM):
    """MiniMindForCausalLM whose forward with labels runs the head inside the loss, ``loss_chunk_size``
    positions at a time (``LinearCrossEntropy``), and returns no logits then. Same parameters, same
    state_dict and same initialisation as the reference: a checkpoint of one loads into the other.
    Without labels (or with a wrapped head) it is the reference forward."""

    def __init__(self, cfg: MiniMindConfig, loss_chunk_size: int):
        if loss_chunk_size <= 0:
            raise ValueError(f"loss_chunk_size must be > 0, not {loss_chunk_size}")
        super().__init__(cfg)
        self.loss_chunk_size = loss_chunk_size

    def forward(self, input_ids, labels=None, cache=None, attention_mask=None, inputs_embeds=None,
                logits_to_keep: int = 0) -> dict:
        if labels is None or logits_to_keep or not is_plain_linear(self.lm_head):
            return super().forward(input_ids, labels, cache, attention_mask, inputs_embeds, logits_to_keep)
        h = self.model(input_ids, cache, attention_mask, inputs_embeds)
        lm_loss = linear_cross_entropy(h, self.lm_head.weight, labels, self.loss_chunk_size)
        return {"logits": None, **self.add_aux_loss(lm_loss)}


# ---------------------------------------------------------------------------------------------------
# 2) Decoding: packed weights, a fixed-shape decode step, generate
# ---------------------------------------------------------------------------------------------------

_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (weights' identity, packed copy)


def packed_weights(model: MiniMindForCausalLM) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor] | None:
    """A copy of the weights for decoding: per layer (q/k/v stacked, o, gate/up stacked, down), and the
    head, each as (in, out). None when a projection is not a plain linear layer (LoRA, an adapter, BitFit,
    a quantized base) or the FFN is a mixture of experts: those keep their own calls.

    Decoding one token at a time makes every product a matrix-vector product, bound by reading the
    weights from memory, and at batch 1 per-call overhead counts too. So the copy (1) stacks q/k/v into
    one matrix and gate/up into another (2 products instead of 5 per layer, as vLLM and gpt-fast store
    them) and (2) stores every matrix as (in, out), for x @ W instead of nn.Linear's x @ W^T: the same
    numbers, in the layout this CPU's BLAS reads faster for one row (``python -m gpt_minimind.bench``,
    table "one token's products").

    The copy is kept (outside the model's state_dict) and rebuilt when a weight has changed: every
    in-place update (an optimizer step, load_state_dict) raises the tensor's version counter, and a
    move or cast gives it new memory. So repeated generate calls and chat turns pack once, at the cost
    of the model's matrices once more in memory. (A write through ``weight.data`` bypasses the counter
    and would leave the copy stale: update weights in place under torch.no_grad, as optimizers do.)"""
    linears = [model.lm_head]
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        if type(m) is not MiniMindMLP:
            return None
        linears += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
    if not all(is_plain_linear(lin) for lin in linears):
        return None
    kept = _PACKED.get(model)
    if kept is not None and len(kept[0]) == len(linears) and all(
            w is lin.weight or (w.data_ptr() == lin.weight.data_ptr() and w.dtype == lin.weight.dtype
                                and w.device == lin.weight.device)
            and version == lin.weight._version for (w, version), lin in zip(kept[0], linears)):
        return kept[1]
    # the key holds the weights themselves (detached: the same storage), so that their memory cannot be
    # freed and reused by another tensor at the same address while this copy is kept
    key = [(lin.weight.detach(), lin.weight._version) for lin in linears]

    def packed(*lins: nn.Linear) -> torch.Tensor:  # (in, sum of outs), contiguous
        return torch.cat([lin.weight.detach() for lin in lins]).t().contiguous()

    layers = [(packed(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
               packed(layer.self_attn.o_proj), packed(layer.mlp.gate_proj, layer.mlp.up_proj),
               packed(layer.mlp.down_proj)) for layer in model.model.layers]
    _PACKED[model] = (key, (layers, packed(model.lm_head)))
    return _PACKED[model][1]


class StaticKVCache(KVCache):
    """A KV cache that, once ``static`` is set, takes one token at a time at ``position`` (a tensor) and
    returns every one of its max_len slots: each decode step then has the same shapes, and one compiled
    graph serves them all. Before that (the prompt) it fills like the plain cache."""

    def __init__(self, cfg: MiniMindConfig, batch: int, max_len: int, device, dtype):
        super().__init__(cfg, batch, max_len, device, dtype)
        self.static = False
        self.position = torch.zeros(1, dtype=torch.long, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.static:
            return super().update(layer, k, v)
        self.k[layer].index_copy_(2, self.position, k)  # the slots after `position` are masked by decode_step
        self.v[layer].index_copy_(2, self.position, v)
        return self.k[layer], self.v[layer]


def _layer(layer, x, cos, sin, cache, key_padding, w):
    """One decoder layer as MiniMindDecoderLayer.forward computes it in eval mode, with the packed weights
    ``w`` = (qkv, o, gate_up, down) when given, else through the layer's own modules (so that a LoRA
    wrapper, BitFit's bias or an adapter keeps its call). Either way q and k are rotated in one call."""
    attn, cfg = layer.self_attn, layer.self_attn.cfg
    B, T, _ = x.shape
    H, H_kv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    h = layer.input_layernorm(x)
    qkv = h @ w[0] if w is not None else torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], dim=-1)
    qkv = qkv.view(B, T, H + 2 * H_kv, D).transpose(1, 2)  # (B, H + 2 H_kv, T, D)
    qk = apply_rotary(qkv[:, :H + H_kv], cos, sin)  # q and k side by side: one rotation instead of two
    y = attn.attend(qk[:, :H], qk[:, H:], qkv[:, H + H_kv:], cache, key_padding)
    x = x + (y @ w[1] if w is not None else attn.o_proj(y))
    h = layer.post_attention_layernorm(x)
    if w is None:  # the module: SwiGLU, a mixture of experts, or a wrapped down_proj
        return x + layer.mlp(h)
    gate, up = (h @ w[2]).chunk(2, dim=-1)  # one product for gate and up
    return x + (F.silu(gate) * up) @ w[3]


def _logits(model, h, packed) -> torch.Tensor:
    """Logits (B, V) of the last position of hidden states h (B, T, C)."""
    h = model.model.norm(h[:, -1])
    return model.lm_head(h) if packed is None else h @ packed[1]


def forward_cached(model: MiniMindForCausalLM, tokens: torch.Tensor, cache: KVCache, packed=None) -> torch.Tensor:
    """Logits (B, V) after ``tokens`` (B, T), appended to ``cache`` (MiniMindModel.forward's path)."""
    m = model.model
    x = m.embed_tokens(tokens)
    cos, sin = m.rotary_emb(cache.length, tokens.shape[1])
    for i, layer in enumerate(m.layers):
        x = _layer(layer, x, cos, sin, cache, None, None if packed is None else packed[0][i])
    cache.length += tokens.shape[1]
    return _logits(model, x, packed)


def decode_step(model: MiniMindForCausalLM, token: torch.Tensor, cache: StaticKVCache, packed=None) -> torch.Tensor:
    """Logits (B, V) of one new token (B, 1) at position ``cache.position``, with fixed shapes.

    The reference cached forward slices the cache up to a Python-int length, so every step has new
    shapes. Here the position is a tensor: keys/values are written with index_copy_ and attention runs
    over all max_len slots, the unwritten ones masked. torch.compile then builds one graph for every
    step and removes most of the per-operator overhead that dominates small-batch decoding
    (the approach of pytorch-labs/gpt-fast)."""
    m = model.model
    cos, sin = m.rotary_emb.cos[cache.position], m.rotary_emb.sin[cache.position]  # (1, D)
    unwritten = torch.arange(cache.k[0].shape[2], device=token.device) > cache.position  # (max_len,)
    x = m.embed_tokens(token)
    for i, layer in enumerate(m.layers):
        x = _layer(layer, x, cos, sin, cache, unwritten.expand(token.shape[0], -1),
                   None if packed is None else packed[0][i])
    return _logits(model, x, packed)


# model -> torch.compile(decode_step). (dynamo keeps its graphs per code object and guards on the inputs: a
# new model, batch size or cache length compiles again, and past torch._dynamo.config.recompile_limit it
# falls back to eager; the cache length is rounded up to 256 below so that prompts share a graph)
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def generate(model: MiniMindForCausalLM, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, eos_token_id: int | None = None,
             generator: torch.Generator | None = None, compile: bool = False, pack_weights: bool = True):
    """``MiniMindForCausalLM.generate`` with the cache (the same keyword arguments, the same tokens up to
    float rounding: x @ W sums in another order than nn.Linear), faster.

    ``pack_weights``: decode with ``packed_weights`` (falls back to the modules where they cannot be
    packed). ``compile``: the prompt runs through the cached forward, every later token through a
    torch.compile'd ``decode_step`` (the first call compiles it: seconds; worth it for long outputs)."""
    model.eval()
    B, T = input_ids.shape
    limit = T + room_to_generate(model.config, T)
    max_new_tokens = min(max_new_tokens, limit - T)
    cache_len = T + max_new_tokens
    if compile:  # round up, so that prompts of other lengths reuse the compiled graph
        cache_len = min(-(-cache_len // 256) * 256, limit)
    p = model.lm_head.weight
    cache = StaticKVCache(model.config, B, cache_len, p.device, p.dtype)
    packed = packed_weights(model) if pack_weights else None
    if compile and model not in _COMPILED:
        _COMPILED[model] = torch.compile(decode_step, dynamic=False)
    seq, step_input = input_ids, input_ids
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        if compile and i > 0:  # one token at position T + i - 1, fixed shapes (and strides: a fresh tensor)
            cache.static = True
            cache.position.fill_(T + i - 1)
            logits = _COMPILED[model](model, step_input, cache, packed)
        else:
            logits = forward_cached(model, step_input, cache, packed)
        nxt = end_rows(sample_next(logits.float(), seq, temperature, top_k, top_p, repetition_penalty, generator),
                       done, eos_token_id)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        step_input = nxt[:, None]
        yield nxt
        if eos_token_id is not None and bool(done.all()):
            return
