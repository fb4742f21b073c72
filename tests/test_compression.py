"""compression: the formats equal bitsandbytes (NF4/FP4 codes and absmax bit for bit, the dynamic 8-bit map, double
quantization at 4.127 bits, blockwise int8), packed files load back bit for bit, GPTQ equals round-to-nearest when
inputs are uncorrelated and beats it when they are not, the pruning masks keep what they claim, Wanda keeps the
weights on outlier inputs, structured pruning gives a plain transformers model, our LoRA equals peft's, and the
scripts run end to end on a tiny model."""

from __future__ import annotations

import json
import math

import bitsandbytes.functional as BF
import pytest
import torch

from compression import quantize as Q
from compression.gptq import gptq_model, gptq_quantize
from compression.model import LoRALinear, QuantLinear, replace_linears
from compression.packed import load_quantized_model, save_quantized_model
from compression.prune import (
    magnitude_mask,
    n_m_mask,
    prune_mlp_channels,
    prune_wanda,
    row_mask,
    sparsity_of,
    wanda_score,
)


def tiny_llama(seed: int = 0, vocab: int = 300, bias: bool = False, tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      max_position_embeddings=64, attention_bias=bias, mlp_bias=bias)
    model = LlamaForCausalLM(cfg).eval()
    if bias:
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                torch.nn.init.normal_(p, std=0.1)
    return model


# ---------------------------------------------------------------------------------------------------------
# formats against bitsandbytes
# ---------------------------------------------------------------------------------------------------------

def test_level_tables_equal_bitsandbytes():
    assert torch.equal(Q.NF4_LEVELS, BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(Q.FP4_LEVELS, BF.get_4bit_type("fp4", device="cpu"))
    assert torch.allclose(Q.NF4_LEVELS, BF.create_normal_map()[BF.create_normal_map() != 0].new_tensor(
        sorted(set(BF.create_normal_map().tolist()))), atol=1e-6)
    assert torch.equal(Q.dynamic_map(), BF.create_dynamic_map())


@pytest.mark.parametrize("shape", [(192, 320), (33, 29)])  # the second leaves a short last block
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_4bit_codes_and_absmax_equal_bitsandbytes_bit_for_bit(shape, fmt):
    torch.manual_seed(1)
    w = torch.randn(shape) * 0.03
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type=fmt)
    ours = Q.quantize(w, fmt)
    assert torch.equal(ours["codes"][:packed.numel()], packed.reshape(-1))  # same nibbles, same byte layout
    assert torch.equal(ours["absmax"], state.absmax)
    assert torch.equal(Q.dequantize(ours, fmt, shape), BF.dequantize_4bit(packed, state))


def _check_nearest_where_bnb_differs(scaled, ours_idx, bnb_idx, levels, max_share):
    """bitsandbytes' CPU kernel for 8-bit codes searches its table with an approximate lookup (BinSearch's
    Direct2), so near the midpoint between two levels it may take the farther one (its torch fallback and NF4
    path use exact midpoints, and there the codes are equal bit for bit). Ours takes the nearest. Every
    disagreement must be rare, between neighbouring levels, and ours the nearer (or equally near) one."""
    diff = ours_idx != bnb_idx
    assert diff.float().mean() <= max_share
    x = scaled[diff]
    d_ours = (x - levels[ours_idx[diff]]).abs()
    d_bnb = (x - levels[bnb_idx[diff]]).abs()
    assert torch.all(d_ours <= d_bnb)
    sorted_pos = torch.argsort(torch.argsort(levels))  # rank of each table index in value order
    assert torch.all((sorted_pos[ours_idx[diff]] - sorted_pos[bnb_idx[diff]]).abs() == 1)


def test_blockwise_int8_equals_bitsandbytes_quantize_blockwise():
    torch.manual_seed(2)
    w = torch.randn(256, 384) * 0.05
    code = BF.create_linear_map(signed=True)  # k / 127 with the zero doubled, 256 entries
    bnb_idx, state = BF.quantize_blockwise(w, code=code, blocksize=256)
    ours = Q.quantize(w, "int8_block")
    assert torch.equal(ours["absmax"], state.absmax)
    bnb_k = torch.round(code[bnb_idx.long()] * 127).reshape(-1)
    ours_k = ours["codes"].reshape(-1).float()
    scaled, _ = Q.blockwise_absmax(w, 256)
    _check_nearest_where_bnb_differs(scaled, (ours_k + 127).long(), (bnb_k + 127).long(), Q.INT8_LEVELS, 0.005)
    both = Q.dequantize(ours, "int8_block", w.shape)
    assert (both - BF.dequantize_blockwise(bnb_idx, state)).abs().max() <= state.absmax.max() / 127 + 1e-7


