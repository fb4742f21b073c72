"""The chapter's tokenizer: byte-level BPE trained on the pretraining corpus, saved as a transformers tokenizer.

Byte-level BPE (GPT-2; Sennrich et al. 2016 for BPE): start from the 256 byte values, so any text is
encodable and nothing is ever unknown, then repeatedly merge the most frequent adjacent pair into a new
token until the vocabulary is full. A Chinese character is 3 UTF-8 bytes; frequent characters and
words become single tokens, rare ones stay as byte pieces.

Special tokens (minimind's): <|endoftext|> = 0 (padding), <|im_start|> = 1 (begin), <|im_end|> = 2 (end).
The chat template is ChatML: ``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>``.
The command is train_tokenizer.py; train_pretrain.py also builds one here when none exists yet.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from common.data import read_text_file

from .dataset import CharTokenizer, encode_documents, load_documents

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' and add_default_system %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe(texts, vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # bytes -> printable symbols, split
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tok.train_from_iterator(texts, trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def save_hf_tokenizer(tok: Tokenizer, out_dir: str | Path) -> Path:
    """Wrap as PreTrainedTokenizerFast with the special tokens and chat template, so that
    ``AutoTokenizer.from_pretrained(out_dir)`` loads it with no custom code."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE,
                                   model_max_length=32768, clean_up_tokenization_spaces=False)
    fast.save_pretrained(out_dir)
    return Path(out_dir)


def chars_per_token(tok: Tokenizer, texts: list[str]) -> float:
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts))
    return sum(map(len, texts)) / n_tokens


def build_tokenizer(out_dir: str | Path, data_file: str = "", hf_dataset: str = "", vocab_size: int = 6400,
                    min_frequency: int = 2, max_documents: int = 0) -> dict:
    """Train on the pretraining documents' train split, save to ``out_dir`` with tokenizer_stats.json;
    -> the stats (vocabulary, characters per token on held-out documents, timing)."""
    splits = load_documents(data_file, hf_dataset, max_documents)
    t0 = time.perf_counter()
    tok = train_bpe(splits["train"], vocab_size, min_frequency)
    wall = time.perf_counter() - t0
    out = save_hf_tokenizer(tok, out_dir)
    held_out = splits["valid"] or splits["train"][:100]
    stats = {"vocab_size": tok.get_vocab_size(), "chars_per_token_valid": chars_per_token(tok, held_out),
             "train_documents": len(splits["train"]), "train_wall_s": wall}
    (out / "tokenizer_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    sample = held_out[0][:30]
    stats["sample"] = (sample, [tok.decode([i]) for i in tok.encode(sample).ids])
    return stats


def load_tokenizer(kind: str, tokenizer_dir: str | Path, out_dir: str | Path, text: str | None = None,
                   data_file: str = "", hf_dataset: str = ""):
    """-> (encode, decode, vocab_size, bos_id, eos_id). ``kind`` bpe: the transformers tokenizer directory
    (trained now, on data_file / hf_dataset / the default corpus, if it does not exist yet). char: built
    from ``text`` and saved in out_dir, or read back from there when ``text`` is None."""
    if kind == "char":
        path = Path(out_dir) / "char_vocab.json"
        if text is None:
            tok = CharTokenizer(json.loads(path.read_text(encoding="utf-8")))
        else:
            tok = CharTokenizer(text)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(tok.chars, ensure_ascii=False), encoding="utf-8")
        return tok.encode, tok.decode, tok.vocab_size, None, None
    if kind != "bpe":
        raise ValueError(f"--tokenizer must be bpe or char, not {kind!r}")
    from transformers import AutoTokenizer

    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        print(f"no tokenizer in {tokenizer_dir}: training one first (python -m gpt_minimind.train_tokenizer)")
        build_tokenizer(tokenizer_dir, data_file, hf_dataset)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def encode(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False)

    return encode, tok.decode, len(tok), tok.bos_token_id, tok.eos_token_id


def load_streams(kind: str, tokenizer_dir: str | Path, out_dir: str | Path, data_file: str = "", text_file: str = "",
                 hf_dataset: str = "", max_documents: int = 0) -> tuple[dict[str, torch.Tensor], dict, dict[str, int]]:
    """Token streams for train and valid, the tokenizer (a dict of encode, decode, vocab_size, bos, eos),
    and the character count of each split. ``text_file``: plain text, first 90% train (nanoGPT's split)."""
    if text_file:
        text = read_text_file(text_file)
        cut = int(len(text) * 0.9)
        splits = {"train": [text[:cut]], "valid": [text[cut:]]}
    else:
        splits = load_documents(data_file, hf_dataset, max_documents)
        text = None
    if not splits["valid"]:
        raise ValueError("the valid split is empty: too few documents (need ~50+)")
    encode, decode, vocab, bos, eos = load_tokenizer(kind, tokenizer_dir, out_dir, text if kind == "char" else None,
                                                     data_file, hf_dataset)
    streams = {k: encode_documents(v, encode, bos, eos) for k, v in splits.items()}
    chars = {k: sum(map(len, v)) for k, v in splits.items()}
    return streams, {"encode": encode, "decode": decode, "vocab_size": vocab, "bos": bos, "eos": eos}, chars
