"""transformer_basics/model.py against torch's own attention and nn.Transformer (T1-T6, T10)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer_basics.model import (
    MultiHeadAttention,
    PositionwiseFeedForward,
    Transformer,
    TransformerConfig,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
    sinusoidal_table,
)


def tiny(**kw) -> TransformerConfig:
    base = dict(src_vocab_size=50, tgt_vocab_size=40, d_model=32, n_heads=4, n_encoder_layers=2,
                n_decoder_layers=2, dropout=0.0, max_len=64)
    return TransformerConfig(**{**base, **kw})


def test_sdpa_matches_torch_with_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True  # every query keeps at least one key
    ours, _ = scaled_dot_product_attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, ref)


def test_scale_keeps_softmax_from_saturating():
    # T1: with D = 512, unscaled logits have std ~ sqrt(D) ~ 23 and the softmax is almost one-hot
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 16, 512), torch.randn(1, 1, 16, 512)
    v = torch.randn(1, 1, 16, 512)
    _, scaled = scaled_dot_product_attention(q, k, v)
    unscaled = (q @ k.transpose(-2, -1)).softmax(-1)
    assert unscaled.max(-1).values.mean() > 0.8
    assert scaled.max(-1).values.mean() < 0.5


def test_padded_keys_get_zero_weight():
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    x = torch.randn(2, 5, 32)
    _, w = MultiHeadAttention(32, 4)(x, mask=padding_mask(ids, 0))
    assert torch.all(w[0, :, :, 3:] == 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 5))


def test_causal_mask_no_position_sees_the_future():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    src = torch.randint(4, 50, (2, 6))
    tgt = torch.randint(4, 40, (2, 8))
    logits = model(src, tgt)
    tgt2 = tgt.clone()
    tgt2[:, 5:] = torch.randint(4, 40, (2, 3))  # change the future of position 4
    logits2 = model(src, tgt2)
    torch.testing.assert_close(logits[:, :5], logits2[:, :5])
    assert not torch.allclose(logits[:, 5:], logits2[:, 5:])
    assert causal_mask(4)[0, 0].tolist() == [[True, False, False, False], [True, True, False, False],
                                            [True, True, True, False], [True, True, True, True]]


def _copy_mha(ours: MultiHeadAttention, ref: nn.MultiheadAttention):
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.o_proj.weight)
        ref.out_proj.bias.copy_(ours.o_proj.bias)


def test_mha_matches_nn_multiheadattention():
    torch.manual_seed(0)
    ours = MultiHeadAttention(32, 4)
    ref = nn.MultiheadAttention(32, 4, batch_first=True)
    _copy_mha(ours, ref)
    x, mem = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    ids = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    out, w = ours(x, mem, padding_mask(ids, 0))
    ref_out, ref_w = ref(x, mem, mem, key_padding_mask=ids == 0, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)


def _reference_transformer(cfg: TransformerConfig) -> nn.Transformer:
    C = cfg.d_model
    kw = dict(d_model=C, nhead=cfg.n_heads, dim_feedforward=cfg.ffn_mult * C, dropout=0.0, batch_first=True,
              norm_first=cfg.norm_first, layer_norm_eps=cfg.layer_norm_eps)
    # nn.Transformer always adds a final LayerNorm; the paper's post-LN stack has none
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(**kw), cfg.n_encoder_layers,
                                norm=nn.LayerNorm(C) if cfg.norm_first else None, enable_nested_tensor=False)
    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(**kw), cfg.n_decoder_layers,
                                norm=nn.LayerNorm(C) if cfg.norm_first else None)
    return nn.Transformer(d_model=C, nhead=cfg.n_heads, custom_encoder=enc, custom_decoder=dec, batch_first=True)


def _copy_into_reference(model: Transformer, ref: nn.Transformer):
    with torch.no_grad():
        for ours, theirs in zip(model.encoder.layers, ref.encoder.layers):
            _copy_mha(ours.self_attn, theirs.self_attn)
            theirs.linear1.load_state_dict(ours.ffn.fc1.state_dict())
            theirs.linear2.load_state_dict(ours.ffn.fc2.state_dict())
            theirs.norm1.load_state_dict(ours.self_attn_layer_norm.state_dict())
            theirs.norm2.load_state_dict(ours.final_layer_norm.state_dict())
        for ours, theirs in zip(model.decoder.layers, ref.decoder.layers):
            _copy_mha(ours.self_attn, theirs.self_attn)
            _copy_mha(ours.encoder_attn, theirs.multihead_attn)
            theirs.linear1.load_state_dict(ours.ffn.fc1.state_dict())
            theirs.linear2.load_state_dict(ours.ffn.fc2.state_dict())
            theirs.norm1.load_state_dict(ours.self_attn_layer_norm.state_dict())
            theirs.norm2.load_state_dict(ours.encoder_attn_layer_norm.state_dict())
            theirs.norm3.load_state_dict(ours.final_layer_norm.state_dict())
        if model.config.norm_first:
            ref.encoder.norm.load_state_dict(model.encoder.layer_norm.state_dict())
            ref.decoder.norm.load_state_dict(model.decoder.layer_norm.state_dict())


@pytest.mark.parametrize("norm_first", [False, True])
def test_whole_model_matches_nn_transformer(norm_first):
    """T6: same weights, same inputs (embeddings, masks) -> same logits as torch's nn.Transformer."""
    torch.manual_seed(0)
    cfg = tiny(norm_first=norm_first)
    model = Transformer(cfg).eval()
    ref = _reference_transformer(cfg).eval()
    _copy_into_reference(model, ref)
    src = torch.randint(4, 50, (3, 9))
    src[1, 6:] = 0  # padding
    tgt = torch.randint(4, 40, (3, 7))
    tgt[2, 5:] = 0
    ours = model(src, tgt)
    T = tgt.size(1)
    h = ref(model.encoder.embed(src), model.decoder.embed(tgt),
            tgt_mask=torch.ones(T, T, dtype=torch.bool).triu(1),  # True = masked
            src_key_padding_mask=src == 0, tgt_key_padding_mask=tgt == 0, memory_key_padding_mask=src == 0)
    theirs = model.lm_head(h)
    keep = tgt != 0
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-5, rtol=1e-4)


def test_sinusoidal_table_formula_and_relative_shift():
    pe = sinusoidal_table(100, 16)
    pos, i = 7, 3
    assert pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    # PE(pos + k) is a fixed rotation of PE(pos) in each (sin, cos) pair: one matrix works for all pos
    k = 5
    w = 1 / 10000 ** (2 * i / 16)
    rot = torch.tensor([[math.cos(k * w), -math.sin(k * w)], [math.sin(k * w), math.cos(k * w)]])
    pairs = pe[:, 2 * i:2 * i + 2]
    torch.testing.assert_close(pairs[:-k] @ rot, pairs[k:], atol=1e-5, rtol=1e-4)


def test_ffn_hidden_is_four_times_d_model():
    ffn = Transformer(tiny()).encoder.layers[0].ffn
    assert isinstance(ffn, PositionwiseFeedForward)
    assert ffn.fc1.weight.shape == (4 * 32, 32) and ffn.fc2.weight.shape == (32, 4 * 32)


def test_head_untied_by_default_and_tied_on_request():
    untied = Transformer(tiny())
    assert untied.lm_head.weight.data_ptr() != untied.decoder.embed.embed_tokens.weight.data_ptr()
    tied = Transformer(tiny(tie_embeddings=True))
    assert tied.lm_head.weight is tied.decoder.embed.embed_tokens.weight
    assert tied.num_parameters() == untied.num_parameters() - 40 * 32


def test_mha_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(30, 4)
