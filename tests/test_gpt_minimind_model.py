"""gpt_minimind/model.py against transformers' Llama and Qwen2-MoE, plus RoPE, GQA, cache and sampling properties."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, Qwen2MoeForCausalLM
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

from gpt_minimind.export_hf import hf_config, to_hf_state_dict
from gpt_minimind.model import (
    MiniMindConfig,
    MiniMindForCausalLM,
    RotaryEmbedding,
    apply_rotary,
    attention_math,
    causal_mask,
    load_balancing_loss,
    sample_next,
)

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, rope_theta=10000.0)


def tiny(**kw) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**{**TINY, **kw})).eval()
    for p in model.parameters():  # norms start at 1; randomise them too so a swapped norm would show
        if p.dim() == 1:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    return model


def to_hf(model: MiniMindForCausalLM, attn: str = "eager"):
    cfg = hf_config(model.config)
    cls = Qwen2MoeForCausalLM if model.config.use_moe else LlamaForCausalLM
    hf = cls(cfg)
    hf.load_state_dict(to_hf_state_dict(model), strict=True)
    hf.config._attn_implementation = attn
    return hf.eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("impl", ["sdpa", "math"])
@pytest.mark.parametrize("tie", [True, False])
def test_logits_equal_transformers_llama(attn, impl, tie):
    model = tiny(attn_impl=impl, tie_word_embeddings=tie)
    hf = to_hf(model, attn)
    ids = torch.randint(0, 97, (3, 17))
    ours = model(ids)["logits"]
    torch.testing.assert_close(ours, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_loss_equals_transformers_with_shifted_labels():
    model = tiny()
    hf = to_hf(model)
    ids = torch.randint(0, 97, (2, 12))
    labels = ids.clone()
    labels[0, :4] = -100  # ignored positions
    # ours is fed inputs ids[:, :-1] and labels ids[:, 1:]; transformers takes the full row and shifts inside
    ours = model(ids[:, :-1], labels=labels[:, 1:])["loss"]
    torch.testing.assert_close(ours, hf(ids, labels=labels).loss)


@pytest.mark.parametrize("scaling", ["linear", "yarn"])
def test_rope_scaling_equals_transformers(scaling):
    model = tiny(rope_scaling=scaling, rope_factor=4.0, max_position_embeddings=16)
    hf = to_hf(model)
    ids = torch.randint(0, 97, (1, 50))  # past the trained 16 positions
    torch.testing.assert_close(model(ids)["logits"], hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_ntk_scaling_keeps_fast_pairs_and_slows_the_slowest():
    base = RotaryEmbedding(MiniMindConfig(**TINY))
    ntk = RotaryEmbedding(MiniMindConfig(**{**TINY, "rope_scaling": "ntk", "rope_factor": 4.0}))
    # pair 0 turns at speed 1 in both; the last pair is slowed by exactly the factor
    torch.testing.assert_close(ntk.cos[:64, 0], base.cos[:64, 0])
    d = TINY["hidden_size"] // TINY["num_attention_heads"]
    slow_base = torch.atan2(base.sin[1, d // 2 - 1], base.cos[1, d // 2 - 1])
    slow_ntk = torch.atan2(ntk.sin[1, d // 2 - 1], ntk.cos[1, d // 2 - 1])
    torch.testing.assert_close(slow_ntk, slow_base / 4.0)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(MiniMindConfig(**TINY))
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):
        cq, sq = rope(m, 1)
        ck, sk = rope(n, 1)
        return (apply_rotary(q[None, None, None], cq, sq) * apply_rotary(k[None, None, None], ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17))
    torch.testing.assert_close(score(9, 9), (q * k).sum())
    assert not torch.isclose(score(5, 2), score(5, 3))


def test_math_attention_equals_sdpa_and_masks():
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    mask = causal_mask(5, 5, "cpu")
    torch.testing.assert_close(attention_math(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    padding = torch.tensor([[False, False, True, False, True], [False] * 5])
    m = causal_mask(5, 5, "cpu", padding)
    w = torch.softmax(torch.randn(2, 1, 5, 5) + m, -1)
    assert (w[0, 0, :, 2] == 0).all() and (w[0, 0, :, 4] == 0).all()  # padded keys get exactly zero weight
    assert (w[1, 0].triu(1) == 0).all()  # nobody sees the future


def test_math_attention_in_bf16_rounds_once_like_an_fp32_softmax():
    """attention_math hands bf16 scores to softmax as they are: the kernel sums in fp32 and rounds once,
    so the result is bit for bit the explicit .float() softmax cast back (without the two copies)."""
    q, k, v = torch.randn(3, 2, 4, 16, 8).bfloat16().unbind(0)
    mask = causal_mask(16, 16, "cpu", dtype=torch.bfloat16)
    scores = (q * 8 ** -0.5) @ k.transpose(-2, -1) + mask
    assert torch.equal(attention_math(q, k, v, mask), F.softmax(scores.float(), -1).to(torch.bfloat16) @ v)


def test_gqa_with_one_group_per_head_is_mha():
    model = tiny(num_key_value_heads=4)
    hf = to_hf(model)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (32, 32)
    ids = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(model(ids)["logits"], hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_padded_prompt_gives_same_logits_as_unpadded():
    model = tiny()
    ids = torch.randint(1, 97, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 3)], 1).long()
    torch.testing.assert_close(model(padded, attention_mask=mask)["logits"][:, :7], model(ids)["logits"])
    # right padding is invisible to a causal model anyway; a masked key in the middle is not: changing its
    # token must leave every other position's logits unchanged
    mask = torch.ones(1, 7, dtype=torch.long)
    mask[0, 3] = 0
    other = ids.clone()
    other[0, 3] = (other[0, 3] + 1) % 97
    keep = [0, 1, 2, 4, 5, 6]
    a, b = model(ids, attention_mask=mask)["logits"], model(other, attention_mask=mask)["logits"]
    torch.testing.assert_close(a[:, keep], b[:, keep])
    assert (model(ids)["logits"][:, 4:] - model(other)["logits"][:, 4:]).abs().max() > 1e-4  # unmasked, it shows


def test_future_tokens_never_change_earlier_logits():
    model = tiny()
    a = torch.randint(0, 97, (1, 10))
    b = a.clone()
    b[0, 6:] = (b[0, 6:] + 1) % 97
    torch.testing.assert_close(model(a)["logits"][:, :6], model(b)["logits"][:, :6])


def test_logits_to_keep_is_the_tail_of_the_full_logits():
    model = tiny()
    ids = torch.randint(0, 97, (2, 9))
    full = model(ids)["logits"]
    torch.testing.assert_close(model(ids, logits_to_keep=1)["logits"], full[:, -1:])
    torch.testing.assert_close(model(ids, logits_to_keep=4)["logits"], full[:, -4:])
    with pytest.raises(ValueError, match="logits_to_keep and labels"):
        model(ids, labels=ids, logits_to_keep=1)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_cache_generation_equals_no_cache(impl):
    model = tiny(attn_impl=impl)
    with torch.no_grad():  # weights large enough that greedy decoding wanders (at std 0.02 it repeats a token)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.3)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    with_cache = torch.stack(list(model.generate(prompt, 20, use_cache=True)), 1)
    without = torch.stack(list(model.generate(prompt, 20, use_cache=False)), 1)
    assert all(len(set(row.tolist())) > 5 for row in with_cache)  # the comparison has teeth
    assert torch.equal(with_cache, without)
    # sampling too, with the same generator seed
    s1 = list(model.generate(prompt, 10, temperature=1.0, top_k=20, top_p=0.9,
                             generator=torch.Generator().manual_seed(3)))
    s2 = list(model.generate(prompt, 10, temperature=1.0, top_k=20, top_p=0.9, use_cache=False,
                             generator=torch.Generator().manual_seed(3)))
    assert torch.equal(torch.stack(s1), torch.stack(s2))
    # and the logits themselves: a prompt, then one token at a time through the cache
    seq = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        cache = model.new_cache(2, 9)
        model(seq[:, :5], cache=cache)
        for pos in range(5, 9):
            step = model(seq[:, pos:pos + 1], cache=cache)["logits"][:, -1]
            torch.testing.assert_close(step, model(seq[:, :pos + 1])["logits"][:, -1], atol=1e-5, rtol=1e-5)


def test_greedy_generation_equals_transformers_generate():
    model = tiny()
    hf = to_hf(model, "sdpa")
    prompt = torch.randint(0, 97, (1, 6))
    ours = torch.stack(list(model.generate(prompt, 15)), 1)
    theirs = hf.generate(prompt, max_new_tokens=15, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs[:, 6:])


def test_generation_stops_at_eos():
    model = tiny()
    prompt = torch.randint(0, 97, (1, 4))
    first = next(model.generate(prompt, 1)).item()
    out = list(model.generate(prompt, 30, eos_token_id=first))
    assert len(out) == 1


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    seq = torch.zeros(1, 1, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    top2 = {sample_next(logits, seq, 1.0, 2, 1.0, 1.0, g).item() for _ in range(200)}
    assert top2 == {0, 1}
    nucleus = {sample_next(logits, seq, 1.0, 0, 0.5, 1.0, g).item() for _ in range(200)}
    assert nucleus == {0}  # p(token 0) = 0.64 already covers 0.5
    # repetition penalty: token 0 was seen; dividing its logit 4.0 by 10 makes token 1 the greedy pick
    assert sample_next(logits, seq, 0.0, 0, 1.0, 10.0).item() == 1


MOE = dict(use_moe=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
           shared_expert_intermediate_size=40, norm_topk_prob=False)


def test_moe_logits_equal_transformers_qwen2_moe():
    model = tiny(**MOE)
    hf = to_hf(model)
    ids = torch.randint(0, 97, (2, 11))
    torch.testing.assert_close(model(ids)["logits"], hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_moe_without_shared_expert_exports_as_mixtral():
    from transformers import MixtralForCausalLM

    model = tiny(**{**MOE, "shared_expert_intermediate_size": 0, "norm_topk_prob": True})
    hf = MixtralForCausalLM(hf_config(model.config))
    hf.load_state_dict(to_hf_state_dict(model), strict=True)
    hf.eval()
    ids = torch.randint(0, 97, (2, 11))
    torch.testing.assert_close(model(ids)["logits"], hf(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="Mixtral"):  # Mixtral always renormalises the top-k
        hf_config(tiny(**{**MOE, "shared_expert_intermediate_size": 0}).config)


def test_load_balancing_loss_equals_transformers():
    logits = torch.randn(40, 6)
    probs = logits.softmax(-1)
    ours = load_balancing_loss(probs, probs.topk(2, -1).indices, 6)
    theirs = load_balancing_loss_func((logits,), num_experts=6, top_k=2)
    torch.testing.assert_close(ours, theirs)
    # uniform routing gives the minimum, k
    idx = torch.arange(6).repeat(20).view(-1, 2)  # every expert used equally
    assert load_balancing_loss(torch.full((60, 6), 1 / 6), idx, 6).item() == pytest.approx(2.0)


def test_moe_trains_and_reports_aux_loss():
    model = tiny(**MOE).train()
    ids = torch.randint(0, 97, (2, 9))
    out = model(ids[:, :-1], labels=ids[:, 1:])
    assert out["aux_loss"] >= 2.0 - 1e-5  # the minimum is k
    torch.testing.assert_close(out["loss"], out["lm_loss"] + model.config.router_aux_loss_coef * out["aux_loss"])
    out["loss"].backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0  # the router learns through p


def test_gradient_checkpointing_gives_same_gradients(monkeypatch):
    import gpt_minimind.model as model_module

    calls = []
    real = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, 97, (2, 9))
    grads = []
    for ckpt in (False, True):
        model = tiny(gradient_checkpointing=ckpt).train()
        model(ids[:, :-1], labels=ids[:, 1:])["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(calls) == model.config.num_hidden_layers  # once per block, only in the checkpointed run
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], msg=name)
    # with a KV cache in training (prefix tuning trains through one) the layers run as they are: the cache
    # is written inside forward, and a checkpointed layer would be handed none
    model = tiny(gradient_checkpointing=True).train()
    cache = model.new_cache(2, 12)
    prefix = torch.randn(2, model.config.num_key_value_heads, 3, model.config.head_dim, requires_grad=True)
    for i in range(model.config.num_hidden_layers):
        cache.k[i][:, :, :3] = prefix
        cache.v[i][:, :, :3] = prefix
    cache.length = 3
    model(ids[:, :-1], cache=cache)["logits"].sum().backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0
    assert len(calls) == model.config.num_hidden_layers  # no more checkpointed calls than before


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        MiniMindConfig(**{**TINY, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="rope_scaling"):
        MiniMindConfig(**{**TINY, "rope_scaling": "dynamic"})
    model = tiny()
    with pytest.raises(ValueError, match="RoPE table"):
        model(torch.zeros(1, 65, dtype=torch.long))
    # a saved config.json: retired keys of earlier releases are dropped, unknown ones named
    assert MiniMindConfig.from_dict({**TINY, "loss_chunk_size": 256}) == MiniMindConfig(**TINY)
    with pytest.raises(ValueError, match=r"unknown MiniMindConfig fields \['hidden_sise'\]"):
        MiniMindConfig.from_dict({**TINY, "hidden_sise": 8})


def test_top1_router_learns_from_the_lm_loss_only_without_renormalisation():
    """With k = 1, renormalising the chosen probability makes the expert weight exactly 1: the LM loss
    then sends no gradient to the router (only the balancing loss would). Switch's p-weighting does."""
    grads = {}
    for norm in (True, False):
        kw = {**MOE, "num_experts_per_tok": 1, "norm_topk_prob": norm, "router_aux_loss_coef": 0.0}
        if norm:
            with pytest.warns(UserWarning, match="router learns only"):
                model = tiny(**kw).train()
        else:
            model = tiny(**kw).train()
        ids = torch.randint(0, 97, (2, 9))
        model(ids, labels=ids)["loss"].backward()
        grads[norm] = model.model.layers[0].mlp.gate.weight.grad.abs().sum().item()
    assert grads[True] < 1e-8 < 1e-3 < grads[False]  # zero up to rounding: d(p / p)/dp = 0
