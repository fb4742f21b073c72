"""bert_address_cls: BERT against transformers, the masking statistics, the address data and labels."""

import json

import pytest
import torch
from transformers import BertConfig as HFBertConfig
from transformers import BertForPreTraining as HFBertForPreTraining

from bert_address_cls.model import BertConfig, BertForAddressParsing, BertForPreTraining, BertModel

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_twin(**kw):
    torch.manual_seed(0)
    cfg = HFBertConfig(**{**TINY, **kw})
    return HFBertForPreTraining(cfg).eval()


def padded_batch(vocab: int = 99):
    torch.manual_seed(1)
    ids = torch.randint(1, vocab, (3, 12))
    mask = torch.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = 0, 0  # a shorter second row, padded
    ids[2, 3:], mask[2, 3:] = 0, 0
    return ids, mask


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_bert_equals_transformers_with_equal_weights(attn_impl):
    hf = hf_twin()
    ours = BertForPreTraining(BertConfig(**TINY, attn_impl=attn_impl)).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    # transformers keeps the tied decoder weight and its bias twice under other names; nothing else differs
    assert set(unexpected) <= {"cls.predictions.decoder.bias", "bert.embeddings.position_ids",
                               "bert.embeddings.token_type_ids"}, unexpected
    assert not missing, missing
    ids, mask = padded_batch()
    types = torch.zeros_like(ids)
    types[0, 6:] = 1  # a second segment in the first row
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        mine = ours(ids, mask, types)
        h_ours, pooled_ours = ours.bert(ids, mask, types)
        pooled_theirs = hf.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output
    real = mask.bool()  # padded positions' outputs are meaningless on both sides
    torch.testing.assert_close(h_ours[real], theirs.hidden_states[-1][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled_ours, pooled_theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine["mlm_logits"][real], theirs.prediction_logits[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.cls.seq_relationship(pooled_ours), theirs.seq_relationship_logits,
                               atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_real_tokens():
    model = BertModel(BertConfig(**TINY)).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        full, _ = model(ids, mask)
        alone, _ = model(ids[1:2, :7], mask[1:2, :7])
    torch.testing.assert_close(full[1, :7], alone[0], atol=1e-5, rtol=1e-5)


def test_bidirectional_a_later_token_changes_an_earlier_output():
    model = BertModel(BertConfig(**TINY)).eval()
    ids = torch.randint(1, 99, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] % 98) + 1
    with torch.no_grad():
        assert not torch.allclose(model(ids)[0][0, 0], model(changed)[0][0, 0])


def test_mlm_decoder_is_tied_to_the_word_embeddings():
    model = BertForPreTraining(BertConfig(**TINY))
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_address_parser_heads_and_losses():
    model = BertForAddressParsing(BertConfig(**TINY), num_tags=7, num_provinces=5).eval()
    ids, mask = padded_batch()
    tags = torch.randint(0, 7, ids.shape).masked_fill(mask == 0, -100)
    out = model(ids, mask, tags=tags, province=torch.tensor([0, 3, 4]))
    assert out["tag_logits"].shape == (3, 12, 7) and out["province_logits"].shape == (3, 5)
    assert torch.isclose(out["loss"], out["tag_loss"] + out["province_loss"])
    names = {n for n, p in model.named_parameters() if any(p is q for q in model.head_parameters())}
    assert names == {"classifier.weight", "classifier.bias", "province_classifier.weight", "province_classifier.bias"}


# ---------------------------------------------------------------------------------------------------
# real weights: all-MiniLM-L6-v2 (an English BERT) through our model and through transformers
# ---------------------------------------------------------------------------------------------------

def test_real_minilm_weights_give_transformers_outputs():
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from transformers import BertModel as HFBertModel

    from bert_address_cls.dataset import minilm_dir
    from bert_address_cls.model import from_hf_state_dict
    from common.checkpoint import read_config

    path = minilm_dir()
    hf = HFBertModel.from_pretrained(path).eval()
    ours = BertModel(BertConfig.from_dict(read_config(path))).eval()
    ours.load_state_dict(from_hf_state_dict(load_file(str(path / "model.safetensors"))))  # strict: names are ours
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["A learner reads the annotated source.", "Addresses, parsed."], padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(**batch)
        h, pooled = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(h[real], theirs.last_hidden_state[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, theirs.pooler_output, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# masked-LM corruption
# ---------------------------------------------------------------------------------------------------

def test_masking_statistics_are_15_percent_and_80_10_10():
    from bert_address_cls.train_mlm import mask_tokens

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (400, 128), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True  # [CLS], [SEP]
    ids[:, 0], ids[:, -1] = 2, 3
    inputs, labels = mask_tokens(ids, special, 1000, 4, g)
    chosen = labels != -100
    assert not chosen[special].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert abs(chosen.float().mean().item() / (126 / 128) - 0.15) < 0.005
    masked = (inputs == 4) & chosen
    unchanged = (inputs == ids) & chosen
    replaced = chosen & ~masked & ~unchanged  # a random token (it may by chance equal the original)
    n = chosen.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(unchanged.sum().item() / n - 0.1 - 0.1 / 995) < 0.01
    assert abs(replaced.sum().item() / n - 0.1) < 0.01
    assert torch.equal(inputs[~chosen], ids[~chosen])
    assert (inputs[replaced] >= 5).all()  # never a special token


# ---------------------------------------------------------------------------------------------------
# the address data
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def splits():
    from bert_address_cls.dataset import build_split

    return {s: build_split(s, n) for s, n in (("train", 3000), ("valid", 300), ("test", 600))}


def test_splits_share_no_town_names(splits):
    from bert_address_cls.dataset import split_of

    towns = {s: {a.meta["town"] for a in v} for s, v in splits.items()}
    assert not towns["train"] & towns["test"] and not towns["train"] & towns["valid"]
    assert all(split_of(t) == "test" for t in towns["test"])
    written = {a.text[s:e] for a in splits["test"] for s, e, f in a.spans if f == "town"}
    train_text = "".join(a.text for a in splits["train"])
    assert sum(t in train_text for t in written) < 0.05 * len(written)  # a few by chance, via other fields


def test_every_character_of_a_field_is_labelled_and_tags_round_trip(splits):
    from bert_address_cls.dataset import SHORT_PROVINCE, spans_to_tags, tags_to_spans

    for a in splits["valid"]:
        assert tags_to_spans(spans_to_tags(len(a.text), a.spans)) == sorted(a.spans)
        outside = set(range(len(a.text))) - {i for s, e, _ in a.spans for i in range(s, e)}
        assert all(a.text[i] in " ，,-" for i in outside), a.text  # only separators are unlabelled
    provinces_written = [(a.text[s:e], a.meta["province"]) for a in splits["valid"] for s, e, f in a.spans
                         if f == "province"]
    ok = [w == p or w == p[:-1] or w == SHORT_PROVINCE.get(p) for w, p in provinces_written]
    assert sum(ok) >= 0.93 * len(ok)  # the rest carry a typo


def test_district_drills_write_neither_province_nor_city(splits):
    from bert_address_cls.dataset import district_drills, drop_fields

    a = next(a for a in splits["valid"] if {"province", "city", "district"} <= {f for _, _, f in a.spans})
    cut = drop_fields(a, {"province", "city"})
    assert cut.text.endswith(a.text[-3:]) and len(cut.text) < len(a.text)
    assert [cut.text[s:e] for s, e, _ in cut.spans] == [a.text[s:e] for s, e, f in sorted(a.spans)
                                                         if f not in ("province", "city")]
    drills = district_drills("valid", 1)
    assert len(drills) > 200 and all(not {"province", "city"} & {f for _, _, f in d.spans} for d in drills)
    assert all(d.spans[0][2] == "district" for d in drills)
    assert sum(d.text.startswith(d.meta["district"]) for d in drills) >= 0.9 * len(drills)  # the rest: typos


def test_strict_bioes_decoding_drops_broken_spans():
    from bert_address_cls.dataset import tags_to_spans

    tags = ["B-city", "I-city", "E-city", "I-road", "E-road", "S-number", "B-poi", "E-room", "O", "B-poi"]
    assert tags_to_spans(tags) == [(0, 3, "city"), (5, 6, "number")]


def test_entity_f1_equals_seqeval(splits):
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOBES

    from bert_address_cls.dataset import FIELDS, entity_scores, spans_to_tags

    gold = [a.spans for a in splits["test"][:300]]
    rng = torch.Generator().manual_seed(0)
    pred = []
    for spans in gold:  # damage some spans: drop, shift, relabel
        out = []
        for s, e, f in spans:
            r = torch.rand(1, generator=rng).item()
            if r < 0.1:
                continue
            if r < 0.2 and e - s > 1:
                s += 1
            if r > 0.9:
                f = FIELDS[(FIELDS.index(f) + 1) % len(FIELDS)]
            out.append((s, e, f))
        pred.append(out)
    n = [len(a.text) for a in splits["test"][:300]]
    theirs = f1_score([spans_to_tags(k, g) for g, k in zip(gold, n)], [spans_to_tags(k, p) for p, k in zip(pred, n)],
                      mode="strict", scheme=IOBES)
    ours = entity_scores(gold, pred)["f1"]
    assert ours < 0.95
    assert ours == pytest.approx(theirs, abs=1e-9)


def test_bad_jsonl_lines_are_named(tmp_path):
    from bert_address_cls.dataset import read_addresses

    cases = {'{"text": "杭州市", "spans": [[0, 3, "town"]]}\n{"text": "杭州市", "spans": [[0, 3, "planet"]]}\n':
             ":2: span [0, 3, 'planet'] has field 'planet'",
             '{"text": "杭州市", "spans": [[0, 9, "city"]]}\n': ":1: span [0, 9, 'city'] lies outside",
             '{"text": "杭州市", "spans": [[0, 2, "city"], [1, 3, "district"]]}\n': ":1: spans [0, 2, 'city'] and",
             '{"text": "杭州市", "spans": [], "province": "杭州"}\n': "province '杭州' is not one of"}
    for i, (body, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(body, encoding="utf-8")
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            list(read_addresses(path))


# ---------------------------------------------------------------------------------------------------
# the training scripts, tiny
# ---------------------------------------------------------------------------------------------------

TINY_RUN = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, threads=1,
                log_every=5)


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, splits):
    """A tiny tokenizer and a tiny MLM run on a small text file + addresses."""
    from bert_address_cls.dataset import train_tokenizer
    from bert_address_cls.train_mlm import MLMConfig
    from bert_address_cls.train_mlm import main as mlm_main
    from common.config import apply_overrides

    d = tmp_path_factory.mktemp("bert")
    texts = [a.text for s in splits.values() for a in s]
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t + "。" + t}, ensure_ascii=False) + "\n"
                                          for t in texts[:800]), encoding="utf-8")
    train_tokenizer(texts, 3000, d / "tok")
    cfg = apply_overrides(MLMConfig(), dict(**TINY_RUN, tokenizer_dir=str(d / "tok"), text_file=str(d / "text.jsonl"),
                                            n_addresses=500, max_iters=40, batch_size=32, lr=3e-3, warmup_iters=5,
                                            eval_every=40, save_every=20, eval_batches=4, out_dir=str(d / "mlm")))
    return {"dir": d, "cfg": cfg, "result": mlm_main(cfg)}


