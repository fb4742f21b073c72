"""gpt_minimind part 2: task data, SFT's assistant-only loss, LoRA against peft, QLoRA on CPU, adapters."""

import json
import math
import random
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM

from common.checkpoint import load_pretrained, save_pretrained
from common.config import apply_overrides
from gpt_minimind import engine, train_tokenizer
from gpt_minimind.export_hf import hf_config, to_hf_state_dict
from gpt_minimind.finetune import SFTConfig, SFTData, assistant_loss, encode_chat
from gpt_minimind.loading import load_model
from gpt_minimind.lora import LoRALinear, inject_lora, merge_lora, quantize_linear, save_adapter
from gpt_minimind.model import MiniMindConfig, MiniMindForCausalLM
from gpt_minimind.tasks import arithmetic_tasks, exact_match, parse_mix, read_conversations
from gpt_minimind.train_lora import LoRAConfig
from gpt_minimind.train_lora import main as lora_main
from gpt_minimind.train_sft import main as sft_main

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_model(**kw) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    return MiniMindForCausalLM(MiniMindConfig(**{**TINY, **kw})).eval()


def conversations(n: int, seed: int = 0) -> list[dict]:
    """One-digit sums as chat turns (a second turn on every third one): learnable in a few dozen steps."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        conv = [{"role": "user", "content": f"计算：{a}+{b}="}, {"role": "assistant", "content": str(a + b)}]
        if i % 3 == 0:
            conv += [{"role": "user", "content": "谢谢"}, {"role": "assistant", "content": "不客气"}]
        out.append({"conversations": conv})
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A 'pretrained' model directory as train_pretrain.py writes it: weights, config, tokenizer/."""
    d = tmp_path_factory.mktemp("ft")
    text = d / "text.jsonl"
    rows = [{"text": f"计算：{a}+{b}={a + b}。谢谢，不客气。"} for a in range(10) for b in range(10)] * 3
    text.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    train_tokenizer.main(train_tokenizer.TokenizerConfig(vocab_size=300, data_file=str(text),
                                                         out_dir=str(d / "tok")))
    tok = AutoTokenizer.from_pretrained(d / "tok")
    model = tiny_model(vocab_size=len(tok), max_position_embeddings=64)
    # a trained model's (tied) embeddings are far larger than the 0.02 init; with the head frozen, LoRA
    # could not make confident predictions through 0.02-sized output vectors
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=0.5)
    save_pretrained(model, model.config.to_dict(), d / "base")
    tok.save_pretrained(d / "base" / "tokenizer")
    data = d / "sft.jsonl"
    data.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations(300)))
    return {"dir": d, "base": d / "base", "tok": tok, "data": data}


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------

