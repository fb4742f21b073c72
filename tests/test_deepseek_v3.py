"""deepseek_v3: logits equal transformers' DeepseekV3ForCausalLM (with and without the low-rank query, with YaRN),
absorbed MLA = naive MLA, cached decoding = the full forward, the routing rules (the bias steers the choice, not the
weights; the bias update evens a skewed load), MTP speculative decoding = plain greedy decoding, the FP8 kernels =
their torch reference (triton's interpreter), block-wise FP8 beating per-tensor FP8 on outliers, the export loading
in transformers, and the training script (loss falls, resume, balance modes, two processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepseek_v3 import fp8
from deepseek_v3.model import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DeepseekV3TopkRouter,
    MLACache,
    max_violation,
    update_routing_bias,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=3, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, max_position_embeddings=32, original_max_position_embeddings=32)


def tiny(**kw) -> DeepseekV3Config:
    return DeepseekV3Config(**{**TINY, **kw})


def randomised(model: DeepseekV3ForCausalLM, seed: int = 0) -> DeepseekV3ForCausalLM:
    """Norm gains and routing biases random too, so no path hides behind a constant."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("norm.weight"):
                t.copy_(1 + 0.3 * torch.randn(t.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.5 * torch.rand(t.shape, generator=g))
            else:
                t.copy_(0.15 * torch.randn(t.shape, generator=g))
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# the model against transformers, and against itself
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("q_lora_rank,rope_factor", [(24, 1.0), (0, 1.0), (24, 4.0)])
def test_logits_equal_transformers(q_lora_rank, rope_factor):
    """Every weight random (norm gains and the routing bias too), ours exported into transformers' layout and loaded
    there, then back: the same logits. The YaRN case uses a small rope_theta so that its ramp has several
    partly-interpolated frequencies."""
    from transformers import DeepseekV3ForCausalLM as HF

    from deepseek_v3.export_hf import hf_config, load_from_hf_model, to_hf_state

    cfg = tiny(q_lora_rank=q_lora_rank, rope_factor=rope_factor, num_nextn_predict_layers=0, qk_rope_head_dim=16,
               rope_theta=100.0 if rope_factor > 1 else 10000.0)
    ours = randomised(DeepseekV3ForCausalLM(cfg))
    hcfg = hf_config(cfg)
    hcfg._attn_implementation = "eager"
    hf = HF(hcfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state(ours)[0], strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
        torch.testing.assert_close(ours(ids)["logits"], want, atol=1e-4, rtol=0)
        torch.testing.assert_close(load_from_hf_model(hf).eval()(ids)["logits"], want, atol=1e-4, rtol=0)
    if rope_factor > 1:
        assert ours.layers[0].self_attn.scale > cfg.qk_head_dim ** -0.5  # YaRN's mscale entered the softmax
        ramp = ours.rope_freqs / (1.0 / 100.0 ** (torch.arange(0, 16, 2) / 16))
        assert ((ramp > 0.26) & (ramp < 0.99)).sum() >= 2  # partly interpolated frequencies exist


def test_absorbed_mla_equals_naive_and_the_cache_equals_the_full_forward():
    model = randomised(DeepseekV3ForCausalLM(tiny(num_nextn_predict_layers=0)))
    ids = torch.randint(0, 97, (2, 14))
    with torch.no_grad():
        full = model(ids)["logits"]
        torch.testing.assert_close(model(ids, absorb=True)["logits"], full, atol=1e-5, rtol=0)
        for absorb in (False, True):  # prefill 9, then 1, then 4 (a verify step of speculative decoding)
            cache = MLACache()
            parts = [model(ids[:, :9], cache=cache, absorb=absorb)["logits"],
                     model(ids[:, 9:10], cache=cache, absorb=absorb)["logits"],
                     model(ids[:, 10:], cache=cache, absorb=absorb)["logits"]]
            torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
        cfg = model.config
        assert cache.nbytes() == 2 * 14 * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_generate_with_the_latent_cache_equals_generate_without():
    model = randomised(DeepseekV3ForCausalLM(tiny(num_nextn_predict_layers=0)), seed=3)
    ids = torch.randint(0, 97, (1, 5))
    a = model.generate(ids, 12, use_cache=True, absorb=True)
    b = model.generate(ids, 12, use_cache=False)
    assert a.tolist() == b.tolist()


def test_the_router_bias_steers_the_choice_but_not_the_weights():
    cfg = tiny(n_group=1, topk_group=1, routed_scaling_factor=2.0)
    router = DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(64, cfg.hidden_size)
    idx0, w0, scores = router(x)
    assert "e_score_correction_bias" not in dict(router.named_parameters())  # a buffer: no optimizer sees it
    router.e_score_correction_bias[5] = 10.0  # expert 5 now wins every token's choice...
    idx, w, _ = router(x)
    assert (idx == 5).any(-1).all()
    # ...but its weight is its unbiased sigmoid score, normalised over the chosen experts, times the scale
    chosen = scores.gather(1, idx)
    torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True) * 2.0)
    assert not torch.equal(idx, idx0)