def test_double_quantization_matches_bitsandbytes_and_stores_4127_bits():
    torch.manual_seed(3)
    w = torch.randn(512, 576) * 0.02
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = Q.quantize(w, "nf4_dq")
    assert torch.equal(ours["codes"][:packed.numel()], packed.reshape(-1))
    assert torch.equal(ours["absmax_offset"], state.offset.reshape(1))
    assert torch.equal(ours["absmax_scale"], state.state2.absmax)
    absmax = Q.blockwise_absmax(w, 64)[1] - state.offset
    scaled2, _ = Q.blockwise_absmax(absmax, 256)
    _check_nearest_where_bnb_differs(scaled2, ours["absmax_codes"].long(), state.absmax.long(), Q.dynamic_map(),
                                     0.01)
    # bits: 4 + 8 / 64 + 32 / (64 * 256) = 4.127 (and + the one offset, nothing at this size)
    assert Q.bits_per_weight("nf4_dq", (4096, 4096)) == pytest.approx(4.127, abs=5e-4)
    assert Q.bits_per_weight("nf4", (4096, 4096)) == pytest.approx(4.5, abs=1e-6)
    err = (Q.dequantize(ours, "nf4_dq", w.shape) - BF.dequantize_4bit(packed, state)).abs().max()
    assert err < 1e-3 * w.abs().max()


def test_nf4_round_trip_error_on_normal_weights():
    """bitsandbytes' test_4bit_quant table: NF4, block 64, randn -> mean |error| about 0.0728."""
    torch.manual_seed(4)
    w = torch.randn(1024, 1024)
    err = (Q.fake_quantize(w, "nf4") - w).abs().mean().item()
    assert err == pytest.approx(0.0728, rel=0.02)
    assert err < (Q.fake_quantize(w, "fp4") - w).abs().mean().item()  # NF4 fits normal weights better than FP4