def test_task_splits_share_no_question():
    train = {ex.messages[0]["content"] for ex in arithmetic_tasks("train")}
    test = {ex.messages[0]["content"] for ex in arithmetic_tasks("test")}
    assert train and test and not train & test
    assert len(train) + len(test) == 2_000
    ex = next(arithmetic_tasks("test"))
    a, op, b = ex.messages[0]["content"][3:-1].partition("+") if "+" in ex.messages[0]["content"] else (
        ex.messages[0]["content"][3:-1].rpartition("-"))
    assert int(ex.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_bad_inputs_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*ending with an assistant turn"):
        read_conversations(bad)
    with pytest.raises(ValueError, match="expected TASK=N"):
        parse_mix(["arithmetc=5"])
    assert parse_mix(["arithmetic=0"])["arithmetic"] == 0
    from gpt_minimind.finetune import load_conversations
    with pytest.raises(ValueError, match="--only-tasks .*arithmetc"):
        load_conversations(apply_overrides(SFTConfig(), {"only_tasks": ["arithmetc"]}))


def test_answers_are_compared_without_case_or_final_stop():
    assert exact_match(" Apple. ", "apple")
    assert exact_match("正面。", "正面")
    assert not exact_match("正面的", "正面")


# ---------------------------------------------------------------------------------------------------
# SFT: only the assistant's tokens are learned
# ---------------------------------------------------------------------------------------------------

def test_labels_keep_only_assistant_turns(base_dir):
    tok = base_dir["tok"]
    conv = conversations(1)[0]["conversations"]
    ids, labels = encode_chat(tok, conv, 64)
    learned = [t for t in labels if t != -100]
    want = []
    for turn in conv:
        if turn["role"] == "assistant":
            want += tok.encode(turn["content"], add_special_tokens=False) + [tok.eos_token_id]
    assert learned == want
    assert len(ids) == len(labels)
    # the ids are exactly what the chat template produces (minus the last token, which has no target)
    full = tok.apply_chat_template(conv, tokenize=True, return_dict=False)
    assert ids == full[:-1]
    # and every kept label is the token that follows its position (labels are shifted by one)
    assert all(label in (-100, full[t + 1]) for t, label in enumerate(labels))


def test_masked_positions_contribute_nothing(base_dir):
    tok = base_dir["tok"]
    model = tiny_model(vocab_size=len(tok))
    data = SFTData(tok, read_conversations(base_dir["data"])[:4], 64)
    x, y = data.collate([0, 1, 2, 3])
    loss, n = assistant_loss(model, x, y)
    # scramble the logits at every position whose label is -100: the loss must not move
    masked = (y == -100)

    def scramble(_module, _inputs, logits):
        return torch.where(masked[..., None], torch.randn_like(logits) * 100, logits)

    handle = model.lm_head.register_forward_hook(scramble)
    loss2, _ = assistant_loss(model, x, y)
    handle.remove()
    torch.testing.assert_close(loss, loss2)
    # and it is the mean over exactly the n learned positions
    logp = model(x)["logits"].log_softmax(-1)
    manual = -logp[~masked].gather(-1, y[~masked][:, None]).sum() / n
    torch.testing.assert_close(loss, manual)


def test_sft_run_lowers_held_out_loss_and_resumes(base_dir, tmp_path):
    cfg = apply_overrides(SFTConfig(), dict(init_from=str(base_dir["base"]), data_file=str(base_dir["data"]),
                                            out_dir=str(tmp_path / "sft"), batch_size=8, max_iters=40, lr=3e-3,
                                            warmup_iters=5, eval_every=20, save_every=20, log_every=10,
                                            threads=1))
    res = sft_main(cfg)
    s = res["summary"]
    assert s["valid_loss"] < 0.6 * s["initial_valid_loss"]
    assert (tmp_path / "sft" / "final" / "tokenizer" / "tokenizer.json").is_file()
    # resume from step 20 gives the same final weights as the uninterrupted run
    full = MiniMindForCausalLM(MiniMindConfig(**json.loads((tmp_path / "sft/final/config.json").read_text())))
    load_pretrained(full, tmp_path / "sft" / "final")
    shutil.rmtree(tmp_path / "sft" / "checkpoints" / "step_000040")
    (tmp_path / "sft" / "checkpoints" / "latest").write_text("step_000020\n")
    resumed = sft_main(apply_overrides(cfg, {"resume": True}))
    assert resumed["losses"] == res["losses"][20:]  # it continued from step 20: the same last 20 losses
    again = MiniMindForCausalLM(full.config)
    load_pretrained(again, tmp_path / "sft" / "final")
    for (name, p), q in zip(full.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name  # bit for bit


# ---------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------

def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_starts_at_base_trains_only_adapters_and_merges():
    model = tiny_model()
    x = torch.randint(0, 97, (2, 10))
    before = model(x)["logits"]
    params = inject_lora(model, r=4, alpha=8)
    torch.testing.assert_close(model(x)["logits"], before)  # B = 0
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert sum(p.numel() for p in params) == 2 * (4 * (32 + 32) * 2 + 4 * (32 + 16) * 2 + 4 * (32 + 64) * 3)
    randomize_lora(model)
    adapted = model(x)["logits"]
    assert (adapted - before).abs().max() > 1e-3
    layer = next(m for m in model.modules() if isinstance(m, LoRALinear))
    w0 = layer.base.weight.clone()
    layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(x)["logits"], adapted, atol=1e-5, rtol=1e-5)


def test_lora_equals_peft_with_equal_weights():
    from peft import LoraConfig, get_peft_model

    ours = tiny_model()
    inject_lora(ours, r=4, alpha=8)
    randomize_lora(ours)
    hf = LlamaForCausalLM(hf_config(ours.config)).eval()
    hf.load_state_dict(to_hf_state_dict(tiny_model()))
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                   "o_proj", "gate_proj", "up_proj",
                                                                                   "down_proj"]))
    theirs = dict(peft_model.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:  # ours: ...q_proj.lora_A.weight, peft: base_model.model...q_proj.lora_A.default.weight
                theirs["base_model.model." + n.replace(".weight", ".default.weight")].copy_(p)
    x = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(ours(x)["logits"], peft_model(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_adapter_file_loads_in_peft_on_the_export(base_dir, tmp_path):
    from peft import PeftModel

    model, tok = load_adapter_free(base_dir["base"])
    inject_lora(model, r=4, alpha=8)
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", base_dir["base"])
    again, _ = load_model(tmp_path / "adapter", "cpu")  # an adapter directory: its base, then the adapter
    x = torch.randint(0, len(tok), (2, 10))
    torch.testing.assert_close(again(x)["logits"], model(x)["logits"])
    base = load_adapter_free(base_dir["base"])[0]
    hf = LlamaForCausalLM(hf_config(base.config)).eval()
    hf.load_state_dict(to_hf_state_dict(base))
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter")
    torch.testing.assert_close(peft_model(input_ids=x).logits, model(x)["logits"], atol=1e-5, rtol=1e-5)


def load_adapter_free(path):
    return load_model(path, "cpu")


@pytest.mark.parametrize("method", ["lora", "bitfit", "adapter"])
def test_generation_with_adapters_uses_them_with_and_without_the_cache(method):
    # engine.py packs plain weights for decoding (x @ W); LoRA, BitFit's biases and adapters must keep
    # their own calls
    from gpt_minimind.peft_zoo import apply_method

    model = tiny_model(hidden_size=64, intermediate_size=128)
    assert engine.packed_weights(model) is not None
    apply_method(model, method, zoo_cfg())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith("bias") or ".up." in name:
                p.normal_(std=0.5)  # trained-looking adapters, biases and adapter outputs that change the output
    assert engine.packed_weights(model) is None
    prompt = torch.randint(0, 97, (1, 5))
    fast = torch.stack(list(engine.generate(model, prompt, 12)), 1)
    cached = torch.stack(list(model.generate(prompt, 12)), 1)
    uncached = torch.stack(list(model.generate(prompt, 12, use_cache=False)), 1)
    assert torch.equal(cached, uncached) and torch.equal(fast, cached)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_base_is_quantized_and_trains_on_cpu(bits):
    model = tiny_model(hidden_size=64, intermediate_size=128)
    x = torch.randint(0, 97, (2, 12))
    ref = model(x)["logits"]
    params = inject_lora(model, r=4, alpha=8, quantize_bits=bits)
    layer = next(m for m in model.modules() if isinstance(m, LoRALinear))
    assert layer.base.weight.dtype in (torch.uint8, torch.int8)  # packed 4-bit pairs / int8
    out = model(x)["logits"]
    err = (out - ref).abs().max()
    assert 0 < err < (0.3 if bits == 4 else 0.05) * ref.abs().max()  # close, not equal
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(x[:, :-1], labels=x[:, 1:])["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_passes_gradients_after_an_eval_pass(bits):
    # bitsandbytes repacks a 4-bit weight for a CPU inference kernel (no backward) on the first eval-mode
    # call on AVX-512 BF16 CPUs; a held-out evaluation before training must not cut the gradient path
    torch.manual_seed(0)
    layer = quantize_linear(nn.Linear(64, 64, bias=False), bits)
    x = torch.randn(2, 8, 64, requires_grad=True)
    layer(x).sum().backward()
    before, x.grad = x.grad.clone(), None
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 8, 64))
    layer.train()
    layer(x).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, before)


def test_lora_run_saves_an_adapter_that_reloads(base_dir, tmp_path):
    cfg = apply_overrides(LoRAConfig(), dict(init_from=str(base_dir["base"]), data_file=str(base_dir["data"]),
                                             out_dir=str(tmp_path / "lora"), batch_size=8, max_iters=30, r=8,
                                             alpha=16, lr=3e-2, warmup_iters=3, eval_every=15, save_every=15,
                                             log_every=10, threads=1, merge=True))
    res = lora_main(cfg)
    s = res["summary"]
    assert s["valid_loss"] < 0.8 * s["initial_valid_loss"]
    assert s["trainable_params"] < 0.5 * s["total_params"]
    model, tok = load_model(tmp_path / "lora" / "final", "cpu")
    merged, _ = load_model(tmp_path / "lora" / "merged", "cpu")
    x = torch.randint(0, len(tok), (2, 10))
    torch.testing.assert_close(model(x)["logits"], merged(x)["logits"], atol=1e-3, rtol=1e-4)  # logits ~ 30
    base, _ = load_model(base_dir["base"], "cpu")
    assert (model(x)["logits"] - base(x)["logits"]).abs().max() > 1e-2  # the reloaded adapter is in use


# ---------------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------------

def test_dpo_loss_equals_trl_on_the_same_sequences(base_dir, tmp_path):
    """trl's DPOTrainer builds the batch (its chat template use, padding, completion mask) and computes its
    loss on the transformers copies; ours runs on the same token ids with our models."""
    from datasets import Dataset
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer

    from gpt_minimind.preference import sequence_logps
    from gpt_minimind.train_dpo import dpo_loss

    tok = base_dir["tok"]
    policy, reference = load_model(base_dir["base"], "cpu")[0], load_model(base_dir["base"], "cpu")[0]
    with torch.no_grad():  # the policy has moved away from the reference
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf_policy, hf_ref = (LlamaForCausalLM(hf_config(m.config)) for m in (policy, reference))
    hf_policy.load_state_dict(to_hf_state_dict(policy))
    hf_ref.load_state_dict(to_hf_state_dict(reference))
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]}
            for q, c, r in [("计算：1+2=", "3", "4"), ("计算：19+9=", "28", "27"), ("谢谢", "不客气", "3"),
                            ("计算：7+8=", "15", "不客气，谢谢")]]
    args = TrlDPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, report_to=[], use_cpu=True, bf16=False,
                        per_device_train_batch_size=4)
    trainer = DPOTrainer(model=hf_policy, ref_model=hf_ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    theirs = trainer._compute_loss(hf_policy, batch, False)
    ids, completion = batch["input_ids"], batch["completion_mask"]
    assert batch["attention_mask"][:, 0].all()  # right padding: our causal model needs no mask
    x, y = ids[:, :-1], ids[:, 1:].masked_fill(completion[:, 1:] == 0, -100)
    lp, lp_ref = sequence_logps(policy, x, y), sequence_logps(reference, x, y)
    ours, chosen_r, rejected_r = dpo_loss(lp[:4], lp[4:], lp_ref[:4], lp_ref[4:], beta=0.1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert abs(ours.item() - math.log(2)) > 1e-3  # not the trivial policy == reference value


def test_dpo_step_raises_the_chosen_answer(base_dir):
    from gpt_minimind.preference import PairData, sequence_logps
    from gpt_minimind.train_dpo import dpo_loss

    tok = base_dir["tok"]
    policy, reference = load_model(base_dir["base"], "cpu")[0], load_model(base_dir["base"], "cpu")[0]
    data = PairData(tok, [([{"role": "user", "content": "计算：1+2="}], "3", "4")] * 4, 64)
    x, y = data.collate([0, 1, 2, 3])
    with torch.no_grad():
        ref = sequence_logps(reference, x, y)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    lp = sequence_logps(policy, x, y)
    loss, c, r = dpo_loss(lp[:4], lp[4:], ref[:4], ref[4:], beta=0.1)
    assert abs(loss.item() - math.log(2)) < 1e-5 and torch.equal(c, r)  # policy == reference
    loss.backward()
    opt.step()
    with torch.no_grad():
        lp2 = sequence_logps(policy, x, y)
    assert (lp2[:4] - ref[:4]).mean() > (lp2[4:] - ref[4:]).mean()  # the chosen answer gained relative to the rejected


def test_dpo_pairs_file_errors_are_named(tmp_path):
    from gpt_minimind.preference import read_dpo_jsonl

    bad = tmp_path / "dpo.jsonl"
    bad.write_text(json.dumps({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                               "rejected": [{"role": "user", "content": "DIFFERENT"},
                                            {"role": "assistant", "content": "c"}]}) + "\n")
    with pytest.raises(ValueError, match=r"dpo.jsonl:1: .*same prompt"):
        read_dpo_jsonl(bad)


# ---------------------------------------------------------------------------------------------------
# the PEFT zoo
# ---------------------------------------------------------------------------------------------------

def zoo_cfg(**kw):
    from gpt_minimind.peft_zoo import ZooConfig
    return apply_overrides(ZooConfig(), {"n_virtual": 3, "adapter_dim": 4, "lora_r": 2, **kw})


def test_prompt_tuning_with_real_token_embeddings_equals_prepending_the_tokens():
    from gpt_minimind.peft_zoo import apply_method

    model = tiny_model()
    x, prefix = torch.randint(3, 97, (2, 7)), torch.tensor([5, 9, 11])
    expected = model(torch.cat([prefix.expand(2, -1), x], 1))["logits"][:, 3:]
    wrapped, params = apply_method(model, "prompt", zoo_cfg())
    with torch.no_grad():
        wrapped.prompt.copy_(model.model.embed_tokens.weight[prefix])
    torch.testing.assert_close(wrapped(x)["logits"], expected, atol=1e-5, rtol=1e-5)
    assert params == [wrapped.prompt]


def test_prefix_tuning_is_a_learned_kv_cache():
    """With the keys/values a real prefix would leave in the cache, prefix tuning reproduces that prefix."""
    from gpt_minimind.peft_zoo import apply_method

    model = tiny_model()
    x, prefix = torch.randint(3, 97, (2, 7)), torch.tensor([[5, 9, 11]] * 2)
    expected = model(torch.cat([prefix, x], 1))["logits"][:, 3:]
    cache = model.new_cache(2, 3)
    model(prefix, cache=cache)
    wrapped, params = apply_method(model, "prefix", zoo_cfg())
    with torch.no_grad():
        for i in range(model.config.num_hidden_layers):
            wrapped.prefix_k[i].copy_(cache.k[i][0])
            wrapped.prefix_v[i].copy_(cache.v[i][0])
    torch.testing.assert_close(wrapped(x)["logits"], expected, atol=1e-5, rtol=1e-5)
    assert params == [wrapped.prefix_k, wrapped.prefix_v]


def peft_twin(model: MiniMindForCausalLM, peft_config):
    """peft's prompt-learning wrapper around the transformers export of ``model`` (equal weights)."""
    from peft import get_peft_model

    hf = LlamaForCausalLM(hf_config(model.config)).eval()
    hf.load_state_dict(to_hf_state_dict(model))
    return get_peft_model(hf, peft_config).eval()


@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
def test_prompt_and_p_tuning_equal_peft_with_equal_weights(method):
    from peft import PromptEncoderConfig, PromptTuningConfig

    from gpt_minimind.peft_zoo import apply_method

    model = tiny_model()
    wrapped, _ = apply_method(model, method, zoo_cfg(encoder_hidden=24))
    if method == "prompt":
        twin = peft_twin(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    else:
        twin = peft_twin(model, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                    encoder_hidden_size=24))
    encoder = twin.prompt_encoder["default"]
    with torch.no_grad():
        encoder.embedding.weight.copy_(wrapped.prompt)
        if method == "p_tuning":  # the same Sequential indices on both sides
            encoder.mlp_head.load_state_dict(wrapped.encoder.state_dict())
            assert not torch.allclose(wrapped.virtual_embeddings(), wrapped.prompt)  # the encoder does act
    x = torch.randint(3, 97, (2, 7))
    # peft returns logits for the virtual positions too; ours drops them
    torch.testing.assert_close(wrapped(x)["logits"], twin(input_ids=x).logits[:, 3:], atol=1e-5, rtol=1e-5)


def test_prefix_tuning_equals_peft_with_equal_weights():
    from peft import PrefixTuningConfig

    from gpt_minimind.peft_zoo import apply_method

    model = tiny_model()
    wrapped, _ = apply_method(model, "prefix", zoo_cfg())
    twin = peft_twin(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    # peft keeps the prefix as one (P, layers * 2 * kv_heads * head_dim) table, [layer][key, value] inside
    table = torch.stack([wrapped.prefix_k, wrapped.prefix_v], 1).permute(3, 0, 1, 2, 4).reshape(3, -1)
    with torch.no_grad():
        twin.prompt_encoder["default"].embedding.weight.copy_(table)
    x = torch.randint(3, 97, (2, 7))
    torch.testing.assert_close(wrapped(x)["logits"], twin(input_ids=x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["full", "embedding", "prompt", "p_tuning", "prefix", "bitfit", "adapter", "lora"])
def test_every_peft_method_trains_only_its_parameters(method):
    from gpt_minimind.peft_zoo import LR, apply_method

    model = tiny_model()
    x = torch.randint(3, 97, (4, 12))
    before = model(x)["logits"].detach()
    wrapped, params = apply_method(model, method, zoo_cfg())
    if method in ("bitfit", "adapter", "lora", "full", "embedding"):  # these start at the base model
        torch.testing.assert_close(wrapped(x)["logits"], before)
    trainable = {id(p) for p in params}
    assert all(p.requires_grad == (id(p) in trainable) for p in wrapped.parameters())
    # and they are the method's own parameters, by name
    names = [n for n, p in wrapped.named_parameters() if id(p) in trainable]
    owns = {"full": lambda n: True, "embedding": lambda n: n == "model.embed_tokens.weight",
            "prompt": lambda n: n == "prompt", "p_tuning": lambda n: n == "prompt" or n.startswith("encoder."),
            "prefix": lambda n: n in ("prefix_k", "prefix_v"), "bitfit": lambda n: n.endswith(".bias"),
            "adapter": lambda n: ".down." in n or ".up." in n or n.endswith("layernorm.weight"),
            "lora": lambda n: ".lora_A." in n or ".lora_B." in n}[method]
    assert names and all(owns(n) for n in names), names
    if method == "full":
        assert len(names) == len(list(model.parameters()))
    frozen = {n: p.detach().clone() for n, p in wrapped.named_parameters() if id(p) not in trainable}
    opt = torch.optim.Adam(params, lr=LR[method])
    losses = []
    for _ in range(25):
        logits = wrapped(x[:, :-1])["logits"]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # a random 32-wide model is hard to steer through a few input positions: a small but real fall
    assert losses[-1] < losses[0] - (0.01 if method in ("prompt", "p_tuning", "prefix") else 0.05), losses
    for n, p in wrapped.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


# ---------------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------------

def test_mcnemar_counts_only_the_questions_that_changed():
    from gpt_minimind.train_grpo import mcnemar

    before = [True] * 50 + [False] * 10 + [True] * 2 + [False] * 38
    after = [True] * 50 + [True] * 10 + [False] * 2 + [False] * 38
    # 10 gained, 2 lost: p = 2 * P(Bin(12, 1/2) <= 2) = 2 * (1 + 12 + 66) / 4096
    assert mcnemar(before, after) == {"gained": 10, "lost": 2, "p_value": pytest.approx(158 / 4096)}
    assert mcnemar(after, before)["p_value"] == pytest.approx(158 / 4096)
    assert mcnemar(before, before) == {"gained": 0, "lost": 0, "p_value": 1.0}
    assert mcnemar([True, False] * 5, [False, True] * 5)["p_value"] == 1.0


def test_grpo_rewards_and_group_advantages():
    from gpt_minimind.train_grpo import group_advantages, reward

    assert reward(" 12 ", "12", 0.1) == pytest.approx(1.1)
    assert reward("13", "12", 0.1) == pytest.approx(0.1)
    assert reward("十二", "12", 0.1) == 0.0
    adv = group_advantages(torch.tensor([[1.1, 0.1, 0.1, 0.0], [0.1, 0.1, 0.1, 0.1]]))
    torch.testing.assert_close(adv.mean(-1), torch.zeros(2), atol=1e-6, rtol=0)
    assert adv[0, 0] > 0 > adv[0, 1] > adv[0, 3]
    assert torch.equal(adv[1], torch.zeros(4))  # a group that scores alike teaches nothing


def test_grpo_step_moves_probability_to_the_better_answer():
    from gpt_minimind.rlhf import collate, token_logps
    from gpt_minimind.train_grpo import grpo_loss

    model, reference = tiny_model(), tiny_model()
    prompt = [5, 6, 7]
    answers = [[10, 11], [20, 21, 22]]  # the first is rewarded, the second is not
    x, y = collate([prompt, prompt], answers, pad_id=0)
    assert y[0].tolist() == [-100, -100, 10, 11, -100] and y[1].tolist() == [-100, -100, 20, 21, 22]
    mask = y != -100
    adv = torch.tensor([1.0, -1.0])
    with torch.no_grad():
        ref = token_logps(reference, x, y)
    logp = token_logps(model, x, y)
    loss, kl = grpo_loss(logp, logp.detach(), ref, adv, mask, beta=0.04, clip_eps=0.2)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)  # policy == reference
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    with torch.no_grad():
        after = token_logps(model, x, y)
    seq = lambda t: (t * mask).sum(-1)  # noqa: E731
    assert seq(after)[0] > seq(ref)[0] and seq(after)[1] < seq(ref)[1]


def test_distillation_loss_terms():
    from gpt_minimind.train_distill import distill_loss

    torch.manual_seed(0)
    s, t, y = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    ce = F.cross_entropy(s.reshape(-1, 11), y.reshape(-1))
    torch.testing.assert_close(distill_loss(s, t, y, 0.0, 2.0)[0], ce)
    torch.testing.assert_close(distill_loss(s, s, y, 0.5, 2.0)[0], 0.5 * ce)  # a student equal to its teacher
    pt, ps = (t / 2).softmax(-1), (s / 2).log_softmax(-1)
    kl = (pt * (pt.log() - ps)).sum(-1).mean() * 4  # KL(teacher || student) per position, times T^2
    torch.testing.assert_close(distill_loss(s, t, y, 1.0, 2.0)[0], kl)


def test_dpo_run_on_a_pairs_file_raises_preference(base_dir, tmp_path):
    from gpt_minimind.train_dpo import DPOConfig
    from gpt_minimind.train_dpo import main as dpo_main

    rows = []
    for a in range(10):
        for b in range(4):
            prompt = [{"role": "user", "content": f"计算：{a}+{b}="}]
            rows.append({"chosen": prompt + [{"role": "assistant", "content": str(a + b)}],
                         "rejected": prompt + [{"role": "assistant", "content": "谢谢"}]})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    cfg = apply_overrides(DPOConfig(), dict(init_from=str(base_dir["base"]), data_file=str(pairs),
                                            out_dir=str(tmp_path / "dpo"), batch_size=8, max_iters=12, lr=3e-3,
                                            warmup_iters=2, eval_every=12, save_every=6, log_every=4, threads=1))
    s = dpo_main(cfg)["summary"]
    assert s["after"]["reward_accuracy"] > 0.5 and s["after"]["reward_margin"] > 0
    assert s["after"]["preference_accuracy"] >= s["before"]["preference_accuracy"]
    assert (tmp_path / "dpo" / "final" / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_lora_checkpoint_round_trip(bits, tmp_path):
    from common.checkpoint import load_checkpoint, save_checkpoint

    model = tiny_model(hidden_size=64, intermediate_size=128)
    inject_lora(model, r=4, alpha=8, quantize_bits=bits)
    randomize_lora(model)
    x = torch.randint(0, 97, (2, 12))
    save_checkpoint(tmp_path, 1, model, model.config.to_dict())
    again = tiny_model(hidden_size=64, intermediate_size=128)
    inject_lora(again, r=4, alpha=8, quantize_bits=bits)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # different A and B from the saved model's, so the load must restore both
        for n, p in again.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    saved = dict(model.named_parameters())
    assert all(not torch.equal(p, saved[n]) for n, p in again.named_parameters() if "lora_" in n)
    load_checkpoint(tmp_path / "step_000001", again, restore_rng=False)
    torch.testing.assert_close(again(x)["logits"], model(x)["logits"])


# ---------------------------------------------------------------------------------------------------
# RLHF: the reward model and PPO
# ---------------------------------------------------------------------------------------------------

def tiny_reward_model(**kw):
    from gpt_minimind.model import MiniMindForSequenceClassification

    torch.manual_seed(1)
    return MiniMindForSequenceClassification(MiniMindConfig(**{**TINY, **kw})).eval()


def test_reward_model_export_and_trl_pool_the_same_last_token(tmp_path):
    """Our score at the last non-padding token = transformers' LlamaForSequenceClassification from our
    export = trl's get_reward (the helper its PPO trainer used) on the same right-padded rows."""
    from trl.experimental.utils import get_reward

    from gpt_minimind.export_hf import export_reward_model

    rm = tiny_reward_model()
    hf = export_reward_model(rm, tmp_path / "hf").eval()
    from transformers import AutoModelForSequenceClassification
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(loaded).__name__ == "LlamaForSequenceClassification"
    x = torch.randint(3, 97, (3, 12))
    x[0, 7:], x[1, 10:] = 0, 0  # right padding with pad_token_id 0
    with torch.no_grad():
        ours = rm(x)["scores"]
        theirs = loaded(x).logits.squeeze(-1)
        _, trl_scores, lengths = get_reward(hf, x, pad_token_id=0, context_length=3)
        unpadded = torch.stack([rm(x[i:i + 1, :n])["scores"][0] for i, n in enumerate([7, 10, 12])])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, trl_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, unpadded, atol=1e-5, rtol=1e-5)  # padding after the answer changes nothing
    assert lengths.tolist() == [6, 9, 11] and ours.std() > 0


def test_bradley_terry_loss_equals_trl_reward_trainer(base_dir, tmp_path):
    """trl's RewardTrainer builds the batch (chosen rows, then rejected rows) and computes its loss on our
    exported reward model; ours on the same ids with our model, the centring term included."""
    from datasets import Dataset
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    from gpt_minimind.export_hf import export_reward_model
    from gpt_minimind.model import MiniMindForSequenceClassification
    from gpt_minimind.train_reward import bradley_terry_loss

    tok = base_dir["tok"]
    lm = load_model(base_dir["base"], "cpu")[0]
    rm = MiniMindForSequenceClassification.from_causal_lm(lm)
    assert rm(torch.tensor([[5, 6, 7]]))["scores"].item() == 0.0  # a zero head: every score starts at 0
    torch.nn.init.normal_(rm.score.weight, std=0.5)
    hf = export_reward_model(rm, tmp_path / "hf", base_dir["base"] / "tokenizer")
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]}
            for q, c, r in [("计算：1+2=", "3", "4"), ("计算：19+9=", "28", "27"), ("谢谢", "不客气", "3")]]
    args = TrlRewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                           per_device_train_batch_size=3, center_rewards_coefficient=0.01)
    trainer = RewardTrainer(model=hf, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    hf.eval()
    theirs = trainer.compute_loss(hf, dict(batch))
    ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, tok.pad_token_id)
    scores = rm(ids)["scores"]
    ours = bradley_terry_loss(scores[:3], scores[3:], center_weight=0.01)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    manual = -torch.log(torch.sigmoid(scores[:3] - scores[3:])).mean() + 0.01 * ((scores[:3] + scores[3:]) ** 2).mean()
    torch.testing.assert_close(ours, manual)


