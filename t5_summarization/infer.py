"""Use the summarizer: headlines by greedy and beam search, character-level ROUGE next to the lead baselines.

    python -m t5_summarization.infer                                   # test split: greedy vs beam, ROUGE
    python -m t5_summarization.infer --text "新闻正文……"                # one article -> its headline
    python -m t5_summarization.infer --ckpt runs/t5_summarization/summarize_random/final

The decoders are written out in decoding.py (greedy; beam search with transformers' ``generate`` rules),
the scores in evaluation.py (ROUGE on characters, the lead baselines).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.checkpoint import load_pretrained, read_config
from common.cli import UserError, run_main
from common.runtime import pick_device, set_threads

from .dataset import Tokenizer, summarization_pairs
from .evaluation import evaluate_split, lead_baselines, summarize
from .model import T5Config, T5ForConditionalGeneration


@dataclass
class InferConfig:
    """Summarize the test split (or --text) with a fine-tuned checkpoint."""

    ckpt: str = "runs/t5_summarization/summarize/final"  # a train_summarize.py output (model + spiece.model)
    text: str | None = None  # summarize this article instead of the test split
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


def main(cfg: InferConfig) -> dict:
    if cfg.text is not None and not cfg.text.strip():
        raise UserError("--text is empty: give the article to summarize, or leave --text out to score the test "
                        "split")
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    model, tok = load_model(cfg.ckpt, device)
    if cfg.text is not None:
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
    run_main(main, InferConfig)
