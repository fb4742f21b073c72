"""Translate with the trained Transformer: greedy and beam search, BLEU on the test split,
and a picture of the cross-attention weights.

    python -m transformer_basics.infer                             # BLEU greedy + beam on the test split
    python -m transformer_basics.infer --sentence "I like tea."    # translate one sentence
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import sacrebleu
import torch

from common.checkpoint import average_weights, list_checkpoints, load_pretrained, load_weights, read_config
from common.cli import UserError, run_main
from common.results import command_line, make_record
from common.runtime import pick_device, set_threads

from .dataset import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TranslationData,
    decode,
    encode,
    load_tokenizer,
    read_pairs,
    split_pairs,
)
from .model import Transformer, TransformerConfig


@dataclass
class InferConfig:
    """Decode with a trained translation model and score it with BLEU."""

    model_dir: str = "runs/transformer_basics/translate/final"  # model.safetensors, config.json, tokenizers
    sentence: str | None = None  # translate this one English sentence and exit (with --attention-png: draw it too)
    split: str = "test"  # which split to score: test or valid
    data_file: str = ""  # the same data source as training (empty = zhlib)
    hf_dataset: str = ""  # a Hugging Face dataset in opus format
    hf_config: str = ""  # its config name
    average_last: int = 0  # average the weights of the run's last N checkpoints (paper sec. 6.1); 0 = final weights
    beam_size: int = 4  # paper sec. 6.1: beam 4
    length_penalty: float = 2.0  # alpha of the GNMT length penalty (paper: 0.6; 2.0 was best on our valid split)
    max_new_tokens: int = 80  # longest output in characters (the longest training target is 40)
    batch_size: int = 64  # sentences per greedy batch
    n_examples: int = 5  # translations printed side by side
    attention_png: str = ""  # draw the cross-attention of one sentence to this PNG
    attention_sentence: str = ""  # the sentence for that picture (empty = the first of the split)
    threads: int = 0  # CPU threads (0 = torch's default)
    device: str = "auto"  # auto, cpu, cuda, mps
    run_name: str = "cpu_default"  # names the records in results.json


def load_model(model_dir: str | Path, device: torch.device, average_last: int = 0) -> Transformer:
    """The trained model from ``model_dir``; with ``average_last`` N, the mean of the weights of the
    last N checkpoints in ``model_dir/../checkpoints`` instead of the final weights."""
    raw = read_config(model_dir)
    unknown = sorted(set(raw) - set(TransformerConfig.__dataclass_fields__))
    if unknown:
        raise UserError(f"{Path(model_dir) / 'config.json'}: not a transformer_basics model (fields {unknown[:4]} "
                        "are not TransformerConfig's); point --model-dir at a train_translate.py output")
    cfg = TransformerConfig(**raw)
    model = Transformer(cfg)
    if average_last:
        ckpts = list_checkpoints(Path(model_dir).parent / "checkpoints")[-average_last:]
        if len(ckpts) < average_last:
            raise ValueError(f"--average-last {average_last}: only {len(ckpts)} checkpoints in "
                             f"{Path(model_dir).parent / 'checkpoints'}; train with --keep-checkpoints {average_last}")
        load_weights(model, average_weights(ckpts), f"average of {[c.name for c in ckpts]}")
    else:
        load_pretrained(model, model_dir)
    return model.to(device).eval()


def load_splits(cfg: InferConfig) -> dict[str, list[tuple[str, str]]]:
    """The train/valid/test splits of the data source the model was trained on (the split is by a hash of
    the English side, so it is the training run's)."""
    return split_pairs(read_pairs(cfg.data_file, cfg.hf_dataset, cfg.hf_config))


@torch.no_grad()
def greedy_decode(model: Transformer, src: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """Pick the most likely next token at every step, for a batch; stop each row at [EOS]
    (T8). No KV cache: each step re-runs the decoder over the prefix, simple and fast enough here."""
    memory, src_mask = model.encode(src)
    ys = torch.full((src.size(0), 1), BOS_ID, dtype=torch.long, device=src.device)
    done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
    for _ in range(max_new_tokens):
        next_id = model.decode(ys, memory, src_mask)[:, -1].argmax(-1)
        next_id = next_id.masked_fill(done, PAD_ID)  # finished rows only grow padding
        ys = torch.cat([ys, next_id[:, None]], dim=1)
        done |= next_id == EOS_ID
        if done.all():
            break
    return [row[1:].tolist() for row in ys]


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al. 2016, eq. 14): without it, beam search
    prefers short outputs, since every extra token multiplies in a probability < 1."""
    return ((5 + length) / 6) ** alpha


@torch.no_grad()
def beam_search(model: Transformer, src: torch.Tensor, beam_size: int, max_new_tokens: int,
                alpha: float = 0.6) -> list[int]:
    """Keep the ``beam_size`` best prefixes by summed log-probability; a prefix that emits [EOS]
    becomes a finished hypothesis scored by log P / lp(length). Stops when ``beam_size`` hypotheses
    have finished. src: (1, S). With beam_size 1 this is exactly greedy decoding."""
    memory, src_mask = model.encode(src)
    beams = torch.full((1, 1), BOS_ID, dtype=torch.long, device=src.device)  # (k, t) alive prefixes
    scores = torch.zeros(1, device=src.device)  # (k,) summed log-probs of the alive prefixes
    finished: list[tuple[float, list[int]]] = []
    for _ in range(max_new_tokens):
        k = beams.size(0)
        logp = model.decode(beams, memory.expand(k, -1, -1), src_mask.expand(k, -1, -1, -1))[:, -1]
        cand = (scores[:, None] + logp.float().log_softmax(-1)).view(-1)  # (k * V,)
        # 2k candidates: even if k of them end in [EOS], k others stay alive
        top_scores, top_idx = cand.topk(min(2 * beam_size, cand.numel()))
        V = logp.size(-1)
        alive_rows, alive_scores = [], []
        for rank, (s, i) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
            row, tok = divmod(i, V)
            if tok == EOS_ID:
                # an ending counts only if it ranks among the k best candidates, as in fairseq;
                # otherwise unlikely short outputs would fill the finished list and stop the search early
                if rank < beam_size:
                    seq = beams[row].tolist()[1:] + [tok]
                    finished.append((s / length_penalty(len(seq), alpha), seq))
            else:
                alive_rows.append(beams[row].tolist() + [tok])
                alive_scores.append(s)
                if len(alive_rows) == beam_size:
                    break
        if len(finished) >= beam_size or not alive_rows:
            break
        beams = torch.tensor(alive_rows, device=src.device)
        scores = torch.tensor(alive_scores, device=src.device)
    if not finished:  # hit max_new_tokens: the alive prefixes compete as they are
        finished = [(s / length_penalty(len(b) - 1, alpha), b[1:]) for s, b in
                    zip(scores.tolist(), beams.tolist())]
    return max(finished, key=lambda f: f[0])[1]


def bleu(hyps: list[str], refs: list[str]) -> float:
    """Corpus BLEU with sacrebleu's Chinese tokenizer (each CJK character is a token)."""
    return sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score


def length_ratio(hyps: list[str], refs: list[str]) -> float:
    """Output length / reference length as BLEU counts it; below 1 the brevity penalty bites."""
    b = sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh")
    return b.sys_len / b.ref_len


def retrieval_baseline(train_pairs, test_en: list[str]) -> list[str]:
    """A no-learning baseline: answer with the Chinese side of the training pair whose English
    shares the most words with the input (Jaccard). BLEU above this is what the model learned."""
    train_sets = [set(en.lower().split()) for en, _ in train_pairs]
    out = []
    for en in test_en:
        q = set(en.lower().split())
        best = max(range(len(train_pairs)), key=lambda i: len(q & train_sets[i]) / (len(q | train_sets[i]) or 1))
        out.append(train_pairs[best][1])
    return out


def _cjk_fonts(font_manager) -> list[str]:
    """Names of installed fonts with Chinese glyphs (fonts installed after matplotlib built its
    cache are added on the fly)."""
    keys = ("WenQuanYi", "Noto Sans CJK", "Noto Serif CJK", "SimHei", "PingFang", "Heiti", "Microsoft YaHei")
    found = [f.name for f in font_manager.fontManager.ttflist if any(k in f.name for k in keys)]
    if not found:
        for path in font_manager.findSystemFonts():
            if any(k in path.lower() for k in ("wqy", "notosanscjk", "noto-cjk", "simhei", "msyh", "pingfang")):
                font_manager.fontManager.addfont(path)
        found = [f.name for f in font_manager.fontManager.ttflist if any(k in f.name for k in keys)]
    return found


def draw_attention(model: Transformer, src_tok, tgt_tok, sentence: str, path: str | Path) -> Path:
    """Heat map of the last decoder layer's cross-attention (mean over heads) while translating."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    device = next(model.parameters()).device
    src = torch.tensor([encode(src_tok, sentence, model.config.max_len, add_bos=False)], device=device)
    out = greedy_decode(model, src, 80)[0]
    out = out[: out.index(EOS_ID) + 1] if EOS_ID in out else out
    tgt_in = torch.tensor([[BOS_ID] + out[:-1]], device=device)
    with torch.no_grad():
        memory, src_mask = model.encode(src)
        _, crosses = model.decode(tgt_in, memory, src_mask, return_attention=True)
    weights = crosses[-1][0].mean(0).cpu()  # (T, S)
    # Chinese labels need a CJK font; fall back to ids when none is installed
    cjk = _cjk_fonts(font_manager)
    ylabels = [tgt_tok.id_to_token(i) for i in out] if cjk else [str(i) for i in out]
    xlabels = [src_tok.id_to_token(i) for i in src[0].tolist()]
    fig, ax = plt.subplots(figsize=(0.45 * len(xlabels) + 1.5, 0.35 * len(ylabels) + 1.2), dpi=100)
    ax.imshow(weights.numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=60, ha="right")
    ax.set_yticks(range(len(ylabels)), ylabels, fontfamily=cjk[0] if cjk else None)
    ax.set_xlabel("source (English BPE)")
    ax.set_ylabel("output (Chinese)")
    ax.set_title("cross-attention, last decoder layer")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def main(cfg: InferConfig) -> dict:
    if cfg.sentence is not None and not cfg.sentence.strip():
        raise UserError("--sentence is empty: give the English sentence to translate, or leave --sentence out to "
                        "score the test split")
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    model_dir = Path(cfg.model_dir)
    model = load_model(model_dir, device, cfg.average_last)
    src_tok = load_tokenizer(model_dir / "src_tokenizer.json")
    tgt_tok = load_tokenizer(model_dir / "tgt_tokenizer.json")

    if cfg.sentence is not None:
        src = torch.tensor([encode(src_tok, cfg.sentence, model.config.max_len, add_bos=False)], device=device)
        g = decode(tgt_tok, greedy_decode(model, src, cfg.max_new_tokens)[0])
        b = decode(tgt_tok, beam_search(model, src, cfg.beam_size, cfg.max_new_tokens, cfg.length_penalty))
        print(f"greedy: {g}\nbeam{cfg.beam_size}:  {b}")
        result = {"greedy": g, "beam": b}
        if cfg.attention_png:  # the picture of this sentence; no split is scored, no results are written
            result["attention_png"] = str(draw_attention(model, src_tok, tgt_tok, cfg.sentence, cfg.attention_png))
            print(f"attention picture: {result['attention_png']}")
        return result

    splits = load_splits(cfg)
    pairs = splits[cfg.split]
    data = TranslationData(pairs, src_tok, tgt_tok, model.config.max_len)
    refs = [zh for _, zh in pairs]

    t0 = time.perf_counter()
    greedy_ids = []
    for _, src, _ in data.batches(cfg.batch_size, seed=0, epoch=0, shuffle=False):
        greedy_ids += greedy_decode(model, src.to(device), cfg.max_new_tokens)
    greedy = [decode(tgt_tok, ids) for ids in greedy_ids]
    t_greedy = time.perf_counter() - t0

    t0 = time.perf_counter()
    beam = []
    for i in range(len(data)):
        src = torch.tensor([data.src[i]], device=device)
        beam.append(decode(tgt_tok, beam_search(model, src, cfg.beam_size, cfg.max_new_tokens, cfg.length_penalty)))
    t_beam = time.perf_counter() - t0

    baseline = bleu(retrieval_baseline(splits["train"], [en for en, _ in pairs]), refs)
    result = {"split": cfg.split, "n_sentences": len(pairs), "bleu_greedy": bleu(greedy, refs),
              "bleu_beam": bleu(beam, refs), "beam_size": cfg.beam_size, "length_penalty": cfg.length_penalty,
              "bleu_retrieval_baseline": baseline, "greedy_wall_s": t_greedy, "beam_wall_s": t_beam,
              "length_ratio_greedy": length_ratio(greedy, refs), "length_ratio_beam": length_ratio(beam, refs)}

    for i in random.Random(0).sample(range(len(pairs)), min(cfg.n_examples, len(pairs))):
        print(f"EN   {pairs[i][0]}\nREF  {refs[i]}\nGRD  {greedy[i]}\nBEAM {beam[i]}\n")
    print(f"{cfg.split} BLEU (sacrebleu, tokenize=zh, {len(pairs)} sentences): "
          f"greedy {result['bleu_greedy']:.1f} ({t_greedy:.0f} s) | beam{cfg.beam_size} {result['bleu_beam']:.1f} "
          f"({t_beam:.0f} s) | retrieval baseline {baseline:.1f} | length ratio greedy "
          f"{result['length_ratio_greedy']:.2f}, beam {result['length_ratio_beam']:.2f}")

    run_dir = model_dir.parent
    with open(run_dir / f"translations_{cfg.split}.jsonl", "w", encoding="utf-8") as f:
        for (en, ref), g, b in zip(pairs, greedy, beam):
            f.write(json.dumps({"en": en, "ref": ref, "greedy": g, "beam": b}, ensure_ascii=False) + "\n")
    (run_dir / f"eval_{cfg.split}.json").write_text(json.dumps(result, indent=2) + "\n")
    if cfg.split == "test":  # only test-split figures are headline results
        write_results(run_dir, result, cfg)
    if cfg.attention_png:
        result["attention_png"] = str(draw_attention(model, src_tok, tgt_tok, cfg.attention_sentence or pairs[0][0],
                                                     cfg.attention_png))
    return result


def write_results(run_dir: Path, result: dict, cfg: InferConfig) -> None:
    """Records for doc/results.json (collected by ``make results``)."""
    summary = run_dir / "train_summary.json"
    train = json.loads(summary.read_text()) if summary.exists() else {}
    wall = train.get("train_wall_s", 0.0)
    cmd = train.get("command", "python -m transformer_basics.train_translate") + " && " + \
        command_line("transformer_basics.infer")
    records = [
        make_record("transformer_basics", f"greedy_{cfg.run_name}", "bleu_greedy", result["bleu_greedy"],
                    "retrieval_nearest_english", result["bleu_retrieval_baseline"],
                    wall + result["greedy_wall_s"], cmd),
        make_record("transformer_basics", f"beam{cfg.beam_size}_{cfg.run_name}", "bleu_beam", result["bleu_beam"],
                    "retrieval_nearest_english", result["bleu_retrieval_baseline"],
                    wall + result["beam_wall_s"], cmd),
    ]
    if train.get("valid_loss") is not None:
        records.append(make_record("transformer_basics", cfg.run_name, "valid_loss", train["valid_loss"],
                                   "uniform_over_vocab", math.log(train["tgt_vocab_size"]), wall, cmd))
    (run_dir / "results.json").write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    run_main(main, InferConfig)