def test_the_language_model_term_of_the_reward_model_is_the_sft_loss_of_the_chosen_answers(base_dir):
    """At the start the reward model's body is the SFT model's, so chosen_lm_loss through the tied embedding
    equals the language model's own cross-entropy on the chosen rows; a changed body changes it."""
    from gpt_minimind.model import MiniMindForSequenceClassification
    from gpt_minimind.preference import PairData
    from gpt_minimind.train_reward import chosen_lm_loss

    tok = base_dir["tok"]
    lm = load_model(base_dir["base"], "cpu")[0]
    rm = MiniMindForSequenceClassification.from_causal_lm(lm)
    data = PairData(tok, [([{"role": "user", "content": f"计算：{a}+1="}], str(a + 1), "谢谢") for a in range(4)], 64)
    x, y = data.collate([0, 1, 2, 3])
    head = lambda h: torch.nn.functional.linear(h, rm.model.embed_tokens.weight)  # noqa: E731
    with torch.no_grad():
        ours = chosen_lm_loss(head, rm.model(x[:4]), y[:4])
        theirs = torch.nn.functional.cross_entropy(lm(x[:4])["logits"].flatten(0, 1), y[:4].flatten(),
                                                   ignore_index=-100)
        torch.testing.assert_close(ours, theirs)
        assert (y[:4] != -100).sum() >= 8  # the answer and its end-of-turn token in each row
        rm.model.layers[0].mlp.down_proj.weight.add_(0.5)
        assert abs(chosen_lm_loss(head, rm.model(x[:4]), y[:4]).item() - ours.item()) > 1e-3