def test_mlm_run_learns_and_writes_a_transformers_checkpoint(mlm_run):
    from transformers import BertForPreTraining as HF

    s = mlm_run["result"]["summary"]
    assert s["final"]["mlm_accuracy"] > s["initial"]["mlm_accuracy"] + 0.03, s
    assert s["final"]["mlm_loss"] < s["initial"]["mlm_loss"] - 1.0, s
    final = mlm_run["result"]["final_dir"]
    hf = HF.from_pretrained(final).eval()  # our directory loads in transformers with no custom code
    ours = BertForPreTraining(BertConfig.from_dict(json.loads((final / "config.json").read_text())))
    from common.checkpoint import load_pretrained

    load_pretrained(ours, final).eval()
    ids = torch.randint(5, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)["mlm_logits"], hf(input_ids=ids).prediction_logits, atol=1e-4, rtol=1e-4)


def test_nsp_run_resumes_to_the_same_weights(mlm_run, capsys):
    import shutil

    from bert_address_cls.train_mlm import main as mlm_main
    from common.checkpoint import load_pretrained
    from common.config import apply_overrides
    from common.log import read_metrics

    d = mlm_run["dir"]
    cfg = apply_overrides(mlm_run["cfg"], {"nsp": True, "max_iters": 12, "save_every": 6, "eval_every": 12,
                                           "out_dir": str(d / "nsp")})
    full = mlm_main(cfg)
    assert 0 <= full["summary"]["final"]["nsp_accuracy"] <= 1
    full_steps = [r["step"] for r in read_metrics(d / "nsp" / "metrics.jsonl")]
    mcfg = BertConfig.from_dict(json.loads((d / "nsp/final/config.json").read_text()))
    weights = lambda: load_pretrained(BertForPreTraining(mcfg), d / "nsp" / "final").state_dict()  # noqa: E731
    before = weights()
    shutil.rmtree(d / "nsp" / "checkpoints" / "step_000012")  # "interrupted" after step 6
    (d / "nsp" / "checkpoints" / "latest").write_text("step_000006\n")
    capsys.readouterr()
    resumed = mlm_main(apply_overrides(cfg, {"resume": True}))
    # it really continued from step 6: it said so, skipped the step-0 evaluation (only a run starting at
    # step 0 makes one), and its metrics.jsonl logs each step once, as the uninterrupted run's did
    assert "at step 6" in capsys.readouterr().out
    assert full["summary"]["initial"] is not None and resumed["summary"]["initial"] is None
    assert [r["step"] for r in read_metrics(d / "nsp" / "metrics.jsonl")] == full_steps
    for (name, p), q in zip(before.items(), weights().values()):
        torch.testing.assert_close(p, q, msg=name)


