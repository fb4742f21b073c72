"""T5 from scratch against transformers' T5ForConditionalGeneration; the relative position buckets;
span corruption's statistics and inverse; the data cleaning."""

import random

import pytest
import torch

from t5_summarization import dataset
from t5_summarization.model import T5Config, T5ForConditionalGeneration, relative_position_bucket, to_hf_config


def tiny(**kw) -> T5Config:
    base = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0)
    return T5Config(**{**base, **kw})


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
def test_logits_and_loss_equal_transformers(ff):
    from transformers import T5ForConditionalGeneration as HFT5

    torch.manual_seed(0)
    cfg = tiny(feed_forward_proj=ff)
    hf = HFT5(to_hf_config(cfg)).eval()
    ours = T5ForConditionalGeneration(cfg).eval()
    ours.load_state_dict(hf.state_dict())
    ids = torch.randint(3, 99, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, 22:] = 0  # the second source is padded
    labels = torch.randint(3, 99, (2, 25))
    labels[0, 20:] = -100
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    loss, logits = ours(ids, mask, labels)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, ref.loss)


def test_our_state_dict_loads_into_transformers():
    from transformers import T5ForConditionalGeneration as HFT5

    cfg = tiny()
    ours = T5ForConditionalGeneration(cfg).eval()
    hf = HFT5(to_hf_config(cfg)).eval()
    result = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"encoder.embed_tokens.weight",
                                                                       "decoder.embed_tokens.weight", "lm_head.weight"}
    ids = torch.randint(3, 99, (1, 12))
    dec = torch.randint(3, 99, (1, 7))
    torch.testing.assert_close(ours(ids, decoder_input_ids=dec)[1], hf(input_ids=ids, decoder_input_ids=dec).logits,
                               atol=1e-5, rtol=1e-4)


def test_relative_position_buckets_equal_transformers_and_are_shared_by_layers():
    from transformers.models.t5.modeling_t5 import T5Attention as HFAttention

    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        ours = relative_position_bucket(rel, bidirectional, 32, 128)
        ref = HFAttention._relative_position_bucket(rel, bidirectional, 32, 128)
        assert torch.equal(ours, ref)
    ours = relative_position_bucket(rel, False, 32, 128)
    assert (ours[rel > 0] == 0).all()  # the decoder cannot tell future keys apart: they are masked anyway
    model = T5ForConditionalGeneration(tiny())
    owners = [n for n, _ in model.named_parameters() if "relative_attention_bias" in n]
    assert owners == ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                      "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]


def test_decoding_with_the_cache_equals_the_full_forward():
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(tiny()).eval()
    ids = torch.randint(3, 99, (2, 10))
    dec = torch.randint(3, 99, (2, 6))
    enc = model.encode(ids)
    full, _ = model.decode(dec, enc)
    steps, cache = [], None
    for t in range(6):
        logits, cache = model.decode(dec[:, t: t + 1], enc, cache=cache)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ data


def test_span_corruption_statistics_and_inverse():
    rng = random.Random(0)
    sentinels = list(range(1000, 1100))
    noise, spans, total = 0, 0, 0
    for n in range(50, 250):
        ids = list(range(10, 10 + n))
        inputs, targets = dataset.span_corrupt(ids, sentinels, rng)
        assert dataset.uncorrupt(inputs, targets, sentinels) == ids
        assert inputs[-1] == dataset.EOS and targets[-1] == dataset.EOS
        k = sum(t in sentinels for t in inputs)
        assert targets[:1] == [sentinels[0]] and sum(t in sentinels for t in targets) == k + 1
        noise += len(targets) - 1 - (k + 1)
        spans += k
        total += n
    assert noise / total == pytest.approx(0.15, abs=0.005)
    assert noise / spans == pytest.approx(3.0, abs=0.15)


def test_cleaning_cuts_site_names_and_escapes():
    assert dataset.clean_title("乌什县燃气壁挂炉十大排名介绍-土拨鼠装修网") == "乌什县燃气壁挂炉十大排名介绍"
    assert dataset.clean_title("朝阳法院司法拍卖拍出26套房产") == "朝阳法院司法拍卖拍出26套房产"
    assert dataset.clean_title("某某新闻标题很长的一句话_律师365") == "某某新闻标题很长的一句话"
    body = dataset.clean_body("第一段\\n第二段 http://example.com/x?a=1 电话0571-8888-1234。ＡＢＣ１２３")
    assert body == "第一段 第二段 电话。ABC123"