def test_label_choices_count_the_favourite_and_score_it_against_the_reference(base_dir):
    """label_choices takes the highest-scored label per question; answer_logps is the summed log-probability
    of the answer and its end-of-turn token, as the pair code computes it."""
    from gpt_minimind.preference import PairData, all_logps
    from gpt_minimind.rlhf import answer_logps, label_choices
    from gpt_minimind.tasks import Example

    def ex(task, q, a):
        return Example(task, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], a)

    tests = [ex("news_sentiment", f"新闻{i}", a) for i, a in enumerate(["中性", "负面", "中性", "正面"])]
    tests += [ex("review_sentiment", f"评论{i}", a) for i, a in enumerate(["好评", "差评"])]
    always_neutral = lambda prompts, answers: torch.tensor([1.0 if a == "中性" else 0.0 for a in answers])  # noqa
    counts, acc = label_choices(always_neutral, tests, 100)
    assert counts == {"news_sentiment": {"正面": 0, "中性": 4, "负面": 0},
                      "review_sentiment": {"好评": 0, "差评": 0, "中性": 2}}
    assert acc == {"news_sentiment": 0.5, "review_sentiment": 0.0}
    oracle = {(t.prompt[0]["content"], t.answer) for t in tests}
    right = lambda prompts, answers: torch.tensor([float((p[0]["content"], a) in oracle)  # noqa: E731
                                                   for p, a in zip(prompts, answers)])
    assert label_choices(right, tests, 2)[1] == {"news_sentiment": 1.0, "review_sentiment": 1.0}

    tok, lm = base_dir["tok"], load_model(base_dir["base"], "cpu")[0]
    prompts, answers = [t.prompt for t in tests], [t.answer for t in tests]
    expected = all_logps(lm, PairData(tok, [(p, a, a) for p, a in zip(prompts, answers)], 64))[0]
    torch.testing.assert_close(answer_logps(lm, tok, prompts, answers, batch_size=4), expected)