def test_group_limited_routing_keeps_the_chosen_experts_inside_topk_groups():
    cfg = tiny(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    router = DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(router.weight, std=1.0)
    router.e_score_correction_bias.copy_(torch.rand(16) * 0.5)
    idx, _, scores = router(torch.randn(200, cfg.hidden_size))
    groups = idx // 4
    assert all(len(set(g.tolist())) <= 2 for g in groups)
    # the kept groups are those whose two best BIASED scores sum highest
    biased = scores + router.e_score_correction_bias
    best = biased.view(200, 4, 4).topk(2, -1).values.sum(-1).topk(2, -1).indices
    unbiased_best = scores.view(200, 4, 4).topk(2, -1).values.sum(-1).topk(2, -1).indices
    assert any(set(a.tolist()) != set(b.tolist()) for a, b in zip(best, unbiased_best))  # the bias matters here
    assert all(set(g.tolist()) <= set(b.tolist()) for g, b in zip(groups, best))


def test_the_bias_update_evens_a_skewed_load():
    """Tokens that all lean towards experts 0 and 1: with b_i += gamma * sign(mean - load_i) the load evens out,
    and the two favourites end with the lowest biases."""
    torch.manual_seed(0)
    cfg = tiny(n_group=1, topk_group=1, num_experts_per_tok=2)
    router = DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.3)
    x = torch.randn(512, cfg.hidden_size)
    x[:, 0] = 1.0
    with torch.no_grad():
        router.weight[:2, 0] += 3.0  # a shared preference on top of each token's own
    router(x)
    before = max_violation(update_routing_bias(router, 0.0)[0])
    after = []
    for _ in range(300):
        router(x)
        after.append(max_violation(update_routing_bias(router, 0.005)[0]))
    assert before > 1.0 and max(after[-20:]) < 0.2, (before, after[-20:])
    assert router.e_score_correction_bias[:2].max() < router.e_score_correction_bias[2:].min()


def test_mtp_loss_is_the_cross_entropy_of_the_token_two_ahead():
    model = randomised(DeepseekV3ForCausalLM(tiny(num_nextn_predict_layers=2)))
    ids = torch.randint(0, 97, (2, 12))
    labels = torch.roll(ids, -1, 1)
    out = model(ids, labels=labels, mtp_loss_weight=0.5)
    h = out["hidden"]
    # depth 1 by hand: [enorm(emb(t_{i+1})); hnorm(h_i)] -> eh_proj -> block -> norm -> head, target labels[i+1]
    m = model.mtp[0]
    pos = torch.arange(11)
    x = m.eh_proj(torch.cat([m.enorm(model.embed_tokens(ids[:, 1:])), m.hnorm(h[:, :11])], -1))
    logits = model.lm_head(m.norm(m.block(x, pos, model.rope_freqs)))
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out["mtp_losses"][0], ce)
    assert len(out["mtp_losses"]) == 2
    torch.testing.assert_close(out["loss"], out["lm_loss"] + 0.5 * torch.stack(out["mtp_losses"]).mean())


