"""Use the summarizer: greedy and beam search written out, character-level ROUGE, lead baselines.

    python -m t5_summarization.infer                                   # test split: greedy vs beam, ROUGE
    python -m t5_summarization.infer --text "新闻正文……"                # one article -> its headline
    python -m t5_summarization.infer --ckpt runs/t5_summarization/summarize_random/final

Greedy picks the most likely token at each step. Beam search keeps the ``num_beams`` best partial
headlines by summed log-probability; a finished one is scored by sum / length^length_penalty (so
``length_penalty`` > 0 favours longer ones); ``no_repeat_ngram_size`` forbids any n-gram to appear
twice; with ``early_stopping`` the search ends once ``num_beams`` headlines are finished. These are the
rules of transformers' ``generate``, and the test checks that both decoders give its tokens.
"""

from __future__ import annotations

import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from common.checkpoint import load_pretrained, read_config
from common.config import parse_config
from common.runtime import pick_device, set_threads

from .dataset import EOS, PAD, Tokenizer, summarization_pairs
from .model import T5Config, T5ForConditionalGeneration

# ---------------------------------------------------------------------------------------------------
# 1) decoding
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_decode(model: T5ForConditionalGeneration, ids: torch.Tensor, mask: torch.Tensor, max_len: int,
                  no_repeat_ngram_size: int = 0) -> list[list[int]]:
    """Batch greedy decoding with the KV cache; each row stops at </s> (then pads)."""
    model.eval()
    enc = model.encode(ids, mask)
    B = ids.shape[0]
    cur = torch.full((B, 1), model.config.decoder_start_token_id, dtype=torch.long, device=ids.device)
    out, done, cache = [], torch.zeros(B, dtype=torch.bool, device=ids.device), None
    seqs = cur
    for _ in range(max_len):
        logits, cache = model.decode(cur, enc, mask, cache)
        logp = logits[:, -1].float().log_softmax(-1)
        if no_repeat_ngram_size:
            logp = ban_repeated_ngrams(logp, seqs, no_repeat_ngram_size)
        nxt = logp.argmax(-1).masked_fill(done, PAD)
        out.append(nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        done |= nxt == EOS
        cur = nxt[:, None]
        if done.all():
            break
    rows = torch.stack(out, dim=1).tolist()
    return [r[: r.index(EOS) + 1] if EOS in r else r for r in rows]


def ban_repeated_ngrams(logp: torch.Tensor, seqs: torch.Tensor, n: int) -> torch.Tensor:
    """Set -inf on every token that would complete an n-gram already in the sequence (per row)."""
    logp = logp.clone()
    T = seqs.shape[1]
    if T + 1 < n:
        return logp
    for b, row in enumerate(seqs.tolist()):
        prefix = tuple(row[T - n + 1:])
        banned = [row[i + n - 1] for i in range(T - n + 1) if tuple(row[i: i + n - 1]) == prefix]
        if banned:
            logp[b, banned] = float("-inf")
    return logp


@torch.no_grad()
def beam_search(model: T5ForConditionalGeneration, ids: torch.Tensor, mask: torch.Tensor, max_len: int,
                num_beams: int = 4, length_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                early_stopping: bool = True) -> list[list[int]]:
    """Beam search for one source at a time (ids (1, S)); returns the best finished sequence (without
    the start token, ending in </s> unless ``max_len`` cut it)."""
    if ids.shape[0] != 1:
        return [beam_search(model, ids[i: i + 1], mask[i: i + 1], max_len, num_beams, length_penalty,
                            no_repeat_ngram_size, early_stopping)[0] for i in range(ids.shape[0])]
    model.eval()
    K = num_beams
    enc = model.encode(ids, mask).expand(K, -1, -1)
    enc_mask = mask.expand(K, -1)
    seqs = torch.full((K, 1), model.config.decoder_start_token_id, dtype=torch.long, device=ids.device)
    # all beams start identical: only the first may expand at step 1, or we would get K copies
    scores = torch.tensor([0.0] + [float("-inf")] * (K - 1), device=ids.device)
    finished: list[tuple[float, list[int]]] = []
    cache = None
    for step in range(max_len):
        logits, cache = model.decode(seqs[:, -1:], enc, enc_mask, cache)
        logp = logits[:, -1].float().log_softmax(-1)  # (K, V)
        if no_repeat_ngram_size:
            logp = ban_repeated_ngrams(logp, seqs, no_repeat_ngram_size)
        V = logp.shape[-1]
        # 1) every beam x every token; keep the 2K best so that K survive even if some end here
        cand = (scores[:, None] + logp).view(-1)
        top, idx = cand.topk(2 * K)
        beam, token = idx // V, idx % V
        # 2) a candidate ending in </s> (or reaching max_len) is finished, scored by its length-normalised
        #    log-probability; only candidates ranked among the top K may finish (the rest are spares)
        last = step == max_len - 1
        keep = []
        for rank, (s, b, t) in enumerate(zip(top.tolist(), beam.tolist(), token.tolist())):
            if t == EOS or last:
                if rank < K:
                    hyp = seqs[b, 1:].tolist() + [t]
                    finished.append((s / (len(hyp) ** length_penalty), hyp))
            elif len(keep) < K:
                keep.append((s, b, t))
        if last:
            break
        # 3) keep the K best finished; stop once K are finished (early stopping), or when the best running
        #    beam, even at its current length, cannot beat the worst finished one
        finished.sort(key=lambda x: -x[0])
        finished = finished[:K]
        if len(finished) == K:
            best_running = keep[0][0] / (seqs.shape[1] ** length_penalty)
            if early_stopping or finished[-1][0] >= best_running:
                break
        order = torch.tensor([b for _, b, _ in keep], device=ids.device)
        seqs = torch.cat([seqs[order], torch.tensor([[t] for _, _, t in keep], device=ids.device)], dim=1)
        scores = torch.tensor([s for s, _, _ in keep], device=ids.device)
        cache = [((sk[order], sv[order]), cc) for (sk, sv), cc in cache]
    return [max(finished, key=lambda x: x[0])[1]]


# ---------------------------------------------------------------------------------------------------
# 2) ROUGE on characters (Chinese has no spaces; every character is a token)
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
# 3) the CLI
# ---------------------------------------------------------------------------------------------------

@dataclass
class InferConfig:
    """Summarize the test split (or --text) with a fine-tuned checkpoint."""

    ckpt: str = "runs/t5_summarization/summarize/final"  # a train_summarize.py output (model + spiece.model)
    text: str = ""  # summarize this article instead of the test split
    split: str = "test"  # test or dev
    limit: int = 0  # only the first N articles (0: all)
    prefix: str = "摘要："  # the task prefix the model was fine-tuned with
    max_source_len: int = 128  # body tokens the encoder sees
    max_target_len: int = 32  # headline tokens at most
    num_beams: int = 4  # beam width
    length_penalty: float = 1.0  # > 0 favours longer headlines
    no_repeat_ngram_size: int = 3  # no n-gram twice (0: off)
    batch_size: int = 32  # articles per greedy batch
    threads: int = 0  # CPU threads (0: torch's default)
    device: str = "auto"  # auto, cpu, cuda, mps
    samples: int = 5  # print this many (body, reference, greedy, beam) examples


def load_model(ckpt: str | Path, device) -> tuple[T5ForConditionalGeneration, Tokenizer]:
    ckpt = Path(ckpt)
    cfg = T5Config(**{k: v for k, v in read_config(ckpt).items() if k in T5Config.__dataclass_fields__})
    model = load_pretrained(T5ForConditionalGeneration(cfg), ckpt).to(device).eval()
    return model, Tokenizer(ckpt / "spiece.model")


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


def main(cfg: InferConfig) -> dict:
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    model, tok = load_model(cfg.ckpt, device)
    if cfg.text:
        for name, beams in (("greedy", 1), (f"beam {cfg.num_beams}", cfg.num_beams)):
            print(f"{name}: {summarize(model, tok, [cfg.text], cfg, beams)[0]}")
        return {}
    pairs = summarization_pairs(cfg.split)
    pairs = pairs[: cfg.limit] if cfg.limit else pairs
    res = evaluate_split(model, tok, pairs, cfg)
    base = lead_baselines(pairs)
    print(f"{cfg.split} split, {len(pairs)} articles, character-level ROUGE F1 x 100:")
    print("| decoder | ROUGE-1 | ROUGE-2 | ROUGE-L |\n|---|---|---|---|")
    rows = [("lead-10", base["lead10"]), ("lead-20", base["lead20"]), ("first sentence", base["first_sentence"]),
            ("greedy", res["greedy"]), (f"beam {cfg.num_beams}", res["beam"])]
    for name, r in rows:
        print(f"| {name} | {r['rouge1']:.1f} | {r['rouge2']:.1f} | {r['rougeL']:.1f} |")
    for p, g, b in list(zip(pairs, res["greedy"]["outputs"], res["beam"]["outputs"]))[: cfg.samples]:
        print(f"\nbody:      {p['text'][:80]}…\nreference: {p['summary']}\ngreedy:    {g}\nbeam:      {b}")
    return {"scores": res, "baselines": base}


if __name__ == "__main__":
    main(parse_config(InferConfig))