def test_mlm_figures_score_every_valid_item_and_evaluation_leaves_training_alone(mlm_run, capsys):
    """The figures results.json records (before and after training) score every valid item; in training,
    ``eval_batches`` evenly spaced batches, the same at each evaluation, and the log line says so. Two runs
    that evaluate differently (1 batch every 4 steps, or all of them once) train to the same weights:
    evaluation draws from no generator the training uses (dropout draws from the global one here)."""
    import math
    import random

    from bert_address_cls import train_mlm
    from bert_address_cls.training import load_or_train_tokenizer
    from common.checkpoint import load_pretrained
    from common.config import apply_overrides
    from common.data import evenly_spaced
    from common.log import read_metrics

    d, cfg = mlm_run["dir"], mlm_run["cfg"]
    tok = load_or_train_tokenizer(cfg.tokenizer_dir, cfg.model.vocab_size)
    valid = train_mlm.MLMData(tok, train_mlm.load_documents(cfg)[1], cfg.max_len)
    n_batches = math.ceil(len(valid) / cfg.batch_size)
    summary = mlm_run["result"]["summary"]
    for when in ("initial", "final"):
        assert summary[when]["items"] == len(valid) and summary[when]["batches"] == n_batches, summary[when]
    records = json.loads((d / "mlm" / "results.json").read_text())
    assert {r["metric"]: r["value"] for r in records} == {"mlm_accuracy": round(summary["final"]["mlm_accuracy"], 4),
                                                          "mlm_loss": round(summary["final"]["mlm_loss"], 4)}
    assert n_batches >= 3  # so that one batch is a real subset
    assert train_mlm.valid_batches(len(valid), cfg.batch_size, 1) == (evenly_spaced(n_batches, 1), n_batches)

    runs = {}
    for every, batches in ((4, 1), (8, 0)):
        capsys.readouterr()
        run = apply_overrides(cfg, {"max_iters": 8, "save_every": 8, "eval_every": every, "eval_batches": batches,
                                    "out_dir": str(d / f"mlm_eval{batches}")})
        res = train_mlm.main(run)
        out = capsys.readouterr().out
        mcfg = BertConfig.from_dict(json.loads((res["final_dir"] / "config.json").read_text()))
        runs[batches] = (load_pretrained(BertForPreTraining(mcfg), res["final_dir"]).state_dict(),
                         [r["loss"] for r in read_metrics(d / f"mlm_eval{batches}" / "metrics.jsonl") if "loss" in r],
                         res["summary"]["final"], out)
    (w1, losses1, final1, out1), (w0, losses0, final0, out0) = runs[1], runs[0]
    assert out1.count(f"(1 of {n_batches} batches, evenly spaced)") == 2 and "evenly spaced" not in out0
    assert f"(all {len(valid):,} valid items" in out1
    assert losses1 == losses0
    for (name, p), q in zip(w1.items(), w0.values()):
        assert torch.equal(p, q), name
    assert final1 == final0  # the final figure is the whole split's in both, masked the same way
    # an evaluation is deterministic and leaves the global generators where they were
    model = load_pretrained(BertForPreTraining(mcfg), res["final_dir"])
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    again = train_mlm.evaluate(model, valid, cfg, torch.device("cpu"), torch.float32, len(tok), tok.mask_token_id)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert again == final0


