"""Score every stage the same way: validation perplexity on the pretraining text, and the held-out
tasks of tasks.py answered by greedy decoding with the chat template.

    python -m gpt_minimind.eval                                   # the stages found under runs/gpt_minimind
    python -m gpt_minimind.eval --stage pretrain=runs/gpt_minimind/pretrain/final sft=runs/gpt_minimind/sft/final

A stage directory is a full model (config.json + model.safetensors + tokenizer/) or a LoRA adapter
(adapter_config.json + adapter_model.safetensors, on top of the base it names). Prints one table,
stage x (valid ppl, task scores); writes eval.json and results.json (for ``make results``). Where the
reward model of train_reward.py exists, the table adds its mean score of each stage's answers to the
checkable questions (rm_score), and where the SFT model exists, each stage's KL to it (kl_to_sft, nats
per answer sampled at temperature 1): the two axes RLHF trades off.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.cli import run_main
from common.data import evenly_spaced
from common.results import command_line, make_record
from common.runtime import pick_device, seed_everything, set_threads

from .dataset import PackedBlocks, default_documents, encode_documents, split_documents
from .finetune import answer
from .loading import load_model, load_reward_model
from .model import MiniMindForCausalLM
from .rlhf import kl_to_reference, reward_label_preference, score_answers
from .tasks import CHRF_TASKS, EXACT_TASKS, Example, build_examples, exact_match

DEFAULT_STAGES = ["pretrain=runs/gpt_minimind/pretrain/final", "sft=runs/gpt_minimind/sft/final",
                  "lora=runs/gpt_minimind/lora/final", "qlora=runs/gpt_minimind/qlora/final",
                  "dpo=runs/gpt_minimind/dpo/final", "sft_arith=runs/gpt_minimind/sft_arith/final",
                  "grpo=runs/gpt_minimind/grpo/final", "ppo=runs/gpt_minimind/ppo/final"]


@dataclass
class EvalConfig:
    """Evaluate checkpoints of the GPT chapter's stages on the same held-out data."""

    stage: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))  # NAME=DIR; missing DIRs are skipped
    per_task: int = 100  # held-out questions per task (the first N of a fixed shuffle)
    max_new_tokens: int = 48  # longest answer generated
    ppl_blocks: int = 0  # blocks of the pretraining valid split for the perplexity (0 = the whole split)
    reward_model: str = "runs/gpt_minimind/reward/final"  # scores the greedy answers (rm_score), if it exists
    reference: str = "runs/gpt_minimind/sft/final"  # the KL of each stage to it (kl_to_sft), if it exists
    kl_questions: int = 100  # held-out questions answered by sampling (temperature 1) for the KL
    out_dir: str = "runs/gpt_minimind/eval"  # eval.json, answers_<stage>.jsonl, results.json
    run_prefix: str = ""  # records are named PREFIX_<stage>_cpu; empty = the out-dir's name ("eval")
    threads: int = 0
    device: str = "auto"
    seed: int = 0


# ---------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------

def chrf(preds: list[str], refs: list[str]) -> float:
    """Character n-gram F-score (Popovic 2015) through sacrebleu: fair to Chinese without word segmentation."""
    import sacrebleu

    return sacrebleu.corpus_chrf(preds, [refs]).score


def majority_baseline(train: list[Example], test: list[Example], task: str) -> float:
    """Accuracy of always answering the most frequent training answer of ``task``."""
    answers = [ex.answer for ex in train if ex.task == task]
    if not answers:
        return 0.0
    top = max(set(answers), key=answers.count)
    tests = [ex for ex in test if ex.task == task]
    return sum(exact_match(top, ex.answer) for ex in tests) / max(len(tests), 1)