@pytest.mark.parametrize("bits", [3, 4])
def test_pack_bits_round_trips(bits):
    torch.manual_seed(5)
    for n in (1, 7, 8, 1001):
        codes = torch.randint(0, 2 ** bits, (n,), dtype=torch.uint8)
        packed = Q.pack_bits(codes, bits)
        assert packed.numel() == math.ceil(n / 8) * bits
        assert torch.equal(Q.unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_every_format_round_trips_through_its_file_bit_for_bit(fmt, tmp_path):
    torch.manual_seed(6)
    w = torch.randn(200, 320) * 0.02  # 200 rows: FP8's 128-row tiles and the 128-wide groups are ragged
    lin = torch.nn.Linear(320, 200, bias=True)
    lin.weight.data = w
    q = QuantLinear.from_linear(lin, fmt)
    size = Q.save_packed(tmp_path / "w.safetensors", {"layer": (fmt, (200, 320), q.stored())})
    layers, rest = Q.load_packed(tmp_path / "w.safetensors")
    fmt2, shape, tensors = layers["layer"]
    assert (fmt2, shape, rest) == (fmt, (200, 320), {})
    for k, v in q.stored().items():
        assert v.dtype == tensors[k].dtype and torch.equal(v.view(torch.uint8), tensors[k].view(torch.uint8))
    assert size >= Q.nbytes(q.stored()) and size < Q.nbytes(q.stored()) + 2048  # the file is the counted bytes
    x = torch.randn(3, 320)
    rel = ((q(x) - lin(x)).norm() / lin(x).norm()).item()
    assert rel < {"int8": 0.015, "fp8_": 0.04, "int3": 0.25}.get(fmt[:4], 0.13)


@pytest.mark.parametrize("bias,tied", [(False, True), (True, False)])
def test_quantized_model_saves_and_loads_with_equal_logits(tmp_path, bias, tied):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama(bias=bias, tied=tied)
    replace_linears(model, lambda n, lin: QuantLinear.from_linear(lin, "nf4_dq"))
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    save_quantized_model(model, tok, tmp_path / "q")
    loaded, _ = load_quantized_model(tmp_path / "q")
    x = torch.randint(0, 300, (2, 20))
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14


# ---------------------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_round_to_nearest_when_the_inputs_are_uncorrelated(act_order):
    """With a diagonal H there is nothing to compensate: any column order gives round-to-nearest (act-order's
    visiting order comes from a diagonal that is not constant here, so the permutation and its undoing are
    exercised)."""
    torch.manual_seed(7)
    W = torch.randn(48, 256)
    H = torch.diag(torch.rand(256) + 0.5)
    stored, deq = gptq_quantize(W, H, 4, damp=0.0, act_order=act_order)
    rtn = Q.dequantize(Q.rtn_grouped(W, 4, 128), "int4_g128", W.shape)
    assert torch.equal(deq, rtn)
    assert torch.equal(Q.dequantize(stored, "int4_g128", W.shape), deq)


def test_an_all_zero_group_stays_zero_and_finite():
    W = torch.randn(8, 256)
    W[:, :128] = 0  # a pruned group
    stored, deq = gptq_quantize(W, torch.eye(256) * 2, 4, act_order=True)
    assert torch.isfinite(deq).all() and torch.equal(deq[:, :128], torch.zeros(8, 128))
    assert torch.equal(Q.fake_quantize(W, "int4_g128")[:, :128], torch.zeros(8, 128))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_cuts_the_output_error_of_round_to_nearest_by_40_percent_on_correlated_inputs(bits, act_order):
    torch.manual_seed(8)
    K = 256
    X = torch.randn(4096, K) @ (torch.randn(K, K) * 0.3 + torch.eye(K))
    W = torch.randn(64, K)
    _, deq = gptq_quantize(W, 2 * X.T @ X / len(X), bits, act_order=act_order)
    rtn = Q.dequantize(Q.rtn_grouped(W, bits, 128), f"int{bits}_g128", W.shape)
    gptq_err = ((X @ (W - deq).T) ** 2).mean()
    rtn_err = ((X @ (W - rtn).T) ** 2).mean()
    assert gptq_err < 0.6 * rtn_err


def test_gptq_on_a_model_beats_round_to_nearest_on_the_logits():
    """On the text it was calibrated on (a random-weight model has no other text it knows)."""
    model = tiny_llama(1)
    calib = torch.randint(0, 300, (16, 32))
    x = calib
    with torch.no_grad():
        ref = model(x).logits
        rtn = tiny_llama(1)
        replace_linears(rtn, lambda n, lin: QuantLinear.from_linear(lin, "int3_g128"))
        rtn_err = (rtn(x).logits - ref).pow(2).mean()
        stored = gptq_model(model, calib, 3, batch=4)
        gptq_err = (model(x).logits - ref).pow(2).mean()
    assert len(stored) == 14 and all(set(s) == {"codes", "scales", "zeros"} for s in stored.values())
    assert gptq_err < rtn_err


# ---------------------------------------------------------------------------------------------------------
# pruning
# ---------------------------------------------------------------------------------------------------------

def test_masks_keep_what_they_claim():
    torch.manual_seed(9)
    W = torch.randn(16, 64)
    m = magnitude_mask(W, 0.5)
    assert m.sum() == W.numel() // 2 and W[m].abs().min() > W[~m].abs().max()
    r = row_mask(W.abs(), 0.25)
    assert torch.all(r.sum(1) == 48)
    assert all(W[i].abs()[r[i]].min() > W[i].abs()[~r[i]].max() for i in range(16))  # the lowest are dropped
    nm = n_m_mask(W.abs())
    assert torch.all(nm.view(16, 16, 4).sum(2) == 2)
    kept, dropped = W.abs().view(16, 16, 4) * nm.view(16, 16, 4), W.abs().view(16, 16, 4) * ~nm.view(16, 16, 4)
    assert torch.all(kept.topk(2, dim=2).values.min(2).values >= dropped.max(2).values)


def test_wanda_keeps_the_weights_on_an_outlier_input():
    torch.manual_seed(10)
    W = torch.randn(32, 64)
    W[:, 5] *= 0.1  # small weights ...
    norms = torch.ones(64)
    norms[5] = 100.0  # ... on an input that is huge on real text
    wanda = row_mask(wanda_score(W, norms), 0.5)
    magnitude = magnitude_mask(W, 0.5)
    assert wanda[:, 5].all() and not magnitude[:, 5].any()
    assert torch.equal(row_mask(wanda_score(W, torch.ones(64)), 0.5), row_mask(W.abs(), 0.5))  # equal norms


def test_wanda_prunes_each_row_to_the_sparsity_on_a_model():
    model = tiny_llama(2)
    prune_wanda(model, torch.randint(0, 300, (4, 32)), 0.5)
    assert sparsity_of(model) == pytest.approx(0.5, abs=1e-3)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert torch.all((q == 0).sum(1) == 64)


def test_structured_pruning_gives_a_smaller_plain_transformers_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(3)
    n = prune_mlp_channels(model, torch.randint(0, 300, (4, 32)), 0.75)
    assert n == 192 and model.model.layers[1].mlp.down_proj.in_features == 192
    model.save_pretrained(str(tmp_path / "p"))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p")).eval()
    x = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(again(x).logits, model(x).logits)


# ---------------------------------------------------------------------------------------------------------
# LoRA on a quantized base
# ---------------------------------------------------------------------------------------------------------

def test_lora_linear_equals_peft_forward_and_gradients():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(11)
    net = torch.nn.Sequential(torch.nn.Linear(64, 48))
    ref = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0))
    layer = ref.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # a trained-looking B, so the update is not zero
    ours = LoRALinear(layer.base_layer, r=4, alpha=8)
    ours.lora_A.data.copy_(layer.lora_A["default"].weight)
    ours.lora_B.data.copy_(layer.lora_B["default"].weight)
    x = torch.randn(5, 64)
    a, b = ref(x), ours(x)
    torch.testing.assert_close(b, a)
    a.pow(2).sum().backward()
    b.pow(2).sum().backward()
    torch.testing.assert_close(ours.lora_A.grad, layer.lora_A["default"].weight.grad)
    torch.testing.assert_close(ours.lora_B.grad, layer.lora_B["default"].weight.grad)