def gae_loop(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """GAE for one answer, written the slow way: A_t = sum_k (gamma lam)^k delta_t+k, V after the end = 0."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]


def test_gae_equals_a_reference_loop_on_ragged_answers():
    from gpt_minimind.train_ppo import gae

    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 7]
    rewards, values = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)]:
        adv, ret = gae(rewards, values, mask, gamma, lam)
        for i, n in enumerate(lengths):
            expected = gae_loop(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
            torch.testing.assert_close(adv[i, :n], torch.tensor(expected), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ret[i, :n], adv[i, :n] + values[i, :n])
            assert (adv[i, n:] == 0).all() and (ret[i, n:] == 0).all()
        if lam == 1.0 and gamma == 1.0:  # Monte-Carlo: the return is the sum of the rewards still to come
            torch.testing.assert_close(ret[0, :5], rewards[0, :5].flip(0).cumsum(0).flip(0))


def test_ppo_losses_equal_their_formulas():
    from gpt_minimind.train_ppo import kl_penalized_rewards, masked_whiten, policy_loss, value_loss

    g = torch.Generator().manual_seed(1)
    logp, old = -torch.rand(3, 4, generator=g) * 2, -torch.rand(3, 4, generator=g) * 2
    adv = torch.randn(3, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    loss, stats = policy_loss(logp, old, adv, mask, 0.2)
    terms, clipped = [], 0
    for i, j in mask.nonzero().tolist():
        r = math.exp(logp[i, j] - old[i, j])
        terms.append(max(-adv[i, j].item() * r, -adv[i, j].item() * min(max(r, 0.8), 1.2)))
        clipped += abs(r - 1) > 0.2
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert stats["clip_fraction"] == pytest.approx(clipped / len(terms)) and 0 < clipped < len(terms)
    v, v_old, ret = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    vl = value_loss(v, v_old, ret, mask, 0.2)
    terms = [max((v[i, j] - ret[i, j]) ** 2, (v_old[i, j] + (v[i, j] - v_old[i, j]).clamp(-0.2, 0.2) - ret[i, j]) ** 2)
             for i, j in mask.nonzero().tolist()]
    assert vl.item() == pytest.approx(0.5 * sum(t.item() for t in terms) / len(terms), rel=1e-5)
    w = masked_whiten(adv, mask)
    assert w[mask].mean().abs() < 1e-6 and w[mask].std().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask] == 0).all()
    rewards = kl_penalized_rewards(logp, old, torch.tensor([1.0, 2.0, 3.0]), mask, 0.1)
    expected = -0.1 * (logp - old) * mask
    expected[0, 2] += 1.0
    expected[1, 3] += 2.0
    expected[2, 0] += 3.0
    torch.testing.assert_close(rewards, expected)


def test_one_ppo_step_moves_the_policy_toward_the_rewarded_token():
    """Rollouts from a tiny random policy, scored 1 when the answer starts with one chosen token: after one
    PPO update the policy gives that token more probability, and the value model moved toward the returns."""
    from gpt_minimind.rlhf import sample_answers
    from gpt_minimind.train_ppo import PPOConfig, make_rollouts, ppo_update

    policy, reference, value = tiny_model(), tiny_model(), tiny_reward_model()

    class Tok:
        eos_token_id = 2

    prompt = [5, 6, 7, 8]
    answers = sample_answers(policy, Tok, prompt, 32, 3, 1.0, torch.Generator().manual_seed(0))
    firsts = [a[0] for a in answers]
    target = max(set(firsts), key=firsts.count)  # a token some answers start with, and some do not
    assert 0 < firsts.count(target) < len(answers)
    scores = torch.tensor([float(a[0] == target) for a in answers])
    cfg = PPOConfig(ppo_epochs=2, minibatch_size=8, kl_coef=0.01, missing_eos_penalty=0.0, target_kl=1e9)
    ro = make_rollouts(policy, reference, value, [prompt] * len(answers), answers, scores, cfg, 0, 2)
    p_before = policy(torch.tensor([prompt]))["logits"][0, -1].softmax(-1)[target].item()
    v_err_before = ((ro.old_values - ro.returns)[ro.mask] ** 2).mean()
    opt = torch.optim.AdamW([{"params": list(policy.parameters()), "lr": 1e-2},
                             {"params": list(value.parameters()), "lr": 1e-2}])
    stats, epochs = ppo_update(policy, value, opt, ro, cfg, seed=0)
    assert epochs == 2 and len(stats["policy_loss"]) == 8
    with torch.no_grad():
        p_after = policy(torch.tensor([prompt]))["logits"][0, -1].softmax(-1)[target].item()
        v_err_after = ((answer_values(value, ro) - ro.returns)[ro.mask] ** 2).mean()
    assert p_after > 2 * p_before  # (0.010 -> 0.032 when written)
    assert v_err_after < v_err_before


def test_ppo_epochs_stop_early_past_the_kl_target():
    from gpt_minimind.train_ppo import PPOConfig, make_rollouts, ppo_update

    policy, reference, value = tiny_model(), tiny_model(), tiny_reward_model()
    answers = [[10 + i, 2] for i in range(8)]
    cfg = PPOConfig(ppo_epochs=4, minibatch_size=4, target_kl=1e-9)
    ro = make_rollouts(policy, reference, value, [[5, 6, 7]] * 8, answers, torch.linspace(-1, 1, 8), cfg, 0, 2)
    opt = torch.optim.SGD(list(policy.parameters()) + list(value.parameters()), lr=0.5)
    stats, epochs = ppo_update(policy, value, opt, ro, cfg, seed=0)
    assert epochs == 1 and len(stats["approx_kl"]) == 2  # the first update is free (pi = pi_old), the second stops
    assert stats["approx_kl"][0] == pytest.approx(0.0, abs=1e-7) and stats["approx_kl"][1] > 1.5e-9
    stats, epochs = ppo_update(policy, value, opt, ro, PPOConfig(ppo_epochs=4, minibatch_size=4, target_kl=1e9), 0)
    assert epochs == 4 and len(stats["approx_kl"]) == 8


def test_adaptive_kl_controller_moves_beta_toward_the_target():
    from gpt_minimind.train_ppo import AdaptiveKLController

    ctl = AdaptiveKLController(beta=0.1, target=0.5, horizon=100)
    assert ctl.update(1.0, 50) == pytest.approx(0.1 * (1 + 0.2 * 0.5))  # KL twice the target: +20 % x 50/100
    assert ctl.update(0.4, 100) == pytest.approx(0.11 * (1 - 0.2))  # KL 20 % under: -20 %
    assert ctl.update(0.5, 100) == pytest.approx(0.088)  # on target: unchanged
    assert AdaptiveKLController(0.1, 0.0, 100).update(5.0, 100) == 0.1  # target 0: a fixed beta


def answer_values(value, ro):
    from gpt_minimind.train_ppo import answer_aligned

    return answer_aligned(value(ro.x)["values"], ro.starts, ro.mask.shape[1])


def test_reward_model_then_ppo_runs_and_resumes(base_dir, tmp_path):
    """train_reward on a pairs file learns to rank the pairs; train_ppo on a prompts file runs from the SFT
    model with that reward model, and a run stopped after 2 of 4 steps resumes to the same weights."""
    from gpt_minimind.train_ppo import PPOConfig
    from gpt_minimind.train_ppo import main as ppo_main
    from gpt_minimind.train_reward import RewardConfig
    from gpt_minimind.train_reward import main as reward_main

    rows, prompts = [], []
    for a in range(10):
        for b in range(4):
            prompt = [{"role": "user", "content": f"计算：{a}+{b}="}]
            rows.append({"chosen": prompt + [{"role": "assistant", "content": str(a + b)}],
                         "rejected": prompt + [{"role": "assistant", "content": "谢谢"}]})
            prompts.append({"conversations": prompt + [{"role": "assistant", "content": str(a + b)}]})
    pairs, convs = tmp_path / "pairs.jsonl", tmp_path / "prompts.jsonl"
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    convs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in prompts))
    rcfg = apply_overrides(RewardConfig(), dict(init_from=str(base_dir["base"]), data_file=str(pairs),
                                                out_dir=str(tmp_path / "rm"), batch_size=8, max_iters=12, lr=3e-3,
                                                lm_weight=0.1, warmup_iters=2, eval_every=12, save_every=12, threads=1,
                                                dpo_model=str(tmp_path / "none")))
    s = reward_main(rcfg)["summary"]
    assert s["after"]["pair_accuracy"] == 1.0 and s["export_max_score_difference"] < 1e-5
    common = dict(init_from=str(base_dir["base"]), reward_model=str(tmp_path / "rm" / "final"), data_file=str(convs),
                  prompts_per_step=4, samples_per_prompt=2, minibatch_size=4, max_new_tokens=4, max_iters=4,
                  warmup_iters=1, eval_every=4, save_every=2, eval_questions=4, threads=1, lr=1e-3)
    cfg = apply_overrides(PPOConfig(), dict(common, out_dir=str(tmp_path / "ppo")))
    ppo_main(cfg)
    full = load_model(tmp_path / "ppo" / "final", "cpu")[0].state_dict()
    start = load_model(base_dir["base"], "cpu")[0].state_dict()
    assert any(not torch.equal(full[k], start[k]) for k in full)  # PPO changed the policy
    shutil.rmtree(tmp_path / "ppo" / "checkpoints" / "step_000004")  # as if stopped after step 2
    (tmp_path / "ppo" / "checkpoints" / "latest").write_text("step_000002\n")
    ppo_main(apply_overrides(cfg, {"resume": True}))
    again = load_model(tmp_path / "ppo" / "final", "cpu")[0].state_dict()
    for k in full:
        assert torch.equal(full[k], again[k]), k  # bit for bit
    lines = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert {"score", "kl_to_ref", "entropy", "clip_fraction", "value_loss", "explained_variance"} <= set(
        k for line in lines for k in line)


def test_kl_to_reference_and_reward_scores_used_by_eval(base_dir):
    """eval.py's two RLHF columns: the KL estimate is exactly 0 for the reference itself and positive for a
    changed policy; score_answers scores the chat-template row up to the answer's end-of-turn token."""
    from gpt_minimind.model import MiniMindForSequenceClassification
    from gpt_minimind.rlhf import kl_to_reference, prompt_ids, score_answers

    tok = base_dir["tok"]
    policy, reference = load_model(base_dir["base"], "cpu")[0], load_model(base_dir["base"], "cpu")[0]
    prompts = [[{"role": "user", "content": f"计算：{a}+{a}="}] for a in range(10)]
    assert kl_to_reference(policy, reference, tok, prompts, 6) == 0.0
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert kl_to_reference(policy, reference, tok, prompts, 6) > 0.01  # (0.038 when written)
    rm = MiniMindForSequenceClassification.from_causal_lm(reference)
    torch.nn.init.normal_(rm.score.weight)
    got = score_answers(rm, tok, prompts[:2], ["2", "谢谢"])
    for i, text in enumerate(["2", "谢谢"]):
        # the row the reward model was trained on (encode_chat) = the row PPO scores: prompt + answer + <|im_end|>
        ids, _ = encode_chat(tok, prompts[i] + [{"role": "assistant", "content": text}], 64)
        assert ids == prompt_ids(tok, prompts[i]) + tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        torch.testing.assert_close(got[i], rm(torch.tensor([ids]))["scores"][0])


def test_rollouts_align_answers_of_different_prompt_lengths():
    """A batch mixing a long prompt with a short answer and a short prompt with a long answer: each answer's
    mask, log-probabilities and values are its own tokens', nothing read from padding or the prompt."""
    from gpt_minimind.train_ppo import PPOConfig, make_rollouts

    policy, reference, value = tiny_model(), tiny_model(), tiny_reward_model()
    prompts, answers = [list(range(5, 15)), [5, 6, 7, 8, 9]], [[20, 2], [30, 31, 32, 2]]
    ro = make_rollouts(policy, reference, value, prompts, answers, torch.tensor([1.0, -1.0]), PPOConfig(), 0, 2)
    assert ro.mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    with torch.no_grad():
        for i, (p, a) in enumerate(zip(prompts, answers)):
            row = torch.tensor([p + a])
            logp = policy(row)["logits"][0].log_softmax(-1)
            expected = torch.stack([logp[len(p) - 1 + j, t] for j, t in enumerate(a)])
            torch.testing.assert_close(ro.old_logp[i, :len(a)], expected, atol=1e-5, rtol=1e-5)
            values = value(row)["values"][0, len(p) - 1:len(p) - 1 + len(a)]
            torch.testing.assert_close(ro.old_values[i, :len(a)], values, atol=1e-5, rtol=1e-5)
    assert (ro.old_logp[0, 2:] == 0).all() and (ro.returns[0, 2:] == 0).all() and (ro.advantages[0, 2:] == 0).all()


def test_pair_batches_resume_mid_epoch_with_the_same_batches():
    from gpt_minimind.preference import pair_batches

    full = list(pair_batches(10, 3, seed=7, start=0, max_iters=8))  # 3 batches an epoch; the 10th pair waits
    assert [s for s, _ in full] == list(range(8)) and all(len(idx) == 3 for _, idx in full)
    assert [idx for _, idx in full[:3]] != [idx for _, idx in full[3:6]]  # a new order each epoch
    assert list(pair_batches(10, 3, seed=7, start=4, max_iters=8)) == full[4:]
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(pair_batches(2, 3, seed=7, start=0, max_iters=1))
