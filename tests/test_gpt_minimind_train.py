"""gpt_minimind data, tokenizer, pretraining loop, resume, export and import, on small synthetic text."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from common.config import apply_overrides
from gpt_minimind import export_hf, train_tokenizer
from gpt_minimind.dataset import (
    PackedBlocks,
    clean_text,
    clean_title,
    dedup,
    encode_documents,
    ngram_baselines,
    pad_rows,
    split_documents,
    untag_peoples_daily,
)
from gpt_minimind.engine import ChunkedLossCausalLM
from gpt_minimind.model import MiniMindConfig, MiniMindForCausalLM
from gpt_minimind.train_pretrain import PretrainConfig, main

SUBJECTS = ["小明", "老师", "记者", "市政府", "我们"]
VERBS = ["今天去了", "昨天看见", "正在建设", "喜欢"]
OBJECTS = ["北京。", "新的学校。", "一座大桥。", "公园里的花。"]


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    """Short Chinese documents from a tiny grammar: a model learns them in a few dozen steps."""
    rng = random.Random(seed)
    return ["".join(rng.choice(SUBJECTS) + rng.choice(VERBS) + rng.choice(OBJECTS) for _ in range(rng.randint(3, 8)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt")
    path = d / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in synthetic_docs(1500)))
    tok_dir = d / "tokenizer"
    stats = train_tokenizer.main(train_tokenizer.TokenizerConfig(vocab_size=600, data_file=str(path),
                                                                 out_dir=str(tok_dir)))
    return {"dir": d, "jsonl": path, "tokenizer": tok_dir, "stats": stats}


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=32, batch_size=8, lr=3e-3, warmup_iters=5,
            eval_every=20, save_every=10, log_every=5, eval_blocks=16, threads=1, samples=["小明"])


def tiny_cfg(tmp_path, corpus, **kw) -> PretrainConfig:
    paths = {"out_dir": str(tmp_path / "run"), "data_file": str(corpus["jsonl"]),
             "tokenizer_dir": str(corpus["tokenizer"])}
    return apply_overrides(PretrainConfig(), {**TINY, **paths, **kw})


def test_tokenizer_is_a_transformers_tokenizer_with_chat_template(corpus):
    tok = AutoTokenizer.from_pretrained(corpus["tokenizer"])
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "小明今天去了北京。Hello 123"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: lossless, no unknowns
    chat = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert corpus["stats"]["chars_per_token_valid"] > 1.5  # merges found the grammar's words


def test_cleaning_and_untagging():
    assert untag_peoples_daily("迈向/v  充满/v  [中央/n  电视台/n]nt  。/w") == "迈向充满中央电视台。"
    assert clean_text("１２月  访问 https://x.cn/a?b=1 请加微信abcdefghijklmnop123\u200b") == "12月 访问 请加微信"
    assert clean_text("，。") == "，。"  # full-width punctuation is kept
    assert clean_title("律师你好，请问我在珍爱网上看到_律师365") == "律师你好，请问我在珍爱网上看到"
    assert dedup(["甲乙丙" * 30, "甲乙丙" * 30, "丁" * 10]) == ["甲乙丙" * 30, "丁" * 10]
    docs = synthetic_docs(200)
    a, b = split_documents(docs), split_documents(list(reversed(docs)))  # membership does not depend on order
    assert set(a["valid"]) == set(b["valid"]) and a["valid"] and not set(a["valid"]) & set(a["train"])


def test_packed_blocks_shift_by_one():
    stream = encode_documents(["abcdefg", "hij"], lambda s: [ord(c) for c in s], 1, 2)
    blocks = PackedBlocks(stream, 4)
    x, y = blocks.get(torch.tensor([0, 1]))
    assert x[0].tolist() == [1, 97, 98, 99] and y[0].tolist() == [97, 98, 99, 100]
    assert torch.equal(x[:, 1:], y[:, :-1])
    # every block index appears once per epoch, in an order fixed by (seed, epoch)
    assert sorted(blocks.batch_order(0, 0).tolist()) == list(range(len(blocks)))
    many = PackedBlocks(torch.arange(101), 4)  # 25 blocks: orders that differ by chance are out of reach
    assert torch.equal(many.batch_order(0, 1), many.batch_order(0, 1))  # recreated exactly on --resume
    assert not torch.equal(many.batch_order(0, 1), many.batch_order(0, 2))  # a new order each epoch
    assert not torch.equal(many.batch_order(0, 1), many.batch_order(1, 1))  # and for each seed


def test_ngram_baselines():
    cycle = torch.tensor([3, 1, 4, 1, 5] * 200)  # after 3 comes 1, after 4 comes 1 ...: bigrams nearly certain
    b = ngram_baselines(cycle, cycle[:50], vocab_size=8)
    assert b["bigram"] < 0.8 < b["unigram"]  # 1 is followed by 4 or 5 half the time: ln 2 per such step
    # unigram: -mean log p with add-one counts, written out
    counts = torch.bincount(cycle, minlength=8).double() + 1
    assert b["unigram"] == pytest.approx(-(counts / counts.sum()).log()[cycle[:50]].mean().item())


def test_padding_adds_nothing_to_the_loss():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2)).eval()
    rows = [[1, 5, 6, 7, 8, 2], [1, 9, 10, 2]]
    x, y, mask = pad_rows(rows, pad_id=0)
    assert (y[1, 3:] == -100).all() and mask[1].tolist() == [1, 1, 1, 0, 0]
    logits = model(x, attention_mask=mask)["logits"]
    per_tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100, reduction="none")
    assert (per_tok[1, 3:] == 0).all()
    # the short row's loss equals the loss computed on it alone, unpadded
    alone = model(x[1:, :3], labels=y[1:, :3])["loss"]
    torch.testing.assert_close(per_tok[1, :3].mean(), alone)


def test_pretraining_loss_falls_then_export_loads_in_transformers(tmp_path, corpus):
    # the head and the loss in chunks (engine.py) in training and evaluation; the export is the plain model
    out = main(tiny_cfg(tmp_path, corpus, max_iters=120, lr=6e-3, loss_chunk_size=16))
    assert isinstance(out["model"], ChunkedLossCausalLM) and out["model"].loss_chunk_size == 16
    first, last = sum(out["losses"][:5]) / 5, sum(out["losses"][-5:]) / 5
    assert last < 0.5 * first, (first, last)
    s = out["summary"]
    assert s["valid_loss"] < 0.5 * s["initial_valid_loss"]
    run = tmp_path / "run"
    assert (run / "metrics.jsonl").exists() and (run / "loss.png").exists()
    for text in s["samples"]["小明"].values():  # greedy and sampled: both continue the prompt
        assert text.startswith("小明") and len(text) > len("小明")
    # export: transformers loads it with no custom code, same logits, same tokenizer
    hf_dir = tmp_path / "hf"
    res = export_hf.main(export_hf.ExportConfig(ckpt=str(run / "final"), out=str(hf_dir)))
    assert res["max_abs_diff"] <= 1e-4
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor([tok.encode("小明今天去了", add_special_tokens=False)])
    torch.testing.assert_close(out["model"].eval()(ids)["logits"], hf(ids).logits, atol=1e-4, rtol=1e-4)
    # generation with transformers from the export gives our greedy tokens
    ours = torch.stack(list(out["model"].generate(ids, 8)), 1)
    theirs = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs[:, ids.shape[1]:])


def test_resume_reproduces_uninterrupted_run_bit_for_bit(tmp_path, corpus):
    full = main(tiny_cfg(tmp_path / "a", corpus, max_iters=20, save_every=10))
    part = main(tiny_cfg(tmp_path / "b", corpus, max_iters=20, save_every=10, resume=False))
    # simulate an interruption at step 10: drop the step-20 checkpoint and resume
    ckpts = tmp_path / "b" / "run" / "checkpoints"
    import shutil

    shutil.rmtree(ckpts / "step_000020")
    (ckpts / "latest").write_text("step_000010")
    resumed = main(tiny_cfg(tmp_path / "b", corpus, max_iters=20, save_every=10, resume=True))
    assert resumed["losses"] == full["losses"][10:]
    for k, v in full["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    assert part["losses"] == full["losses"]


def test_char_tokenizer_text_file(tmp_path):
    text = "\n".join(synthetic_docs(300, seed=1))
    path = tmp_path / "input.txt"
    path.write_text(text, encoding="utf-8")
    out = main(apply_overrides(PretrainConfig(), {**TINY, "out_dir": str(tmp_path / "run"), "text_file": str(path),
                                                   "tokenizer": "char", "max_iters": 40}))
    assert out["summary"]["tokenizer"] == "char"
    assert out["summary"]["valid_loss"] < 0.6 * out["summary"]["initial_valid_loss"]


def test_import_transformers_llama_into_ours(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "llama")
    res = export_hf.main(export_hf.ExportConfig(import_dir=str(tmp_path / "llama"), out=str(tmp_path / "ours")))
    assert res["max_abs_diff"] <= 1e-4
    ours = MiniMindForCausalLM(MiniMindConfig(**json.loads((tmp_path / "ours" / "config.json").read_text())))
    from common.checkpoint import load_pretrained

    load_pretrained(ours, tmp_path / "ours").eval()
    ids = torch.randint(0, 120, (2, 10))
    torch.testing.assert_close(ours(ids)["logits"], hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_bad_jsonl_line_names_file_and_line(tmp_path, corpus):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "好"}\n{"txt": "坏"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field\(s\) \['text'\]"):
        main(tiny_cfg(tmp_path, corpus, data_file=str(bad)))


def test_memory_estimate_terms_scale_as_they_should():
    from common.bench import time_interleaved
    from gpt_minimind.bench import estimate_training_memory

    cfg = MiniMindConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2)
    a, b = estimate_training_memory(cfg, 4, 32), estimate_training_memory(cfg, 8, 32)
    assert a["weights_grads_adam"] == b["weights_grads_adam"] == 16 * a["params"]  # fp32 weights, grads, 2 moments
    assert b["activations"] == 2 * a["activations"] and b["head"] == 2 * a["head"]
    assert estimate_training_memory(cfg, 8, 32, checkpointing=True)["activations"] < b["activations"]
    # chunked head and loss: one chunk's logits instead of all positions', plus the stored gradients of h and W
    heads = [estimate_training_memory(cfg, 8, 32, loss_chunk_size=k)["head"] for k in (16, 32)]
    assert heads[0] < heads[1] < b["head"]  # grows with the chunk, stays below the whole logits'
    assert heads[1] - heads[0] == 2 * 16 * 500 * 4  # 16 more rows of logits and of their exp, fp32
    calls = []
    timed = time_interleaved({"x": lambda: calls.append("x"), "y": lambda: calls.append("y")}, repeats=3, warmup=0)
    assert calls == ["x", "y"] * 3 and set(timed) == {"x", "y"}  # rounds alternate the contenders


def test_bench_records_carry_the_paired_medians():
    from gpt_minimind.bench import bench_records

    ratio = {"median": 1.4, "low": 1.1, "high": 1.6}
    speed = {"train_step": {"ours (sdpa)": {"step_s": 0.7, "vs_transformers_sdpa": {**ratio, "median": 0.95}},
                            "ours (sdpa), chunked loss": {"step_s": 0.65,
                                                          "vs_transformers_sdpa": {**ratio, "median": 1.1}},
                            "ours (sdpa), bf16 autocast": {"step_s": 0.3, "vs_transformers_sdpa": ratio},
                            "ours (math attention), chunked loss, bf16 autocast": {
                                "step_s": 0.25, "vs_transformers_sdpa": ratio,
                                "vs_transformers_sdpa_bf16": {**ratio, "median": 1.3}}},
             "generate": {"ours, KV cache": {"s": 0.2, "vs_transformers_generate": ratio}}}
    nano = {"nanogpt": {"tokens_per_s": 100.0, "val_loss": 1.9},
            "ours": {"tokens_per_s": 98.0, "val_loss": 1.6, "loop_s": 10.0},
            "ours_bf16": {"tokens_per_s": 121.0, "val_loss": 1.6, "loop_s": 8.0}}
    records = {(r["run"], r["metric"]): r for r in bench_records({"speed": speed, "nanogpt": nano})}
    assert records[("train_step_fp32", "speed_vs_transformers")]["value"] == 0.95
    assert records[("train_step_fp32_chunked_loss", "speed_vs_transformers")]["value"] == 1.1
    assert records[("generate_kv_cache", "speed_vs_transformers")]["value"] == 1.4
    both16 = records[("train_step_bf16_math_attention_chunked_loss_vs_bf16", "speed_vs_transformers")]
    assert (both16["value"], both16["baseline"]) == (1.3, "transformers_llama_sdpa_bf16_autocast")
    assert ("train_step_bf16_autocast_vs_bf16", "speed_vs_transformers") not in records  # no bf16 pairing: no record
    bf16 = records[("nanogpt_baby_bf16_autocast", "tokens_per_s")]
    assert (bf16["value"], bf16["baseline_value"]) == (121.0, 100.0)
    assert ("generate_kv_cache_compiled", "speed_vs_transformers") not in records  # not measured: no record
    assert bench_records({}) == []


def test_token_products_times_both_layouts_of_every_decoding_product():
    from gpt_minimind.bench import token_products

    model = MiniMindForCausalLM(MiniMindConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2))
    out = token_products(model, repeats=2, tokens=1)
    assert out["n_products"] == 4 * 2 + 1  # per layer q/k/v, o, gate/up, down; then the head
    weights = sum(p.numel() for n, p in model.named_parameters() if "norm" not in n)  # (tied: the head once)
    assert out["megabytes"] == weights * 4 / 1e6  # each matrix once (tied head: the embedding's matrix)
    assert out["packed_vs_linear"]["low"] > 0 and len(out["rows"]) == 2


def test_pretrain_flags_are_the_model_config_and_old_flags_still_work(capsys):
    from common.config import parse_config
    from gpt_minimind.train_pretrain import PRESETS

    cfg = parse_config(PretrainConfig, ["--hidden-size", "512", "--max-position-embeddings", "64"])
    # fields derived from others follow them (0 = derived): 8/3 * 512 rounded up to 64, the RoPE length
    assert (cfg.model.intermediate_size, cfg.model.original_max_position_embeddings) == (1408, 64)
    assert parse_config(PretrainConfig, ["--preset", "gpu4gb"], PRESETS).model.intermediate_size == 1408
    old = parse_config(PretrainConfig, ["--dim", "512", "--block-size", "64", "--n-experts", "3",
                                        "--no-tie-embeddings"])
    assert old == parse_config(PretrainConfig, ["--hidden-size", "512", "--max-position-embeddings", "64",
                                                "--num-experts", "3", "--no-tie-word-embeddings"])
    err = capsys.readouterr().err
    assert "--dim is deprecated" in err and "use --hidden-size" in err and "use --no-tie-word-embeddings" in err


def test_a_vocab_size_that_disagrees_with_the_tokenizer_is_refused(tmp_path, corpus):
    with pytest.raises(SystemExit, match=r"--vocab-size 999, but the bpe tokenizer has \d+ tokens: leave"):
        main(tiny_cfg(tmp_path, corpus, vocab_size=999, max_iters=1))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_pretraining_trains_in_fp32_and_in_bf16(tmp_path, corpus, dtype, capsys):
    """Both precisions --dtype auto can pick on a CPU train; bf16 on a CPU takes the written-out attention."""
    out = main(tiny_cfg(tmp_path, corpus, max_iters=40, lr=6e-3, dtype=dtype, eval_every=40, save_every=40))
    first, last = sum(out["losses"][:5]) / 5, sum(out["losses"][-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert out["model"].config.attn_impl == ("math" if dtype == "bf16" else "sdpa")
    assert out["summary"]["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    assert f"dtype: {'fp32' if dtype == 'fp32' else 'bf16 autocast'} (--dtype {dtype})" in capsys.readouterr().out


def test_the_precision_line_says_why(monkeypatch):
    from gpt_minimind import train_pretrain

    cpu = torch.device("cpu")
    monkeypatch.setattr(train_pretrain, "cpu_bf16_support", lambda: (True, "x86 CPU with amx_bf16"))
    assert train_pretrain.describe_dtype("auto", cpu, torch.bfloat16) == (
        "bf16 autocast (x86 CPU with amx_bf16: native bf16 matrix units; --dtype fp32 to turn it off)")
    monkeypatch.setattr(train_pretrain, "cpu_bf16_support", lambda: (False, "x86 CPU without AVX512-BF16/AMX"))
    assert train_pretrain.describe_dtype("auto", cpu, torch.float32) == (
        "fp32 (x86 CPU without AVX512-BF16/AMX: bf16 would be emulated, slower than fp32)")


def test_the_default_step_count_follows_the_precision():
    from gpt_minimind.train_pretrain import resolve_steps

    def steps(cfg, dtype):
        cfg = resolve_steps(cfg, dtype)
        return cfg.max_iters, cfg.warmup_iters

    assert steps(PretrainConfig(), torch.bfloat16) == (3300, 330)
    assert steps(PretrainConfig(), torch.float32) == (2100, 210)
    assert steps(apply_overrides(PretrainConfig(), {"max_iters": 50, "warmup_iters": 7}), torch.float32) == (50, 7)


def _tiny_causal(vocab: int = 11, block: int = 16) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1,
                                               max_position_embeddings=block))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # far from uniform, so every wrong context or target changes the loss
    return model.eval()


def test_split_loss_scores_every_position_once_with_its_window_context():
    from gpt_minimind.bench import split_loss

    block, model = 16, _tiny_causal()
    ids = torch.randint(0, 11, (150,), generator=torch.Generator().manual_seed(1))  # 149 targets: 9 windows + a tail
    with torch.no_grad():
        naive = []
        for t in range(1, len(ids)):  # target t sees the tokens from its window's start up to t - 1
            start = (t - 1) // block * block
            logits = model(ids[None, start:t])["logits"][0, -1]
            naive.append(torch.nn.functional.cross_entropy(logits[None], ids[t:t + 1]).item())
    for batch_size in (1, 4, 32):
        loss, count = split_loss(lambda x: model(x)["logits"], ids, block, batch_size=batch_size)
        assert count == len(ids) - 1
        assert loss == pytest.approx(sum(naive) / len(naive), rel=1e-5)


NANO_MODEL_PY = '''
from dataclasses import dataclass
import torch
import torch.nn.functional as F

@dataclass
class GPTConfig:
    vocab_size: int = 11

class GPT(torch.nn.Module):
    """nanoGPT's interface: forward(idx, targets) -> (logits, loss), logits at every position only with targets."""
    def __init__(self, config):
        super().__init__()
        self.table = torch.nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(self, idx, targets=None):
        logits = self.table(idx)
        if targets is None:
            return logits[:, [-1]], None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))  # views, as nanoGPT