def test_speculative_decoding_with_the_mtp_draft_equals_plain_greedy():
    from deepseek_v3.model import speculative_generate

    """A random model over 3 tokens: some drafts are accepted and some rejected, so both branches (two tokens from
    one verify step; the rejected draft cropped from the cache) run, over several seeds."""
    accepted = rejected = 0
    for seed in range(4):
        model = randomised(DeepseekV3ForCausalLM(tiny(num_nextn_predict_layers=1, vocab_size=3)), seed=seed)
        ids = torch.randint(0, 3, (1, 6), generator=torch.Generator().manual_seed(seed))
        plain = model.generate(ids, 20)
        spec, stats = speculative_generate(model, ids, 20)
        assert spec.tolist() == plain.tolist(), seed
        accepted += stats["accepted"]
        rejected += stats["drafted"] - stats["accepted"]
    assert accepted > 0 and rejected > 0, (accepted, rejected)


def test_speculative_decoding_accepts_when_the_draft_is_right():
    """A model whose every head predicts 'the next id is id + 1' (mod V): every draft is accepted and each
    verify step yields two tokens."""
    from deepseek_v3.model import speculative_generate

    cfg = tiny(num_nextn_predict_layers=1, vocab_size=16)
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        # the residual stream carries the last token's embedding; lm_head maps embedding e_t to logit t + 1
        model.embed_tokens.weight.copy_(torch.eye(16, cfg.hidden_size) * 10)
        model.lm_head.weight.copy_(torch.roll(torch.eye(16, cfg.hidden_size), 1, 0))
        for norm in [model.norm, model.mtp[0].norm, model.mtp[0].enorm]:
            norm.weight.fill_(1.0)
        model.mtp[0].eh_proj.weight[:, :cfg.hidden_size].copy_(torch.eye(cfg.hidden_size))  # pass the embedding
    ids = torch.tensor([[3]])
    plain = model.generate(ids, 10)
    assert plain[0].tolist() == [(4 + i) % 16 for i in range(10)]
    spec, stats = speculative_generate(model, ids, 10)
    assert spec.tolist() == plain.tolist()
    assert stats["accepted"] == stats["drafted"] and stats["forward_passes"] <= 6


# ---------------------------------------------------------------------------------------------------
# FP8
# ---------------------------------------------------------------------------------------------------

def test_triton_kernels_equal_the_torch_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "deepseek_v3.kernels"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    values = {line.split()[0]: float(line.split()[1]) for line in proc.stdout.splitlines()
              if line.strip() and not line.startswith("device")}
    assert set(values) == {"act_quant_values", "act_quant_scales", "weight_quant_values", "weight_quant_scales",
                           "weight_dequant", "fp8_gemm_relative"}
    assert all(v == 0 for k, v in values.items() if k != "fp8_gemm_relative"), values
    assert values["fp8_gemm_relative"] < 1e-5


def test_quantisation_round_trips_and_scales():
    x = torch.randn(5, 300) * 3
    q, s = fp8.act_quant_ref(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 3)
    torch.testing.assert_close(s[:, 0], x[:, :128].abs().amax(1) / 448)
    # each tile's largest value maps to exactly +-448 (E4M3's largest), so it dequantises back to itself
    deq = fp8.act_dequant_ref(q, s)
    torch.testing.assert_close(deq[:, :128].abs().amax(1), x[:, :128].abs().amax(1))
    assert fp8.relative_error(fp8.act_dequant_ref(q, s), x) < 0.04  # 3 mantissa bits: ~2-3 % relative
    w = torch.randn(200, 260)
    qw, sw = fp8.weight_quant_ref(w)
    assert sw.shape == (2, 3)
    assert fp8.relative_error(fp8.weight_dequant_ref(qw, sw), w) < 0.04