def test_address_parser_trains_from_the_mlm_checkpoint_and_infer_prints_fields(mlm_run, tmp_path, capsys):
    from bert_address_cls import infer
    from bert_address_cls.dataset import build_split
    from bert_address_cls.train_cls import ClsConfig
    from bert_address_cls.train_cls import main as cls_main

    cfg = ClsConfig(init_from=str(mlm_run["result"]["final_dir"]), n_train=1500, n_valid=100, n_test=200,
                    district_drills=0, max_iters=200, batch_size=32, lr=3e-3, warmup_iters=10, eval_every=100,
                    save_every=200, threads=1, log_every=10, out_dir=str(tmp_path / "cls"),
                    confusion_png=str(tmp_path / "c.png"))
    res = cls_main(cfg)
    log = [json.loads(x) for x in (tmp_path / "cls" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["tag_loss"] for r in log if "tag_loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses
    test = res["summary"]["test"]
    assert test["f1"] > 0.3 and 0 <= test["province_accuracy"] <= 1
    assert res["summary"]["cpca"]["province_accuracy"] > 0.9  # the rule-based baseline ran on the same split
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert sum(map(sum, test["confusion"])) == sum(len(a.text) for a in build_split("test", 200))
    from bert_address_cls.evaluate import EvalConfig
    from bert_address_cls.evaluate import main as evaluate

    again = evaluate(EvalConfig(ckpt=str(res["final_dir"]), n_test=200, baseline=False, device="cpu"))
    assert again["test"]["f1"] == pytest.approx(test["f1"])  # the saved model scores as it did in training
    assert sum(v[0] for v in again["summary"].values()) == 200
    capsys.readouterr()
    (tmp_path / "in.txt").write_text("浙江省杭州市西湖区文三路90号\n\n北京市海淀区中关村大街1号\n", encoding="utf-8")
    rows = infer.main(infer.InferConfig(ckpt=str(res["final_dir"]), file=str(tmp_path / "in.txt"), device="cpu"),
                      ["杭州西湖区北山街道"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == rows and len(rows) == 3
    assert list(rows[0]) == ["address", "province", "city", "district", "town", "village", "road", "number", "poi",
                             "room", "other", "province_predicted"]
    assert rows[0]["address"] == "杭州西湖区北山街道"


def test_infer_splits_flags_from_addresses():
    from bert_address_cls.infer import split_argv

    assert split_argv(["杭州市", "--ckpt", "d", "北京市", "--file=x.txt"]) == (["--ckpt", "d", "--file=x.txt"],
                                                                            ["杭州市", "北京市"])


def test_old_model_flags_still_parse_into_the_model_config():
    """The training configs nest BertConfig: --dim, --n-layer ... are transformers' names now; the old flags
    keep working for one release."""
    from bert_address_cls import train_cls, train_mlm
    from common.config import parse_config, renamed_fields

    for script in (train_mlm, train_cls):
        cls = script.MLMConfig if script is train_mlm else script.ClsConfig
        assert set(renamed_fields(cls)) == {"dim", "n_layer", "n_head", "ffn_dim", "dropout"}  # they name fields
        cfg = parse_config(cls, ["--dim", "64", "--n-layer", "2", "--n-head", "2", "--ffn-dim", "128"])
        assert (cfg.model.hidden_size, cfg.model.num_hidden_layers, cfg.model.num_attention_heads,
                cfg.model.intermediate_size) == (64, 2, 2, 128)
    gpu = parse_config(train_mlm.MLMConfig, ["--preset", "gpu4gb"], train_mlm.PRESETS).model
    assert (gpu.hidden_size, gpu.num_hidden_layers, gpu.max_position_embeddings) == (768, 6, 128)