'''


def test_nanogpt_comparison_scores_both_sides_with_one_function(tmp_path, monkeypatch):
    """The headline losses of the nanoGPT comparison: nanoGPT's ckpt.pt (through its own model.py) and our
    final directories all go through split_loss, on the same ids with the same window."""
    from common.checkpoint import save_pretrained
    from gpt_minimind import bench

    (tmp_path / "nano").mkdir()
    (tmp_path / "nano" / "model.py").write_text(NANO_MODEL_PY)
    torch.manual_seed(0)
    table = torch.randn(11, 11)
    torch.save({"model": {"_orig_mod.table.weight": table}, "model_args": {"vocab_size": 11}, "iter_num": 5},
               tmp_path / "ckpt.pt")  # as a compiled nanoGPT run saves it
    ours = _tiny_causal()
    save_pretrained(ours, ours.config.to_dict(), tmp_path / "ours")
    ids = torch.randint(0, 11, (100,), generator=torch.Generator().manual_seed(2))

    calls, real = [], bench.split_loss
    monkeypatch.setattr(bench, "split_loss", lambda fn, i, b, **kw: calls.append((i, b)) or real(fn, i, b, **kw))
    scores = bench.score_final_checkpoints(tmp_path / "nano", tmp_path / "ckpt.pt", {"ours": tmp_path / "ours"},
                                           ids, block=16)
    assert len(calls) == 2 and all(i is ids and b == 16 for i, b in calls)
    bigram = torch.nn.functional.cross_entropy(table[ids[:-1]], ids[1:]).item()  # a table sees one token back
    assert scores["nanogpt"] == pytest.approx(bigram, rel=1e-5)
    with torch.no_grad():
        assert scores["ours"] == pytest.approx(real(lambda x: ours(x)["logits"], ids, 16)[0], rel=1e-6)
    assert scores["ours"] != pytest.approx(scores["nanogpt"], rel=1e-3)


def test_training_estimates_use_spread_blocks_and_say_so_while_the_summary_scores_all(tmp_path, corpus, capsys):
    import re

    from gpt_minimind.train_pretrain import subset_blocks

    assert subset_blocks(10, 0).tolist() == list(range(10)) and subset_blocks(10, 20).tolist() == list(range(10))
    assert subset_blocks(100, 4).tolist() == [12, 37, 62, 87]  # one block from the middle of each quarter
    out = main(tiny_cfg(tmp_path, corpus, max_iters=20, eval_every=10, save_every=20, eval_blocks=2))
    lines = re.findall(r"step \d+/20 \| valid loss [\d.]+ \| ppl [\d.]+ \(2 of (\d+) valid blocks, evenly spaced\)",
                       capsys.readouterr().out)
    assert len(lines) == 3  # steps 0, 10, 20
    n_valid = int(lines[0])
    assert n_valid > 2
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["valid_blocks"] for r in records if "valid_loss" in r] == [2, 2, 2]
    assert out["summary"]["valid_tokens"] == n_valid * TINY["max_position_embeddings"]  # the figure: every block