def test_smaller_blocks_give_smaller_errors_on_weights_with_outliers():
    """Q3: one scale for the whole matrix lets one outlier flatten every other weight to a few levels."""
    torch.manual_seed(12)
    w = torch.randn(256, 512) * 0.02
    w[3, 7] = 2.0  # one outlier
    err = {f: (Q.fake_quantize(w, f) - w).norm().item() for f in ("int8_tensor", "int8_channel", "int8_block")}
    assert err["int8_block"] < err["int8_channel"] < 0.5 * err["int8_tensor"]


# ---------------------------------------------------------------------------------------------------------
# distillation
# ---------------------------------------------------------------------------------------------------------

def test_kd_loss_is_t_squared_times_the_token_mean_kl():
    from compression.distill import kd_loss

    torch.manual_seed(13)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    T = 2.0
    p_t = torch.softmax(t / T, -1)
    by_hand = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    torch.testing.assert_close(kd_loss(s, t, T), by_hand)
    assert kd_loss(t, t, T).abs() < 1e-6


def test_student_keeps_evenly_spaced_teacher_layers_and_saves_as_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from compression.distill import FeatureProjector, kept_layers, student_from_teacher

    assert kept_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    teacher = tiny_llama(4)
    teacher.model.layers.append(tiny_llama(5).model.layers[1])
    teacher.config.num_hidden_layers = 3
    student, keep = student_from_teacher(teacher, 2)
    assert keep == [0, 2]
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    student.save_pretrained(str(tmp_path / "s"))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "s")).eval()
    x = torch.randint(0, 300, (1, 12))
    torch.testing.assert_close(again(x).logits, student.eval()(x).logits)
    proj = FeatureProjector(128, 128, 2)
    h = [torch.randn(1, 4, 128), torch.randn(1, 4, 128)]
    assert proj(h, h).item() == 0.0  # identity at the start
    t = [torch.randn(1, 4, 128), torch.randn(1, 4, 128)]
    torch.testing.assert_close(proj([x * 100 for x in h], [x * 100 for x in t]), proj(h, t))  # scale-free


# ---------------------------------------------------------------------------------------------------------
# the scripts, end to end on a tiny never-quantised Llama
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """train_subject.main at a tiny size on a slice of the plays; returns (its summary, losses, a text file)."""
    from compression.dataset import shakespeare_splits
    from compression.train_subject import SubjectTrainConfig, main

    root = tmp_path_factory.mktemp("compression")
    train, held = shakespeare_splits()
    text = root / "plays.txt"
    text.write_text(train[:120_000] + held[:30_000], encoding="utf-8")
    cfg = SubjectTrainConfig(tokenizer_vocab=512, text_file=str(text), batch_size=8, max_iters=40, lr=3e-3,
                             warmup_iters=5, eval_windows=4, eval_every=20, save_every=20, log_every=10,
                             out_dir=str(root / "subject"))
    cfg.model.hidden_size, cfg.model.intermediate_size, cfg.model.num_hidden_layers = 128, 256, 2
    cfg.model.num_attention_heads, cfg.model.num_key_value_heads, cfg.model.max_position_embeddings = 2, 1, 64
    out = main(cfg)
    return out, text, root


