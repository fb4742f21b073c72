"""Scoring a summarizer: character-level ROUGE, the lead baselines, and a split summarized with greedy and beam
search (infer.py prints these; train_summarize.py writes them into its results)."""

from __future__ import annotations

import time
import unicodedata
from collections import Counter

import torch

from .dataset import PAD, Tokenizer
from .decoding import beam_search, greedy_decode

# ---------------------------------------------------------------------------------------------------
# ROUGE on characters (Chinese has no spaces; every character is a token)
# ---------------------------------------------------------------------------------------------------

def normalize_for_rouge(text: str) -> list[str]:
    """Characters of the text, lower-cased, without spaces and punctuation."""
    return [c for c in text.lower() if not c.isspace() and not unicodedata.category(c).startswith("P")]


def _f1(overlap: int, n_cand: int, n_ref: int) -> float:
    if overlap == 0 or n_cand == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_cand, overlap / n_ref
    return 2 * p * r / (p + r)


def rouge_n(cand: list[str], ref: list[str], n: int) -> float:
    c = Counter(tuple(cand[i: i + n]) for i in range(len(cand) - n + 1))
    r = Counter(tuple(ref[i: i + n]) for i in range(len(ref) - n + 1))
    return _f1(sum((c & r).values()), sum(c.values()), sum(r.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_scores(candidates: list[str], references: list[str]) -> dict[str, float]:
    """Mean character-level ROUGE-1/2/L F1 x 100 over the pairs."""
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for cand, ref in zip(candidates, references):
        c, r = normalize_for_rouge(cand), normalize_for_rouge(ref)
        totals["rouge1"] += rouge_n(c, r, 1)
        totals["rouge2"] += rouge_n(c, r, 2)
        totals["rougeL"] += _f1(lcs_length(c, r), len(c), len(r))
    return {k: 100 * v / max(len(references), 1) for k, v in totals.items()}


def lead_baselines(pairs: list[dict]) -> dict[str, dict[str, float]]:
    """The first 10 / 20 characters of the body, and its first sentence, as the headline."""
    refs = [p["summary"] for p in pairs]

    def first_sentence(text: str) -> str:
        for i, ch in enumerate(text):
            if ch in "。！？!?" and i >= 4:
                return text[: i + 1]
        return text[:30]

    return {"lead10": rouge_scores([p["text"][:10] for p in pairs], refs),
            "lead20": rouge_scores([p["text"][:20] for p in pairs], refs),
            "first_sentence": rouge_scores([first_sentence(p["text"]) for p in pairs], refs)}


# ---------------------------------------------------------------------------------------------------
# A split summarized and scored
# ---------------------------------------------------------------------------------------------------

def encode_sources(tok: Tokenizer, texts: list[str], prefix: str, max_len: int, device):
    rows = [tok.encode(prefix + t, max_len=max_len) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows], device=device)
    return ids, (ids != PAD).long()


def summarize(model, tok: Tokenizer, texts: list[str], cfg, beams: int) -> list[str]:
    out = []
    for i in range(0, len(texts), cfg.batch_size):
        ids, mask = encode_sources(tok, texts[i: i + cfg.batch_size], cfg.prefix, cfg.max_source_len,
                                   next(model.parameters()).device)
        if beams <= 1:
            seqs = greedy_decode(model, ids, mask, cfg.max_target_len, cfg.no_repeat_ngram_size)
        else:
            seqs = beam_search(model, ids, mask, cfg.max_target_len, beams, cfg.length_penalty,
                               cfg.no_repeat_ngram_size)
        out += [tok.decode(s) for s in seqs]
    return out


def evaluate_split(model, tok: Tokenizer, pairs: list[dict], cfg) -> dict:
    """Greedy and beam ROUGE on ``pairs``, with the decoding time of each."""
    texts, refs = [p["text"] for p in pairs], [p["summary"] for p in pairs]
    result = {}
    for name, beams in (("greedy", 1), ("beam", cfg.num_beams)):
        t0 = time.perf_counter()
        hyps = summarize(model, tok, texts, cfg, beams)
        result[name] = {**rouge_scores(hyps, refs), "decode_s": time.perf_counter() - t0, "outputs": hyps}
    return result
