"""gpt_minimind/engine.py equals the reference in model.py: packed decoding weights, the fixed-shape decode
step, engine.generate, and the output head with the loss in chunks (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from gpt_minimind import engine
from gpt_minimind.model import MiniMindConfig, MiniMindForCausalLM

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, rope_theta=10000.0)


def tiny(cls=MiniMindForCausalLM, *args, seed: int = 0, **kw) -> MiniMindForCausalLM:
    """Weights large enough that greedy decoding wanders over the vocabulary (at the init's std 0.02 it
    repeats the prompt's last token, and a broken cache or position would go unseen)."""
    torch.manual_seed(seed)
    model = cls(MiniMindConfig(**{**TINY, **kw}), *args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(std=0.3)  # norms' gains too: a swapped one shows
    return model


def tokens(gen) -> torch.Tensor:
    return torch.stack(list(gen), 1)


# ---------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_engine_generate_equals_the_reference(impl):
    model = tiny(attn_impl=impl)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    ref = tokens(model.generate(prompt, 20))
    assert all(len(set(row.tolist())) > 5 for row in ref)  # the test has teeth: the tokens vary
    assert torch.equal(ref, tokens(model.generate(prompt, 20, use_cache=False)))
    for pack in (True, False):
        assert torch.equal(ref, tokens(engine.generate(model, prompt, 20, pack_weights=pack)))
    # sampling with the same generator seed
    kw = dict(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.3)
    s_ref = tokens(model.generate(prompt, 10, generator=torch.Generator().manual_seed(3), **kw))
    s_eng = tokens(engine.generate(model, prompt, 10, generator=torch.Generator().manual_seed(3), **kw))
    assert torch.equal(s_ref, s_eng)


def test_eos_and_the_context_limit_in_both_generates():
    model = tiny()
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    ref = tokens(model.generate(prompt, 20))
    eos = int(ref[0, 2])  # row 0 ends by step 2; row 1 ends where (if) it produces that token
    first = [row.tolist().index(eos) if eos in row.tolist() else None for row in ref]
    for gen in (model.generate(prompt, 20, eos_token_id=eos), engine.generate(model, prompt, 20, eos_token_id=eos)):
        out = tokens(gen)
        for b, f in enumerate(first):  # the same tokens up to EOS, then EOS only (a finished row waits)
            end = f + 1 if f is not None else 20
            assert torch.equal(out[b, :end], ref[b, :end]) and (out[b, end:] == eos).all()
        # and the loop stops once every row has ended
        assert out.shape[1] == (max(first) + 1 if None not in first else 20)
    # the context holds 64 positions: a 60-token prompt gets 4 new tokens, a 64-token prompt an error
    long = torch.randint(0, 97, (1, 60))
    assert tokens(model.generate(long, 20)).shape[1] == tokens(engine.generate(model, long, 20)).shape[1] == 4
    with pytest.raises(ValueError, match="the prompt has 64 tokens and the model's context holds 64"):
        next(engine.generate(model, torch.zeros(1, 64, dtype=torch.long), 5))


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_packed_cached_logits_equal_the_full_forward(impl):
    """A prompt, then one token at a time through the cache, with the weights packed for x @ W."""
    model = tiny(attn_impl=impl)
    seq = torch.randint(0, 97, (2, 9))
    packed = engine.packed_weights(model)
    assert packed is not None
    with torch.no_grad():
        cache = model.new_cache(2, 9)
        first = engine.forward_cached(model, seq[:, :5], cache, packed)
        torch.testing.assert_close(first, model(seq[:, :5])["logits"][:, -1], atol=1e-5, rtol=1e-5)
        for pos in range(5, 9):
            step = engine.forward_cached(model, seq[:, pos:pos + 1], cache, packed)
            torch.testing.assert_close(step, model(seq[:, :pos + 1])["logits"][:, -1], atol=1e-5, rtol=1e-5)


def test_packed_weights_follow_weight_updates():
    """The packed copy is kept: an optimizer step or a load_state_dict must rebuild it."""
    model = tiny()
    prompt = torch.randint(0, 97, (2, 5))
    before = tokens(engine.generate(model, prompt, 12))
    kept = engine.packed_weights(model)
    assert engine.packed_weights(model) is kept  # unchanged weights: packed once
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    model.train()
    model(prompt, labels=prompt)["loss"].backward()
    opt.step()
    assert engine.packed_weights(model)[1] is not kept[1]  # rebuilt after the step
    after = tokens(engine.generate(model, prompt, 12))
    assert not torch.equal(after, before)  # (lr 5: the step changes the greedy tokens)
    assert torch.equal(after, tokens(model.generate(prompt, 12)))
    other = tiny(seed=1)  # another model's weights, copied in place
    model.load_state_dict(other.state_dict())
    assert torch.equal(tokens(engine.generate(model, prompt, 12)), tokens(other.generate(prompt, 12)))
    model.double()  # a cast gives the weights new memory and dtype: packed again, in float64
    assert engine.packed_weights(model)[1].dtype == torch.float64
    assert torch.equal(tokens(engine.generate(model, prompt, 12)), tokens(model.generate(prompt, 12)))


def test_only_plain_linear_layers_are_packed():
    assert engine.packed_weights(tiny(use_moe=True)) is None  # experts keep their own calls
    model = tiny()
    model.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, i, o: o * 2)
    assert engine.packed_weights(model) is None  # a hooked layer computes more than its weight says
    prompt = torch.randint(0, 97, (1, 4))
    assert torch.equal(tokens(engine.generate(model, prompt, 8)), tokens(model.generate(prompt, 8)))


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_static_decode_step_equals_dynamic_cache(impl, monkeypatch):
    """generate(compile=True) runs decode_step: fixed shapes, a tensor position, masked unwritten slots.
    Run eagerly here (torch.compile replaced by the identity; compiling takes half a minute)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    model = tiny(attn_impl=impl)
    prompt = torch.randint(0, 97, (2, 5))
    ref = tokens(model.generate(prompt, 20))
    for pack in (True, False):
        assert torch.equal(ref, tokens(engine.generate(model, prompt, 20, compile=True, pack_weights=pack)))
    # and the logits themselves: token `pos` fed at position `pos` sees exactly tokens 0..pos
    seq = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = engine.StaticKVCache(model.config, 2, 16, torch.device("cpu"), torch.float32)
        engine.forward_cached(model, seq[:, :5], cache)
        cache.static = True
        for pos in range(5, 9):
            cache.position.fill_(pos)
            step = engine.decode_step(model, seq[:, pos:pos + 1], cache, engine.packed_weights(model))
            torch.testing.assert_close(step, model(seq[:, :pos + 1])["logits"][:, -1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# the head and the loss in chunks
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_linear_cross_entropy_equals_torch(chunk):
    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :4] = -100  # ignored positions: no loss, no gradient
    ref = F.cross_entropy((h @ w.t()).flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref_grads = torch.autograd.grad(3.0 * ref, (h, w))  # an upstream factor, as a loss weight would give
    ours = engine.linear_cross_entropy(h, w, labels, chunk)
    torch.testing.assert_close(ours, ref)
    grads = torch.autograd.grad(3.0 * ours, (h, w))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    assert grads[0][0, :4].abs().max() == 0  # the ignored rows get no gradient
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(engine.linear_cross_entropy(h, w, labels, chunk), ref)
    every = torch.full_like(labels, -100)  # nothing to score: NaN, as torch gives
    assert F.cross_entropy((h @ w.t()).flatten(0, 1), every.flatten(), ignore_index=-100).isnan()
    assert engine.linear_cross_entropy(h, w, every, chunk).isnan()
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, 11\) or -100"):
        engine.linear_cross_entropy(h, w, labels.masked_fill(labels == 3, -1), chunk)


@pytest.mark.parametrize("moe", [False, True])
def test_chunked_loss_model_equals_the_reference(moe):
    """Same state_dict, same loss and gradients as model.py's forward (tied embeddings: the head's gradient
    adds to the embedding's; a mixture of experts adds its balancing loss the same way)."""
    ids = torch.randint(0, 97, (2, 9))
    kw = dict(use_moe=True, num_experts=4, num_experts_per_tok=2) if moe else {}
    grads, outs = [], []
    for model in (tiny(**kw), tiny(engine.ChunkedLossCausalLM, 4, **kw)):
        model.train()
        out = model(ids[:, :-1], labels=ids[:, 1:])
        out["loss"].backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert outs[1]["logits"] is None  # never formed whole
    assert set(outs[0]) == set(outs[1]) and ("aux_loss" in outs[0]) == moe
    for key in ("loss", "lm_loss"):
        torch.testing.assert_close(outs[0][key], outs[1][key])
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], msg=name)
    chunked = tiny(engine.ChunkedLossCausalLM, 4, **kw)
    assert set(chunked.state_dict()) == set(tiny(**kw).state_dict())
    torch.testing.assert_close(chunked(ids)["logits"], tiny(**kw)(ids)["logits"])  # no labels: the reference


def test_chunked_loss_under_bf16_autocast_matches_the_plain_path():
    """Products in bf16, softmax in fp32: the head's gradient agrees with the plain path's to bf16 accuracy."""
    ids = torch.randint(0, 97, (2, 9))
    head_grads = []
    for model in (tiny(), tiny(engine.ChunkedLossCausalLM, 4)):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids[:, :-1], labels=ids[:, 1:])["loss"].backward()
        head_grads.append(model.lm_head.weight.grad)  # (tied: the embedding's too)
    torch.testing.assert_close(head_grads[1], head_grads[0], atol=2e-3, rtol=2e-2)
    with pytest.raises(ValueError, match="loss_chunk_size must be > 0"):
        engine.ChunkedLossCausalLM(MiniMindConfig(**TINY), 0)


@pytest.mark.slow
def test_the_compiled_decode_step_compiles_once():
    """torch.compile for real (the other tests replace it): one graph serves every decode step. A new
    shape or stride per step would recompile each time and, past dynamo's limit, fall back to eager."""
    import torch._dynamo

    torch._dynamo.reset()
    model = tiny()
    prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = tokens(engine.generate(model, prompt, 12, compile=True))
    assert torch.equal(compiled, tokens(model.generate(prompt, 12)))