def test_block_scaling_survives_outliers_where_one_scale_fails():
    """Token scales spanning 1e8: one scale for the tensor flushes the small tokens to zero; one per 1 x 128 tile
    keeps each token's own range."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 256, generator=g) * torch.logspace(-4, 4, 64)[:, None]
    w = torch.randn(128, 256, generator=g) * 0.05
    exact = a @ w.T
    qa, sa = fp8.act_quant_ref(a)
    qw, sw = fp8.weight_quant_ref(w)
    block = fp8.fp8_gemm_ref(qa, sa, qw, sw)
    pa, psa = fp8.per_tensor_quant(a)
    pw, psw = fp8.per_tensor_quant(w)
    tensor = (pa.float() * psa) @ (pw.float() * psw).T
    row_err = lambda approx: ((approx - exact).norm(dim=1) / exact.norm(dim=1))  # noqa: E731
    # E4M3 keeps 3 mantissa bits: each operand is off by ~2-3 % rms, the product by ~3.5 %, on every token alike
    assert fp8.relative_error(block, exact) < 0.05 and row_err(block).mean() < 0.05 and row_err(block).max() < 0.07
    assert row_err(tensor).max() > 0.5  # the smallest tokens are gone
    assert fp8.calc_diff(block, exact) < 1e-3


def test_simulated_fp8_linear_is_close_to_fp32_in_both_directions():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 192, bias=False)
    x = torch.randn(4, 50, 256, requires_grad=True)
    y = lin(x)
    y.square().sum().backward()
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    x.grad, lin.weight.grad = None, None
    lin.__class__ = fp8.FP8Linear
    y8 = lin(x)
    y8.square().sum().backward()
    assert 0 < fp8.relative_error(y8, y) < 0.05
    assert 0 < fp8.relative_error(x.grad, gx) < 0.08 and 0 < fp8.relative_error(lin.weight.grad, gw) < 0.08
    # the backward GEMMs exactly: dgrad with dy in tiles along channels, wgrad with both inputs in tiles along tokens
    dy = (2 * y8).detach().view(-1, 192)
    x2 = x.detach().view(-1, 256)
    w = lin.weight.detach()
    torch.testing.assert_close(x.grad.view(-1, 256), fp8.fake_quant_tiles(dy) @ fp8.fake_quant_blocks(w))
    torch.testing.assert_close(lin.weight.grad, fp8.fake_quant_tiles(dy, dim=0).T @ fp8.fake_quant_tiles(x2, dim=0))
    # the forward is exactly the block-wise GEMM of the reference
    qa, sa = fp8.act_quant_ref(x.detach().view(-1, 256))
    qw, sw = fp8.weight_quant_ref(lin.weight.detach())
    torch.testing.assert_close(y8.detach().view(-1, 192), fp8.fp8_gemm_ref(qa, sa, qw, sw), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# export, training
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small JSONL corpus with structure to learn: 400 short documents of recurring Chinese phrases."""
    import random

    rng = random.Random(0)
    words = ["北京", "上海", "记者", "报道", "今天", "经济", "发展", "市场", "城市", "公司", "新闻", "学生"]
    path = tmp_path_factory.mktemp("ds") / "corpus.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for _ in range(400):  # each word followed by one of the two after it: a chain a model can learn
            i, text = rng.randrange(len(words)), []
            for _ in range(24):
                text.append(words[i])
                i = (i + rng.choice([1, 2])) % len(words)
            f.write(json.dumps({"text": "，".join(text) + "。"}, ensure_ascii=False) + "\n")
    return path


def train_cfg(out: Path, corpus: Path, **kw):
    from deepseek_v3.train import TrainConfig

    model = tiny(vocab_size=0, max_position_embeddings=32, num_nextn_predict_layers=1)
    base = dict(model=model, data_file=str(corpus), tokenizer_dir=str(out.parent / "tok"), tokenizer_vocab=320,
                batch_size=8,
                max_iters=30, warmup_iters=3, eval_every=15, eval_batches=2, save_every=15, log_every=5, threads=1,
                out_dir=str(out), device="cpu", bias_update_speed=0.01)
    return TrainConfig(**{**base, **kw})


def test_training_lowers_the_loss_and_the_bias_moves_only_with_bias_balancing(tmp_path, corpus):
    from deepseek_v3.train import main

    r = main(train_cfg(tmp_path / "bias", corpus))
    s = r["summary"]
    assert s["valid_loss"] < s["initial_valid_loss"] - 1.5
    assert len(s["valid_mtp_losses"]) == 1 and s["valid_mtp_losses"][0] < s["initial_valid_loss"] - 1.0
    bias = [m.e_score_correction_bias for m in r["model"].modules() if isinstance(m, DeepseekV3TopkRouter)]
    assert all(b.abs().sum() > 0 for b in bias)
    assert (tmp_path / "bias" / "loads.png").exists() and (tmp_path / "bias" / "final" / "tokenizer").is_dir()
    r2 = main(train_cfg(tmp_path / "aux", corpus, balance="aux", max_iters=6, eval_every=6, save_every=6))
    assert all(m.e_score_correction_bias.abs().sum() == 0 for m in r2["model"].modules()
               if isinstance(m, DeepseekV3TopkRouter))
    logged = [json.loads(line) for line in (tmp_path / "aux" / "metrics.jsonl").read_text().splitlines()]
    assert any("balance_loss" in rec and rec["balance_loss"] > 0 for rec in logged)