def test_train_subject_loss_falls_and_writes_a_transformers_directory(subject):
    from transformers import AutoModelForCausalLM

    out, _, _ = subject
    losses = out["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert out["summary"]["valid_ppl"] < 512
    AutoModelForCausalLM.from_pretrained(str(out["final"]))


def test_evaluate_runs_every_group_and_saves_loadable_packed_models(subject, capsys):
    from compression.evaluate import EvaluateConfig, main

    out, text, root = subject
    res = main(EvaluateConfig(model=str(out["final"]), methods="all", formats="int8_channel,nf4_dq,int4_g128",
                              text_file=str(text), seq_len=64, eval_windows=4, calib_windows=4, curve="0.5",
                              out_dir=str(root / "eval")))
    rows = {r["method"]: r for r in res["rows"]}
    assert {"fp32", "rtn_nf4_dq", "gptq_int4_g128", "gptq_int3_g128", "wanda_50", "magnitude_2:4"} <= set(rows)
    assert rows["rtn_nf4_dq"]["bits_per_weight"] == pytest.approx(4.127, abs=0.01)
    assert rows["rtn_int8_channel"]["ppl"] < rows["fp32"]["ppl"] * 1.05
    assert rows["wanda_50"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert (res["out_dir"] / "sparsity.png").is_file()
    model, _ = load_quantized_model(res["out_dir"] / "gptq_int4_g128")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14

    from compression.report import ReportConfig
    from compression.report import main as report

    table = report(ReportConfig(eval_dir=str(root / "eval"), main=res["out_dir"].name, subjects="",
                                bench_file=str(root / "no_bench.json"), out_dir=str(root / "report")))
    assert "| rtn_nf4_dq | 4.1" in table["table"] and "| wanda_50 |" in table["table"]
    assert any(r["metric"] == "wanda_over_magnitude_ppl_increase" for r in table["records"])


def test_distill_modes_run_and_the_student_learns(subject):
    from compression.train_distill import DistillConfig, main

    out, text, root = subject
    runs = {m: main(DistillConfig(model=str(out["final"]), mode=m, student_layers=1, text_file=str(text),
                                  seq_len=32, max_iters=6, lr=1e-3, warmup_iters=1, eval_windows=2, eval_seq_len=64,
                                  eval_every=3, save_every=3, out_dir=str(root / f"distill_{m}")))
            for m in ("ce", "kd_feat")}
    for r in runs.values():
        assert math.isfinite(r["summary"]["valid_loss"])
    kd = [json.loads(line) for line in (root / "distill_kd_feat" / "metrics.jsonl").read_text().splitlines()]
    assert any("kd" in r and "feat" in r for r in kd)


def test_our_qlora_tracks_bitsandbytes_and_peft(subject):
    from compression.train_qlora import QLoRAConfig, main

    out, text, root = subject
    s = main(QLoRAConfig(model=str(out["final"]), text_file=str(text), seq_len=32, max_iters=4, lr=1e-3,
                         out_dir=str(root / "qlora")))
    assert s["max_relative_gap"] < 0.02
    assert s["ours"]["losses"][0] == pytest.approx(s["bnb"]["losses"][0], rel=1e-4)  # the same start


def test_structured_pruning_script_and_infer(subject, capsys):
    from compression.infer import InferConfig
    from compression.infer import main as infer
    from compression.train_structured import StructuredConfig, main

    out, text, root = subject
    s = main(StructuredConfig(model=str(out["final"]), mlp_keep=0.5, text_file=str(text), calib_windows=2,
                              seq_len=32, max_iters=3, eval_windows=2, eval_seq_len=64,
                              out_dir=str(root / "structured")))
    assert s["intermediate_after"] == 128 and s["params_after"] < s["params_before"]
    r = infer(InferConfig(model=str(root / "structured" / "subject" / "final"), max_new_tokens=5))
    assert r["new_tokens"] == 5
    packed = next((root / "eval").glob("*/rtn_nf4_dq"))  # written by the evaluate test of this module
    r = infer(InferConfig(packed=str(packed), max_new_tokens=4))
    assert r["new_tokens"] == 4
