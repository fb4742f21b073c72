"""bert_address_cls: BERT against transformers, the masking statistics, the address data and labels."""

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