def test_resume_gives_the_uninterrupted_run(tmp_path, corpus):
    import shutil

    from safetensors.torch import load_file

    from deepseek_v3.train import main

    main(train_cfg(tmp_path / "a", corpus, max_iters=20, eval_every=10, save_every=10))
    # a run stopped after step 10: only that checkpoint exists
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_000010", tmp_path / "b" / "checkpoints" / "step_000010")
    r = main(train_cfg(tmp_path / "b", corpus, max_iters=20, eval_every=10, save_every=10, resume=True))
    assert len(r["losses"]) == 10  # it went on from step 10: it did not start again
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.endswith("e_score_correction_bias") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)


def test_fp8_sim_training_runs_and_saves_plain_weights(tmp_path, corpus):
    from deepseek_v3.fp8 import FP8Linear
    from deepseek_v3.train import main

    r = main(train_cfg(tmp_path / "f", corpus, fp8_sim=True, max_iters=10, eval_every=10, save_every=10))
    assert any(isinstance(m, FP8Linear) for m in r["model"].modules())
    assert not isinstance(r["model"].lm_head, FP8Linear) and r["summary"]["valid_loss"] < r["summary"][
        "initial_valid_loss"]


def test_export_loads_in_transformers_with_the_same_greedy_text_and_imports_back(tmp_path, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.checkpoint import load_pretrained
    from deepseek_v3.export_hf import export, import_hf
    from deepseek_v3.train import main

    r = main(train_cfg(tmp_path / "t", corpus, max_iters=15, eval_every=15, save_every=15))
    hf_dir = export(tmp_path / "t" / "final", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ours = r["model"].eval()
    ids = torch.tensor([tok("北京记者")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)["logits"], atol=1e-4, rtol=0)
        theirs = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    mine = ours.generate(ids, 12)[0]
    assert tok.decode(theirs) == tok.decode(mine[:len(theirs)])
    back = import_hf(hf_dir, tmp_path / "back")
    cfg = DeepseekV3Config.from_dict(json.loads((back / "config.json").read_text()))
    again = load_pretrained(DeepseekV3ForCausalLM(cfg), back)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, msg=k)  # MTP included (mtp.safetensors)


def test_two_processes_train_what_one_process_trains(tmp_path, corpus):
    """torchrun, 2 CPU processes of 4 sequences against one of 8: the loads are summed over processes before the
    bias moves, so the biases and the weights agree."""
    from safetensors.torch import load_file

    from deepseek_v3.train import main

    main(train_cfg(tmp_path / "one", corpus, max_iters=4, eval_every=4, save_every=4))
    argv = ["--data-file", str(corpus), "--tokenizer-dir", str(tmp_path / "tok"), "--batch-size", "8",
            "--max-iters", "4", "--warmup-iters", "3", "--eval-every", "4", "--eval-batches", "2", "--save-every", "4",
            "--log-every", "1", "--threads", "1", "--bias-update-speed", "0.01", "--out-dir", str(tmp_path / "two"),
            "--device", "cpu"]
    argv += ["--tokenizer-vocab", "320"]
    for k, v in {**TINY, "vocab_size": 0, "max_position_embeddings": 32, "num_nextn_predict_layers": 1}.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "deepseek_v3.train", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("e_score_correction_bias"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-5


def test_kv_cache_bytes_mla_against_mha_and_gqa():
    from deepseek_v3.bench import kv_cache_bytes

    cfg = tiny()
    rows = kv_cache_bytes(cfg, tokens=10)
    per = {r["attention"]: r["bytes_per_token"] for r in rows}
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    assert per["MLA"] == L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert per["MHA"] == L * 2 * H * cfg.qk_head_dim * 4
    assert per["MHA"] > per["MLA"] and per["GQA"] < per["MHA"]


def test_config_errors_name_the_flag():
    from common.errors import UserError

    with pytest.raises(UserError, match="--n-group"):
        tiny(n_routed_experts=8, n_group=8)
    with pytest.raises(UserError, match="--num-experts-per-tok"):
        tiny(num_experts_per_tok=7)
    with pytest.raises(UserError, match="--qk-rope-head-dim"):
        tiny(qk_rope_head_dim=7)


def test_compare_tabulates_the_controls_and_infer_generates(tmp_path, corpus, capsys):
    from deepseek_v3.compare import CompareConfig
    from deepseek_v3.compare import main as compare
    from deepseek_v3.infer import InferConfig
    from deepseek_v3.infer import main as infer
    from deepseek_v3.train import main as train

    root = tmp_path / "runs"
    for balance, folder in (("bias", "train"), ("none", "none")):
        train(train_cfg(root / folder, corpus, balance=balance, max_iters=6, eval_every=3, save_every=6))
    for run, folder, loss in (("bias", "train", 5.0), ("none", "none", 5.5)):  # a second seed, made up
        summary = json.loads((root / folder / "train_summary.json").read_text())
        (root / "seeds" / f"{run}_7").mkdir(parents=True)
        (root / "seeds" / f"{run}_7" / "train_summary.json").write_text(json.dumps({**summary, "valid_loss": loss}))
    r = compare(CompareConfig(root=str(root), doc=str(tmp_path / "doc"), out=str(tmp_path / "cmp"),
                              tokenizer_dir=str(root / "tok"), data_file=str(corpus)))
    assert "| bias |" in r["table"] and "| none |" in r["table"]
    main_table = r["table"].split("\n\n")[0].splitlines()[2:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in main_table}
    assert 0 < float(rows["bigram counts (reference)"]) < float(rows["unigram counts (reference)"])
    s = {f: json.loads((root / f / "train_summary.json").read_text())["valid_loss"] for f in ("train", "none")}
    none_row = next(line for line in r["table"].split("Other seeds")[1].splitlines() if line.startswith("| none |"))
    assert f"{((s['none'] - s['train']) + 0.5) / 2:+.3f} (2 seeds)" in none_row  # paired: same seed minus bias
    assert all((tmp_path / "doc" / f"deepseek_v3_{n}.png").exists() for n in ("loads", "balance"))
    rec = {x["metric"]: x for x in json.loads((tmp_path / "cmp" / "results.json").read_text())}
    maxvio = {f: json.loads((root / f / "train_summary.json").read_text())["maxvio_mean"] for f in ("train", "none")}
    ratio = maxvio["none"] / maxvio["train"]
    assert rec["maxvio_ratio_none_over_bias"]["value"] == pytest.approx(ratio, abs=1e-3)
    out = infer(InferConfig(ckpt=str(root / "train" / "final"), prompt="北京", max_new_tokens=8, speculative=True))
    plain = infer(InferConfig(ckpt=str(root / "train" / "final"), prompt="北京", max_new_tokens=8))
    assert out["text"] == plain["text"] and out["text"].startswith("北京") and out["stats"]["drafted"] > 0
    assert "drafts accepted" in capsys.readouterr().out
    from deepseek_v3.bench import BenchConfig
    from deepseek_v3.bench import main as bench

    b = bench(BenchConfig(ckpt=str(root / "train" / "final"), tokenizer_dir=str(root / "tok"), data_file=str(corpus),
                          prompts=2, prompt_tokens=8, new_tokens=6, repeats=1, out=str(tmp_path / "bench" / "b.json")))
    assert b["speculative_same_as_greedy"] and b["absorbed_same_as_naive"] and 0 <= b["acceptance_rate"] <= 1
    flushed = {(r["activations"][:6], r["scaling"]): r["tokens_flushed_to_zero"] for r in b["fp8_error"]}
    assert flushed[("outlie", "per-tensor")] > 0 and flushed[("outlie", "block-wise")] == 0
    metrics = {r["metric"] for r in json.loads((tmp_path / "bench" / "results.json").read_text())}
    assert metrics == {"mla_cache_bytes_per_token", "draft_acceptance_rate", "speculative_speedup_over_greedy"}