# ---------------------------------------------------------------------------------------------------
# Model side
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def valid_perplexity(model: MiniMindForCausalLM, tok, docs: list[str], n_blocks: int, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) over the pretraining valid split: every packed block (n_blocks 0), else
    ``n_blocks`` of them evenly spaced."""
    T = model.config.max_position_embeddings
    stream = encode_documents(docs, lambda s: tok.encode(s, add_special_tokens=False), tok.bos_token_id,
                              tok.eos_token_id)
    data = PackedBlocks(stream, T)
    ids = torch.tensor(evenly_spaced(len(data), n_blocks), dtype=torch.long)
    device = model.lm_head.weight.device
    total = count = 0
    for i in range(0, len(ids), batch_size):
        x, y = data.get(ids[i:i + batch_size])
        total += model(x.to(device), labels=y.to(device))["lm_loss"].item() * y.numel()
        count += y.numel()
    return math.exp(total / count)


def evaluate_stage(model, tok, tests: list[Example], valid_docs: list[str], cfg: EvalConfig, rm=None,
                   reference=None) -> tuple[dict, list]:
    """Perplexity and task scores; with a reward model, its mean score of the greedy answers to the checkable
    questions (rm_score); with a reference model, KL(stage || reference) per sampled answer (kl_to_sft)."""
    model.eval()
    scores = {"valid_ppl": valid_perplexity(model, tok, valid_docs, cfg.ppl_blocks)}
    answers = []
    scored_prompts, scored_preds = [], []
    for task in EXACT_TASKS + CHRF_TASKS:
        examples = [ex for ex in tests if ex.task == task][:cfg.per_task]
        preds = [answer(model, tok, ex.prompt, cfg.max_new_tokens) for ex in examples]
        answers += [{"task": task, "question": ex.prompt[-1]["content"], "reference": ex.answer, "prediction": p}
                    for ex, p in zip(examples, preds)]
        if task in EXACT_TASKS:
            scores[f"{task}_accuracy"] = sum(map(exact_match, preds, (ex.answer for ex in examples))) / len(examples)
            scored_prompts += [ex.prompt for ex in examples]
            scored_preds += preds
        else:
            scores[f"{task}_chrf"] = chrf(preds, [ex.answer for ex in examples])
    if rm is not None:
        scores["rm_score"] = score_answers(rm, tok, scored_prompts, scored_preds).mean().item()
    if reference is not None:
        kl_prompts = [ex.prompt for ex in tests if ex.task in EXACT_TASKS][:cfg.kl_questions]
        scores["kl_to_sft"] = kl_to_reference(model, reference, tok, kl_prompts, cfg.max_new_tokens, seed=cfg.seed)
    return scores, answers


def format_table(rows: dict[str, dict[str, float]]) -> str:
    cols = list(next(iter(rows.values())))
    head = "| stage | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for stage, sc in rows.items():
        cells = [("-" if sc.get(c) is None else f"{sc[c]:.1f}" if c == "valid_ppl" or c.endswith("chrf")
                  else f"{sc[c]:+.3f}" if c == "rm_score" else f"{sc[c]:.3f}" if c == "kl_to_sft"
                  else f"{sc[c]:.0%}") for c in cols]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tok_of(model_dir: str):
    """The tokenizer saved beside a model (train_*.py copy it into DIR/tokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(model_dir) / "tokenizer")


def main(cfg: EvalConfig) -> dict:
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    t0 = time.perf_counter()
    stages = dict(s.split("=", 1) for s in cfg.stage)
    stages = {name: path for name, path in stages.items() if Path(path).is_dir()}
    if not stages:
        raise FileNotFoundError(f"none of the stage directories exist: {cfg.stage}; train a stage first "
                                "(python -m gpt_minimind.train_pretrain, then train_sft ...)")
    train, tests = build_examples("train"), build_examples("test", {t: -1 for t in EXACT_TASKS + CHRF_TASKS})
    valid_docs = split_documents(default_documents())["valid"]
    rows: dict[str, dict[str, float | None]] = {
        "majority answer": {"valid_ppl": None, **{f"{t}_accuracy": majority_baseline(train, tests, t)
                                                  for t in EXACT_TASKS}, **{f"{t}_chrf": None for t in CHRF_TASKS}}}
    rm = load_reward_model(cfg.reward_model, device) if cfg.reward_model and Path(cfg.reward_model).is_dir() else None
    reference = load_model(cfg.reference, device)[0] if cfg.reference and Path(cfg.reference).is_dir() else None
    label_preference = label_accuracy = None
    if rm is not None:
        rows["majority answer"]["rm_score"] = None
        label_preference, label_accuracy = reward_label_preference(rm, tok_of(cfg.reward_model), tests, cfg.per_task)
        print("the reward model's favourite label, held-out questions: " + "; ".join(
            f"{task} " + ", ".join(f"{k} {v}" for k, v in counts.items())
            + f" (the reference {label_accuracy[task]:.0%})" for task, counts in label_preference.items()))
    if reference is not None:
        rows["majority answer"]["kl_to_sft"] = None
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    walls = {}
    for name, path in stages.items():
        ts = time.perf_counter()
        model, tok = load_model(path, device)  # a model directory or a LoRA adapter directory
        vocab = model.config.vocab_size  # (a model with another tokenizer cannot be scored by them)
        rows[name], answers = evaluate_stage(model, tok, tests, valid_docs, cfg,
                                             rm if rm is not None and rm.config.vocab_size == vocab else None,
                                             reference if reference is not None and reference.config.vocab_size == vocab
                                             else None)
        walls[name] = time.perf_counter() - ts
        with open(out_dir / f"answers_{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(a, ensure_ascii=False) + "\n" for a in answers)
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[name].items()) + f" ({walls[name]:.0f} s)",
              flush=True)
    table = format_table(rows)
    print(table)
    command = command_line("gpt_minimind.eval")
    records = []
    for name in stages:
        for metric, value in rows[name].items():
            base = rows["majority answer"].get(metric)
            records.append(make_record("gpt_minimind", f"{cfg.run_prefix or out_dir.name}_{name}_cpu", metric, value,
                                       "majority_answer" if base is not None else "none", base, walls[name], command))
    (out_dir / "results.json").write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    result = {"scores": rows, "table": table, "wall_s": time.perf_counter() - t0, "per_task": cfg.per_task,
              "reward_model_label_preference": label_preference,
              "reward_model_label_accuracy": label_accuracy}
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


if __name__ == "__main__":
    run_main(main, EvalConfig)