@pytest.mark.parametrize("seed", [0, 5])
def test_greedy_and_beam_search_equal_transformers_generate(seed):
    from transformers import T5ForConditionalGeneration as HFT5

    from t5_summarization.decoding import beam_search, greedy_decode

    torch.manual_seed(seed)
    cfg = tiny(vocab_size=60, num_decoder_layers=2)
    ours = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        ours.shared.weight[dataset.EOS] *= 4  # make </s> likely, so that beams finish at different lengths
    hf = HFT5(to_hf_config(cfg)).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)
    ids = torch.randint(3, 60, (3, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0

    def hf_rows(out):  # drop the start token; cut after </s> (transformers pads finished rows)
        rows = [r[1:].tolist() for r in out]
        return [r[: r.index(dataset.EOS) + 1] if dataset.EOS in r else r for r in rows]

    for no_repeat in (0, 2):
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=1,
                          no_repeat_ngram_size=no_repeat)
        assert greedy_decode(ours, ids, mask, 12, no_repeat) == hf_rows(ref)
        for length_penalty in (0.6, 2.0):
            ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=4,
                              length_penalty=length_penalty, no_repeat_ngram_size=no_repeat, early_stopping=True)
            assert beam_search(ours, ids, mask, 12, 4, length_penalty, no_repeat) == hf_rows(ref), (no_repeat,
                                                                                                   length_penalty)


def test_rouge_on_characters():
    from t5_summarization.evaluation import rouge_scores

    perfect = rouge_scores(["大巴车与汽车相撞"], ["大巴车与汽车相撞。"])
    assert perfect == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}  # punctuation is not scored
    s = rouge_scores(["汽车相撞大巴"], ["大巴车与汽车相撞"])
    # all 6 candidate chars occur in the 8 reference chars; the longest common subsequence is "汽车相撞" (4)
    assert s["rouge1"] == pytest.approx(100 * 2 * (6 / 6) * (6 / 8) / (6 / 6 + 6 / 8))
    assert s["rougeL"] == pytest.approx(100 * 2 * (4 / 6) * (4 / 8) / (4 / 6 + 4 / 8))


# ------------------------------------------------------------------------------------------ training smoke runs

