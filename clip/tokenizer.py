"""The chapter's caption tokenizer: byte-level BPE trained on the training captions with `tokenizers`, saved
as a transformers tokenizer directory (``AutoTokenizer.from_pretrained`` loads it, and so does the
zero-shot pipeline of an exported model).

    "a small teal triangle" -> <|startoftext|> a Ġsmall Ġteal Ġtriangle <|endoftext|>

As in CLIP, text is lower-cased and every caption is wrapped in <|startoftext|> ... <|endoftext|>: the text
tower reads its feature at <|endoftext|>. Padding uses its own <pad> id (0), so the first <|endoftext|> is
always the caption's end. Ids: <pad> 0, <|endoftext|> 1, <|startoftext|> 2 (see model.py, to_hf_dict, on
why the end-of-text id must not be 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

PAD, EOS, BOS = "<pad>", "<|endoftext|>", "<|startoftext|>"
SPECIALS = [PAD, EOS, BOS]


def train_tokenizer(texts: Sequence[str], vocab_size: int, out_dir: str | Path, max_len: int):
    """Train byte-level BPE (at most ``vocab_size`` tokens, the 256 bytes and the 3 specials included) and
    save it to ``out_dir``; returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=max_len)
    fast.save_pretrained(str(out_dir))
    return fast


def load_or_train_tokenizer(out_dir: str | Path, texts: Sequence[str], vocab_size: int, max_len: int):
    """The tokenizer in ``out_dir``, trained there first on ``texts`` if it holds none."""
    from transformers import AutoTokenizer

    if (Path(out_dir) / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(out_dir))
    return train_tokenizer(texts, vocab_size, out_dir, max_len)


def encode(tok, captions: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T) with T the longest caption (at most max_len; a longer caption
    is cut, and still ends in <|endoftext|>)."""
    enc = tok(list(captions), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]
