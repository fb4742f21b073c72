"""The appendix's building blocks against their references (torch.nn, transformers, torch.amp), their
defining properties, and smoke runs of the demos."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from appendix import attention, linear_attention, memory, norms, parallel, positions, rnn

# ------------------------------------------------------------------------------------------ rnn


@pytest.mark.parametrize("mode", ["rnn", "gru", "lstm"])
def test_recurrent_layer_equals_torch_outputs_and_gradients(mode):
    torch.manual_seed(0)
    ref = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[mode](5, 7, num_layers=2, batch_first=True,
                                                                  bidirectional=True)
    ours = rnn.load_torch_weights(rnn.Recurrent(mode, 5, 7, num_layers=2, bidirectional=True), ref)
    x = torch.randn(3, 6, 5)
    h0 = torch.randn(4, 3, 7)
    state = (h0, torch.randn(4, 3, 7)) if mode == "lstm" else h0
    (y_ref, s_ref), (y, s) = ref(x, state), ours(x, state)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(s if mode == "lstm" else (s,), s_ref if mode == "lstm" else (s_ref,)):
        torch.testing.assert_close(a, b)
    y_ref.pow(2).sum().backward()
    y.pow(2).sum().backward()
    for key, kind, p in rnn._paired(ours, ref):
        torch.testing.assert_close(getattr(ours.cells[key], kind).grad, p.grad, msg=f"{key}.{kind}")


@pytest.mark.parametrize("mode", ["rnn", "gru", "lstm"])
def test_cells_equal_torch_cells(mode):
    torch.manual_seed(1)
    ref = {"rnn": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}[mode](4, 6)
    ours = rnn.CELLS[mode](4, 6)
    ours.load_state_dict(ref.state_dict())
    x, h, c = torch.randn(2, 4), torch.randn(2, 6), torch.randn(2, 6)
    if mode == "lstm":
        for a, b in zip(ours(x, (h, c)), ref(x, (h, c))):
            torch.testing.assert_close(a, b)
    else:
        torch.testing.assert_close(ours(x, h), ref(x, h))


def test_char_lm_loss_falls_and_resume_is_exact(tmp_path):
    common = ["--n-chars", "60000", "--hidden-size", "32", "--embed-dim", "16", "--seq-len", "32",
              "--batch-size", "8", "--max-iters", "30", "--warmup-iters", "2", "--eval-every", "10",
              "--eval-batches", "2", "--log-every", "10", "--sample-chars", "20", "--no-parity"]
    from common.config import parse_config

    straight = rnn.main(parse_config(rnn.CharLMConfig, common + ["--out-dir", str(tmp_path / "a")]))
    assert straight["losses"][-1] < straight["losses"][0] - 0.5  # ~4.2 (uniform over ~70 chars) falls
    # interrupted at step 10 (the first checkpoint), resumed to 30: the same weights as straight through
    first = rnn.main(parse_config(rnn.CharLMConfig, common + ["--out-dir", str(tmp_path / "b"), "--max-iters", "30",
                                                             "--save-every", "10", "--keep-checkpoints", "5"]))
    import shutil

    ckpts = tmp_path / "b" / "checkpoints"
    for p in ckpts.glob("step_*"):
        if p.name != "step_000010":
            shutil.rmtree(p)
    (ckpts / "latest").write_text("step_000010\n")
    resumed = rnn.main(parse_config(rnn.CharLMConfig, common + ["--out-dir", str(tmp_path / "b"), "--resume"]))
    assert resumed["summary"]["resumed_at"] == 10
    assert resumed["losses"] == straight["losses"][10:]
    for (k, a), b in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), k
    assert first["valid_loss"] == straight["valid_loss"]
    assert (tmp_path / "a" / "loss.png").exists() and (tmp_path / "a" / "metrics.jsonl").exists()


def test_char_lm_final_loss_scores_every_window_and_evaluation_leaves_training_alone(tmp_path, capsys):
    """The recorded figure scores every non-overlapping window of the valid text; in training, the same
    evenly spaced windows each time, and the log says so. Two runs that evaluate differently (8 windows every
    5 steps, or all of them once) train to the same weights: with dropout on, training draws from the global
    generator, and evaluation draws from none."""
    import random

    from common.config import parse_config
    from common.data import evenly_spaced

    common = ["--n-chars", "60000", "--hidden-size", "32", "--embed-dim", "16", "--seq-len", "32", "--batch-size", "8",
              "--max-iters", "30", "--warmup-iters", "2", "--log-every", "10", "--sample-chars", "20", "--no-parity",
              "--dropout", "0.2"]
    runs = {}
    for every, batches in (("5", "1"), ("30", "0")):
        capsys.readouterr()
        runs[batches] = rnn.main(parse_config(rnn.CharLMConfig, common + [
            "--eval-every", every, "--eval-batches", batches, "--out-dir", str(tmp_path / batches)]))
        runs[batches]["out"] = capsys.readouterr().out
    subset, whole = runs["1"], runs["0"]
    data, cfg = whole["data"], parse_config(rnn.CharLMConfig, common)
    n = (len(data.valid) - 1) // 32
    assert n == 187 and subset["summary"]["valid_windows"] == n and subset["summary"]["valid_chars"] == n * 32
    assert subset["out"].count(f"(8 of {n} windows, evenly spaced)") == 7  # steps 0, 5, ..., 30
    assert "evenly spaced" not in whole["out"] and f"all {n} windows of 32" in whole["out"]
    assert subset["losses"] == whole["losses"]
    for (k, a), b in zip(subset["model"].state_dict().items(), whole["model"].state_dict().values()):
        assert torch.equal(a, b), k
    assert subset["valid_loss"] == whole["valid_loss"]
    # the whole split, read as consecutive windows from a zero state; a subset is those windows' mean
    model = whole["model"].eval()
    x, y = data.valid[: n * 32].view(n, 32), data.valid[1: n * 32 + 1].view(n, 32)
    with torch.no_grad():
        per_window = F.cross_entropy(model(x)[0].transpose(1, 2), y, reduction="none").mean(1)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    assert rnn.evaluate(model, data, cfg)["loss"] == pytest.approx(per_window.mean().item(), rel=1e-5)
    part = rnn.evaluate(model, data, cfg, max_windows=8)
    assert part["windows"] == 8 and part["of_windows"] == n
    assert part["loss"] == pytest.approx(per_window[evenly_spaced(n, 8)].mean().item(), rel=1e-5)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state


# ------------------------------------------------------------------------------------------ norms


def test_norms_equal_torch():
    for row in norms.parity_rows(seed=3):
        assert row["max_diff"] < 1e-5, row


def test_rmsnorm_equals_transformers_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
    ours = norms.RMSNorm(16)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(ours(x), ref(x))


def test_batchnorm_uses_batch_statistics_in_training_and_running_ones_in_eval():
    bn = norms.BatchNorm(3)
    x = torch.randn(16, 3, 4) * 5 + 2
    y = bn(x)
    torch.testing.assert_close(y.mean(dim=(0, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(bn.running_mean, 0.1 * x.mean(dim=(0, 2)))
    bn.eval()
    assert not torch.allclose(bn(x), y, atol=1e-2)  # running stats have seen one batch only


def test_invariances_of_each_norm():
    rows = {r["norm"]: r for r in norms.property_rows()}
    assert rows["BatchNorm"]["batch_mates"] > 0.1  # a sample's output depends on the rest of the batch
    assert rows["LayerNorm"]["batch_mates"] == 0 and rows["RMSNorm"]["batch_mates"] == 0
    assert rows["LayerNorm"]["token_scale"] < 1e-3 and rows["LayerNorm"]["token_shift"] < 1e-5
    assert rows["RMSNorm"]["token_scale"] < 1e-4 and rows["RMSNorm"]["token_shift"] > 0.1  # no centring


# ------------------------------------------------------------------------------------------ positions


def test_rope_two_ways_agree_after_the_permutation_only():
    torch.manual_seed(0)
    D, T = 16, 10
    x = torch.randn(2, 3, T, D)
    pos = torch.arange(T)
    perm = positions.interleaved_to_half(D)
    real = positions.apply_rope(x[..., perm], *positions.rope_cos_sin(pos, D))
    cplx = positions.apply_rope_complex(x, positions.rope_freqs_cis(pos, D))
    torch.testing.assert_close(real, cplx[..., perm])
    assert (positions.apply_rope(x, *positions.rope_cos_sin(pos, D)) - cplx).abs().max() > 0.1  # layouts differ


def test_rope_equals_transformers_apply_rotary_pos_emb():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    pos = torch.arange(3, 12)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, pos[None])
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    ours_cos, ours_sin = positions.rope_cos_sin(pos, 16)
    torch.testing.assert_close(positions.apply_rope(q, ours_cos, ours_sin), q_ref)
    torch.testing.assert_close(positions.apply_rope(k, ours_cos, ours_sin), k_ref)


def test_rope_score_depends_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    cos, sin = (t.double() for t in positions.rope_cos_sin(torch.arange(400), 32))

    def score(m, n):
        return positions.apply_rope(q, cos[m], sin[m]) @ positions.apply_rope(k, cos[n], sin[n])

    for m, n, s in ((0, 0, 300), (7, 3, 111), (2, 50, 250)):
        assert abs(score(m, n) - score(m + s, n + s)) < 1e-4  # the angles are float32
    assert abs(score(10, 0) - score(0, 10)) > 1e-3  # but it does depend on the sign of m - n


def test_sinusoidal_table_and_rope_decay_bound():
    table = positions.sinusoidal_table(50, 8)
    p, i = 17, 1
    assert table[p, 2 * i] == pytest.approx(math.sin(p / 10000 ** (2 * i / 8)), abs=1e-6)
    assert table[p, 2 * i + 1] == pytest.approx(math.cos(p / 10000 ** (2 * i / 8)), abs=1e-6)
    bound = positions.rope_decay_bound(128, 256)
    assert bound[0] == pytest.approx(sum(range(1, 65)) / 64)  # |S_i| = i at distance 0
    assert bound[200:].max() < bound[0] / 2  # decays with distance


def test_extrapolation_experiment_runs_and_learned_table_refuses_longer_inputs(tmp_path, capsys):
    cfg = positions.PositionsConfig(max_iters=20, n_chars=40_000, eval_lens="32,64", train_len=32,
                                    batch_size=4, encodings="learned,rope", out_dir=str(tmp_path))
    rows = positions.run_extrapolation(cfg)
    assert [r["encoding"] for r in rows] == ["learned", "rope"]
    # every length scores all the windows that tile the 4,000-character valid split, and says nothing of a subset
    assert all(r["len32_windows"] == 3999 // 32 and r["len64_windows"] == 3999 // 64 for r in rows)
    assert "evenly spaced" not in capsys.readouterr().out
    assert all(math.isfinite(r["len64_pos32"]) for r in rows)
    assert (tmp_path / "rope" / "metrics.jsonl").exists() and (tmp_path / "rope" / "loss.png").exists()
    with pytest.raises(ValueError, match="longer than the learned table"):
        positions.LearnedPositions(8, 4)(9)


def test_per_position_loss_tiles_the_split_or_takes_evenly_spaced_windows():
    from common.data import evenly_spaced

    src = torch.randint(0, 11, (1000,))
    x, y = positions.tiling_windows(src, 64)
    assert x.shape == (15, 64) and torch.equal(x.flatten(), src[:960]) and torch.equal(y.flatten(), src[1:961])
    torch.manual_seed(0)
    model = positions.TinyLM(11, positions.PositionsConfig(dim=16, n_head=2, n_layer=1), "rope", 64).eval()
    with torch.no_grad():
        each = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none")  # (15, 64)
    state = torch.get_rng_state()
    whole, k, n = positions.per_position_loss(model, src, 64, batch_size=4)
    assert (k, n) == (15, 15)
    torch.testing.assert_close(whole, each.mean(0))
    part, k, n = positions.per_position_loss(model, src, 64, batch_size=4, max_windows=4)
    assert (k, n) == (4, 15)
    torch.testing.assert_close(part, each[evenly_spaced(15, 4)].mean(0))
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------------------ attention


def test_mha_equals_torch_multihead_attention():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, batch_first=True)
    ours = attention.GroupedQueryAttention(32, 4, 4, bias=True, rope=False)
    with torch.no_grad():
        for proj, w, b in zip((ours.q_proj, ours.k_proj, ours.v_proj), ref.in_proj_weight.chunk(3),
                              ref.in_proj_bias.chunk(3)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        ours.o_proj.weight.copy_(ref.out_proj.weight)
        ours.o_proj.bias.copy_(ref.out_proj.bias)
    x = torch.randn(2, 7, 32)
    mask = torch.ones(7, 7, dtype=torch.bool).triu(1)
    torch.testing.assert_close(ours(x)[0], ref(x, x, x, attn_mask=mask, need_weights=False)[0])


@pytest.mark.parametrize("groups", [1, 2])  # 1 is MQA
def test_gqa_is_mha_whose_kv_heads_are_shared_within_groups(groups):
    torch.manual_seed(0)
    H, D = 4, 8
    gqa = attention.GroupedQueryAttention(H * D, H, groups)
    mha = attention.GroupedQueryAttention(H * D, H, H)
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for a, b in ((mha.k_proj, gqa.k_proj), (mha.v_proj, gqa.v_proj)):
            a.weight.copy_(b.weight.view(groups, D, -1).repeat_interleave(H // groups, dim=0).reshape(H * D, -1))
    x = torch.randn(2, 5, H * D)
    torch.testing.assert_close(gqa(x)[0], mha(x)[0])
    assert gqa(x)[1][0].shape == (2, groups, 5, D)  # the cache holds only the shared heads


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_mla_absorbed_equals_naive_and_cache_decoding_equals_full(absorb, q_lora_rank):
    torch.manual_seed(0)
    mla = attention.MultiHeadLatentAttention(64, 4, 32, 16, 8, 12, q_lora_rank=q_lora_rank).double()
    x = torch.randn(2, 6, 64, dtype=torch.float64)
    mla.absorb = False
    naive, cache = mla(x)
    mla.absorb = True  # whatever the parametrisation, the absorbed form must equal the naive one
    torch.testing.assert_close(mla(x)[0], naive)
    mla.absorb = absorb  # the cache decoding below runs in the parametrised form
    full = mla(x)[0]
    torch.testing.assert_close(full, naive)
    assert cache[0].shape == (2, 6, 32) and cache[1].shape == (2, 6, 8)  # latent + shared rope key only
    # decode the last two tokens one by one from the cache of the first four
    out, c = mla(x[:, :4])
    steps = [out]
    for t in (4, 5):
        y, c = mla(x[:, t: t + 1], c)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_gqa_cache_decoding_equals_full_forward():
    torch.manual_seed(0)
    gqa = attention.GroupedQueryAttention(32, 4, 2)
    x = torch.randn(1, 5, 32)
    full = gqa(x)[0]
    y0, cache = gqa(x[:, :3])
    y1, cache = gqa(x[:, 3:], cache)
    torch.testing.assert_close(torch.cat([y0, y1], dim=1), full)


def test_attention_table_counts_cache_and_params():
    rows = {r["variant"].split()[0]: r for r in attention.table(attention.AttentionConfig())}
    assert rows["MHA"]["cache_values_per_token"] == 2 * 4096
    assert rows["GQA"]["cache_values_per_token"] == 2 * 8 * 128
    assert rows["MQA"]["cache_values_per_token"] == 2 * 128
    assert rows["MLA"]["cache_values_per_token"] == 512 + 64
    assert rows["MHA"]["params"] == 4 * 4096 * 4096


# ------------------------------------------------------------------------------------------ linear attention


def test_linear_attention_forms_agree():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 21, 8, dtype=torch.float64) for _ in range(3))
    la = linear_attention
    torch.testing.assert_close(la.linear_attention(q, k, v), la.linear_attention_quadratic(q, k, v))
    causal = la.linear_attention_quadratic(q, k, v, causal=True)
    torch.testing.assert_close(la.recurrent_linear_attention(q, k, v), causal)
    torch.testing.assert_close(la.causal_linear_attention(q, k, v, chunk=5), causal)
    # causal: the first output sees only the first value
    torch.testing.assert_close(causal[..., 0, :], v[..., 0, :], atol=1e-5, rtol=0)
    # and it is a different function from softmax attention
    assert (la.linear_attention(q, k, v) - la.softmax_attention(q, k, v)).abs().max() > 1e-2


def test_softmax_attention_reference_equals_sdpa():
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    torch.testing.assert_close(linear_attention.softmax_attention(q, k, v, causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


# ------------------------------------------------------------------------------------------ memory


def test_loss_scaler_follows_torch_grad_scaler():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    ours = memory.DynamicLossScaler(init_scale=2.0**10, growth_interval=3)
    ref = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    for step in range(10):
        x = torch.randn(5, 4)
        for model, opt, scaler in ((a, opt_a, ours), (b, opt_b, ref)):
            opt.zero_grad()
            scaler.scale(model(x).square().mean()).backward()
            if step in (2, 6):  # an overflow: the step is skipped and the scale halves
                model.weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        assert ours.scale_value == ref.get_scale(), step
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q)
    assert ours.scale_value == 2.0**10  # 2 halvings, 2 doublings (3 clean steps twice)


def test_optimizer_comparison_scores_every_valid_window():
    """The 32-bit vs 8-bit Adam table's valid loss covers the whole valid split (1,718 windows of 64)."""
    pytest.importorskip("bitsandbytes")
    rows, grads = memory.optimizer_rows(memory.MemoryConfig(optim_steps=2))
    assert [r["valid_windows"] for r in rows] == [(110_000 - 1) // 64] * 2
    assert all(math.isfinite(r["valid_loss"]) for r in rows) and list(grads) == ["step 1", "step 2"]


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = memory.BlockStack(2, 32, 4)
    ckpt = memory.BlockStack(2, 32, 4, checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 8, 32)
    plain(x).square().mean().backward()
    ckpt(x).square().mean().backward()
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_autocast_runs_matmuls_in_bf16_and_norms_in_fp32():
    dtypes = memory.autocast_dtypes()
    assert dtypes["Linear"] == "torch.bfloat16"
    assert dtypes["LayerNorm"] == "torch.float32"
    assert dtypes["cross_entropy (the loss)"] == "torch.float32"


def test_fp16_flushes_small_gradients_and_scaling_rescues_them():
    g = torch.tensor([1e-9, 2e-8, 1e-6, 1e-2])
    assert (g.half() == 0).sum() == 2  # below 2^-24 ~ 6e-8 rounds to 0
    assert ((g * 2**16).half() == 0).sum() == 0
    # the chapter's table measures the same thing: 1e-9 and 2e-8 flush, 1e-6 survives only as a subnormal;
    # with a 2^16 scale nothing flushes or overflows; bf16 (fp32's exponent range) flushes none
    rows = {r["format"]: r for r in memory.underflow_rows({"g": g})}
    assert rows["fp16, loss scale 1"] == {"gradients": "g", "format": "fp16, loss scale 1", "zero": 0.5,
                                          "subnormal": 0.25, "inf": 0.0}
    assert rows["fp16, loss scale 65536"] == {"gradients": "g", "format": "fp16, loss scale 65536", "zero": 0.0,
                                              "subnormal": 0.0, "inf": 0.0}
    assert rows["bf16, no scaling"]["zero"] == 0.0 and rows["bf16, no scaling"]["inf"] == 0.0
    # an overflow is counted too: 2 * 2^16 is past fp16's largest finite value (65504)
    assert memory.underflow_rows({"g": torch.tensor([2.0])})[1]["inf"] == 1.0


# ------------------------------------------------------------------------------------------ parallel


def test_ddp_fsdp_and_tensor_parallel_equal_one_process(tmp_path):
    report = parallel.compare(parallel.ParallelConfig(out_dir=str(tmp_path)))
    for s in ("ddp", "fsdp"):
        assert report[s]["weights_max_diff"] < 1e-6, (s, report[s])
        assert report[s]["loss_max_diff"] < 1e-5
    assert report["single_losses"][-1] < report["single_losses"][0]
    assert max(report["tp"].values()) < 1e-5, report["tp"]
    assert parallel.gpipe_bubble(4, 4) == pytest.approx(3 / 7)


def test_parallel_old_steps_flag_names_max_iters():
    from common.config import parse_config, renamed_fields

    assert renamed_fields(parallel.ParallelConfig) == {"steps": "max_iters"}
    assert parse_config(parallel.ParallelConfig, ["--steps", "3"]).max_iters == 3