TINY_MODEL = ["--d-model", "32", "--d-kv", "8", "--num-heads", "4", "--d-ff", "64", "--num-layers", "2",
              "--num-decoder-layers", "2"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny tokenizer and a tiny span-corruption run on the first 300 documents."""
    from common.config import parse_config
    from t5_summarization import train_pretrain

    root = tmp_path_factory.mktemp("t5")
    argv = TINY_MODEL + ["--vocab-size", "2600", "--max-documents", "300", "--seq-len", "48", "--batch-size", "8",
                         "--max-iters", "12", "--warmup-iters", "2", "--eval-every", "6", "--eval-batches", "2",
                         "--save-every", "6", "--keep-checkpoints", "3", "--log-every", "6",
                         "--tokenizer-dir", str(root / "tok"), "--out-dir", str(root / "pre")]
    result = train_pretrain.main(parse_config(train_pretrain.PretrainConfig, argv))
    return root, argv, result


def test_pretraining_loss_falls_and_resume_is_exact(pretrained):
    import shutil

    from common.config import parse_config
    from t5_summarization import train_pretrain

    root, argv, first = pretrained
    assert first["summary"]["initial_valid_loss"] - first["valid_loss"] > 0.3  # held-out span loss falls
    tok = dataset.Tokenizer(root / "tok" / "spiece.model")
    assert tok.vocab_size == 2600 and tok.sentinel(0) > 2 and tok.decode(tok.encode("新闻")) == "新闻"
    # interrupt after the checkpoint at step 6, resume to 12: the same losses and weights
    ckpts = root / "pre" / "checkpoints"
    shutil.rmtree(ckpts / "step_000012")
    (ckpts / "latest").write_text("step_000006\n")
    resumed = train_pretrain.main(parse_config(train_pretrain.PretrainConfig, argv + ["--resume"]))
    assert resumed["summary"]["resumed_at"] == 6
    assert resumed["losses"] == first["losses"][6:]
    for (k, a), b in zip(first["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), k


def test_pretraining_figures_score_every_valid_chunk_and_evaluation_leaves_training_alone(pretrained, monkeypatch,
                                                                                          capsys):
    """Before and after training every non-overlapping chunk of the valid stream is scored (the figures
    results.json records); in training, the same evenly spaced chunks each time, and the log says so. Two runs
    that evaluate differently train to the same weights, and an evaluation moves no global generator."""
    import numpy as np

    from common.config import parse_config
    from common.data import evenly_spaced
    from t5_summarization import train_pretrain

    root, argv, first = pretrained
    valid = np.load(root / "tok" / "pretrain_stream_300.npz")["valid"]
    assert first["summary"]["valid_chunks"] == len(valid) // 48 and first["summary"]["valid_targets"] > 0
    # 16-token chunks, so that one batch of 8 is a real subset of the valid stream
    short = list(argv)  # (a later flag wins)
    short[short.index("--seq-len") + 1] = "16"
    n = len(valid) // 16
    assert n > 8
    calls, real = [], train_pretrain.corrupted_chunks
    monkeypatch.setattr(train_pretrain, "corrupted_chunks",
                        lambda stream, tok, cfg, chunks, seed: calls.append(list(chunks)) or real(stream, tok, cfg,
                                                                                                chunks, seed))
    runs = {}
    for every, batches in (("3", "1"), ("12", "0")):
        calls.clear()
        capsys.readouterr()
        runs[batches] = train_pretrain.main(parse_config(train_pretrain.PretrainConfig, short + [
            "--eval-every", every, "--eval-batches", batches, "--out-dir", str(root / f"pre16_eval{batches}")]))
        runs[batches]["out"], runs[batches]["calls"] = capsys.readouterr().out, sum(calls, [])
    subset, whole = runs["1"], runs["0"]
    # step 0 and the end: every chunk; steps 3, 6, 9, 12: the same 8 evenly spaced ones
    assert subset["calls"] == list(range(n)) + 4 * evenly_spaced(n, 8) + list(range(n))
    assert subset["out"].count(f"(8 of {n} chunks, evenly spaced)") == 4 and f"(all {n} chunks" in subset["out"]
    assert whole["calls"] == 3 * list(range(n)) and "evenly spaced" not in whole["out"]
    assert subset["summary"]["valid_chunks"] == n and subset["valid_loss"] == whole["valid_loss"]
    assert subset["losses"] == whole["losses"]
    for (k, a), b in zip(subset["model"].state_dict().items(), whole["model"].state_dict().values()):
        assert torch.equal(a, b), k
    cfg = parse_config(train_pretrain.PretrainConfig, short)
    tok = dataset.Tokenizer(root / "tok" / "spiece.model")
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    again = train_pretrain.evaluate(whole["model"], valid, tok, cfg, torch.device("cpu"), torch.float32)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert again["loss"] == whole["valid_loss"] and again["chunks"] == n


@pytest.mark.parametrize("strategy", ["full", "gradual", "adapters"])
def test_summarization_strategies_train_and_score(pretrained, tmp_path, strategy):
    from common.config import parse_config
    from t5_summarization import train_summarize

    root, _, first = pretrained
    argv = ["--init-from", str(first["final_dir"]), "--tokenizer", str(root / "tok" / "spiece.model"),
            "--max-train-pairs", "64", "--batch-size", "8", "--max-iters", "8", "--warmup-iters", "1",
            "--eval-every", "8", "--save-every", "8", "--eval-limit", "6", "--max-source-len", "48",
            "--max-target-len", "8", "--strategy", strategy, "--unfreeze-every", "3", "--adapter-dim", "4",
            "--out-dir", str(tmp_path), "--lr", "3e-3"]
    cfg = parse_config(train_summarize.SummarizeConfig, argv)
    result = train_summarize.main(cfg)
    s = result["summary"]
    assert all(0 <= s[d]["rougeL"] <= 100 for d in ("greedy", "beam"))
    assert (tmp_path / "final" / "model.safetensors").exists() and (tmp_path / "loss.png").exists()
    model = train_summarize.build_model(cfg, dataset.Tokenizer(root / "tok" / "spiece.model"))
    total = sum(p.numel() for p in model.parameters())
    counts = [train_summarize.set_trainable(model, cfg, step) for step in (0, 3, 100)]
    if strategy == "full":
        assert counts == [total] * 3
    elif strategy == "adapters":
        assert counts[0] == counts[2] < 0.1 * total
        assert all(p.requires_grad == (".adapter." in n or "layer_norm" in n) for n, p in model.named_parameters())
    else:
        assert counts[0] < counts[1] < counts[2] == total
    # what training actually changed, read back from the saved final weights
    from safetensors.torch import load_file

    init = load_file(str(first["final_dir"] / "model.safetensors"))
    trained = load_file(str(tmp_path / "final" / "model.safetensors"))
    if strategy == "adapters":
        assert set(init) <= set(trained) and any(".adapter." in k for k in trained)
        frozen = [k for k in init if "layer_norm" not in k]  # adapters and layer norms are all it trains
        assert frozen and all(torch.equal(trained[k], init[k]) for k in frozen), \
            [k for k in frozen if not torch.equal(trained[k], init[k])][:5]
    elif strategy == "full":
        first_layer = [k for k in init if k.startswith("encoder.block.0.")]
        assert first_layer and any(not torch.equal(trained[k], init[k]) for k in first_layer)


def test_own_jsonl_data_is_split_by_hash_and_bad_lines_are_named(tmp_path):
    """The LCSTS/NLPCC-style path: one {"text", "summary"} per line (field names are options), split 90/5/5
    by the md5 of the text, cleaned like inews; a record without the field names its file and line."""
    import json

    rows = [{"body": f"第{i}条新闻的正文，讲了一件事情。\\n更多内容见 http://example.com/{i}",
             "title": f"第{i}条新闻的标题_某某网"} for i in range(300)]
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    kw = dict(data_file=str(path), text_field="body", summary_field="title")
    splits = {s: dataset.summarization_pairs(s, **kw) for s in ("train", "dev", "test")}
    texts = [{p["text"] for p in splits[s]} for s in ("train", "dev", "test")]
    assert sum(map(len, texts)) == 300 and not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert 240 <= len(texts[0]) <= 290 and texts[1] and texts[2]  # ~90 / 5 / 5 %
    pair = splits["train"][0]
    assert "http" not in pair["text"] and "\\n" not in pair["text"] and pair["summary"].endswith("的标题")
    path.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n" + json.dumps({"body": "只有正文"}) + "\n",
                    encoding="utf-8")
    with pytest.raises(ValueError, match=r"own\.jsonl:2: missing field\(s\) \['title'\]"):
        dataset.summarization_pairs("train", **kw)


def test_random_init_control_has_the_size_of_its_pretraining_preset(pretrained):
    """``--init-from ""`` is the control for a pretraining run: with ``--preset gpu4gb`` it must be the
    gpu4gb model, not the CPU one."""
    from dataclasses import replace

    from common.config import parse_config
    from t5_summarization import train_pretrain, train_summarize

    tok = dataset.Tokenizer(pretrained[0] / "tok" / "spiece.model")
    for preset in ("cpu", "gpu4gb"):
        cfg = parse_config(train_summarize.SummarizeConfig, ["--preset", preset, "--init-from", ""],
                           train_summarize.PRESETS)
        want = parse_config(train_pretrain.PretrainConfig, ["--preset", preset], train_pretrain.PRESETS)
        with torch.device("meta"):
            model = train_summarize.build_model(cfg, tok)
        got, want = model.config, want.model
        assert (got.dropout_rate, want.dropout_rate) == (0.1, 0.0)  # fine-tuning dropout; pretraining has none
        assert got.vocab_size == tok.vocab_size  # from the tokenizer
        assert replace(got, dropout_rate=0.0, vocab_size=0, adapter_dim=0) == replace(want, vocab_size=0), preset
