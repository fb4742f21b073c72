"""A reward model trained on preference pairs (Bradley-Terry), the first half of RLHF as InstructGPT
describes it (Ouyang et al. 2022, sec. 3.5; Stiennon et al. 2020); train_ppo.py is the second half.

    python -m gpt_minimind.train_reward                     # from runs/gpt_minimind/sft/final, DPO's pairs
    python -m gpt_minimind.train_reward --data-file dpo.jsonl   # minimind's DPO format instead

The reward model is the SFT model with its vocabulary head replaced by a scalar head
(``model.py:MiniMindForSequenceClassification``); the score of a conversation is the head's output at
its last token, the end-of-turn token of the answer. Bradley and Terry (1952) model the probability
that answer w is preferred to answer l as sigmoid(r(x, w) - r(x, l)); maximum likelihood is the first
term of

    loss = -log sigmoid( r(x, y_chosen) - r(x, y_rejected) )   (+ 0.01 * (r_chosen + r_rejected)^2
                                                                 + 0.1 * SFT loss of y_chosen)

The second term (Eisenstein et al. 2023; trl's ``center_rewards_coefficient``) keeps the scores near
zero: the loss only sees differences, and PPO adds the score to per-token KL penalties whose scale is
fixed. A third, ``--lm-weight`` (0.1) x the SFT loss of the chosen answers computed on the reward model's
own hidden states through the language model's vocabulary head (Yang et al. 2024, "Regularizing hidden
states enables learning generalizable reward models for LLMs", GRM), keeps the body a language model
that knows which answer fits the question. Without it the pairs are fitted about as well, but partly by
which label is usually right: the plain reward model scores 中性 highest on nearly every held-out news
question, whatever the news, and PPO, which finds whatever the reward model prefers, learned to answer
中性 to all of them (README, "RLHF", measures both). The pairs are the ones train_dpo.py uses (the same
builder, seed and SFT model), so the reward model's held-out pair accuracy and DPO's implicit reward,
beta * log pi_dpo / pi_sft, are measured on the same pairs. The model is saved as ours (``final/``) and
exported as a transformers ``LlamaForSequenceClassification`` (``hf/``), which gives the same scores.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.checkpoint import resume_or_start, resume_point, save_checkpoint, save_pretrained
from common.cli import run_main
from common.results import command_line, make_record
from common.runtime import pick_device, seed_everything, set_threads
from common.schedule import clip_grad

from .export_hf import export_reward_model
from .loading import copy_tokenizer, load_model
from .model import MiniMindForSequenceClassification
from .preference import PairData, all_logps, pair_batches, preference_pairs
from .rlhf import answer_logps, label_choices, reward_label_preference
from .tasks import EXACT_TASKS, build_examples


@dataclass
class RewardConfig:
    """Train a scalar reward model on preference pairs (the ones DPO uses) with the Bradley-Terry loss."""

    init_from: str = "runs/gpt_minimind/sft/final"  # the body of the reward model (and the pairs' sampler)
    data_file: str = ""  # minimind DPO JSONL: {"chosen": [turns], "rejected": [turns]}; empty = checkable tasks
    out_dir: str = "runs/gpt_minimind/reward"  # checkpoints, metrics.jsonl, loss.png, final/, hf/
    train_pairs: int = 4000  # the same pair set as train_dpo.py's defaults
    own_samples: int = 1000
    eval_pairs: int = 400
    label_questions: int = 100  # held-out questions per label task on which every label is scored (summary only)
    dpo_model: str = "runs/gpt_minimind/dpo/final"  # its implicit reward is scored on the same pairs (if present)
    center_weight: float = 0.01  # + this x (r_chosen + r_rejected)^2: scores near zero
    lm_weight: float = 0.1  # + this x the SFT loss of the chosen answers on the same body (GRM; 0 = plain BT)
    batch_size: int = 16  # pairs per step (32 sequences)
    max_iters: int = 750  # three passes over the 4,000 pairs
    lr: float = 2e-4
    warmup_iters: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 125
    save_every: int = 125
    keep_checkpoints: int = 2
    log_every: int = 25
    seed: int = 1234  # the batch order
    pairs_seed: int = 1234  # the pairs' sampling: train_dpo.py's --seed, so that both train on the same pairs
    threads: int = 0
    device: str = "auto"
    resume: bool = False  # continue from the newest checkpoint in out_dir/checkpoints
    run_name: str = "reward_cpu"


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, center_weight: float = 0.0) -> torch.Tensor:
    r"""Mean -log sigmoid(r_chosen - r_rejected) over the pairs, + center_weight * mean (r_c + r_r)^2.

    $$\mathcal{L} = -\log \sigma\left(r(x, y_c) - r(x, y_r)\right) + w \left(r(x, y_c) + r(x, y_r)\right)^2$$"""
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss + center_weight * ((chosen + rejected) ** 2).mean() if center_weight else loss


def chosen_lm_loss(lm_head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The SFT loss of the chosen answers, read from the reward model's own hidden states (B, T, C) through a
    vocabulary head: mean next-token cross-entropy over the answer tokens (labels already shifted, -100
    elsewhere). Yang et al. (2024, "Regularizing hidden states enables learning generalizable reward
    models") add it so that fitting the pairs does not wear away what the body knew as a language model."""
    on_answer = labels != -100  # the vocabulary head only where there is a target (a few tokens per row)
    return F.cross_entropy(lm_head(hidden[on_answer]).float(), labels[on_answer])


@torch.no_grad()
def pair_scores(rm: MiniMindForSequenceClassification, data: PairData, batch_size: int = 32) -> tuple:
    """(chosen, rejected) reward-model scores of every pair."""
    rm.eval()
    device = rm.score.weight.device
    chosen, rejected = [], []
    for i in range(0, len(data), batch_size):
        idx = list(range(i, min(i + batch_size, len(data))))
        x, _ = data.collate(idx)
        s = rm(x.to(device))["scores"].cpu()
        chosen.append(s[:len(idx)])
        rejected.append(s[len(idx):])
    return torch.cat(chosen), torch.cat(rejected)


def pair_stats(chosen: torch.Tensor, rejected: torch.Tensor, tasks: list[str] | None = None) -> dict:
    """Pair accuracy (chosen scored above rejected), mean margin, mean score; per task when known."""
    right = chosen > rejected
    out = {"pair_accuracy": right.float().mean().item(), "margin": (chosen - rejected).mean().item(),
           "mean_score": torch.cat([chosen, rejected]).mean().item()}
    for task in sorted(set(tasks or [])):
        sel = torch.tensor([t == task for t in tasks])
        out[f"pair_accuracy_{task}"] = right[sel].float().mean().item()
    return out


def held_out_tasks(pairs) -> list[str] | None:
    """The task of each held-out pair built from the checkable tasks (by its question)."""
    task_of = {ex.prompt[-1]["content"]: ex.task for ex in build_examples("test", {t: -1 for t in EXACT_TASKS})}
    tasks = [task_of.get(p[-1]["content"]) for p, _, _ in pairs]
    return None if None in tasks else tasks


def main(cfg: RewardConfig) -> dict:
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    resume_from = resume_point(ckpt_root, cfg.resume)
    sft, tok = load_model(cfg.init_from, device)
    max_len = sft.config.max_position_embeddings

    # 1) the pairs DPO uses, and the baselines on the held-out ones
    t0 = time.perf_counter()
    train_pairs, valid_pairs, stats = preference_pairs(cfg, out / "pairs.json", resume_from is not None, sft, tok,
                                                       cfg.pairs_seed)
    train, valid = PairData(tok, train_pairs, max_len), PairData(tok, valid_pairs, max_len)
    tasks = None if cfg.data_file else held_out_tasks(valid_pairs)
    sft_c, sft_r = all_logps(sft, valid)
    baselines = {"chance": 0.5, "sft_logp_accuracy": (sft_c > sft_r).float().mean().item()}
    if Path(cfg.dpo_model).is_dir():  # DPO's implicit reward beta * log(pi_dpo / pi_sft) on the same pairs
        dpo, _ = load_model(cfg.dpo_model, device)
        dpo_c, dpo_r = all_logps(dpo, valid)
        baselines["dpo_implicit_accuracy"] = ((dpo_c - sft_c) > (dpo_r - sft_r)).float().mean().item()
        del dpo
    label_tests = None if cfg.data_file else build_examples("test", {t: -1 for t in EXACT_TASKS})
    if label_tests:  # the label the SFT model itself finds likeliest, per held-out question (what greedy would say)
        baselines.update({f"sft_logp_label_accuracy_{t}": a for t, a in label_choices(
            lambda p, a, lm=sft: answer_logps(lm, tok, p, a), label_tests, cfg.label_questions)[1].items()})
    print(f"pairs: {len(train)} train / {len(valid)} held out | SFT model's own answers: {stats} | held-out "
          f"baselines: " + ", ".join(f"{k} {v:.1%}" for k, v in baselines.items())
          + f" | {time.perf_counter() - t0:.0f} s", flush=True)

    # 2) the reward model: the SFT body, a zero scalar head (and, for the language-model term, the SFT
    # model's vocabulary head: the tied embedding itself, trained with the body; an untied head is a frozen
    # copy of the SFT model's, so a resumed run rebuilds it exactly)
    rm = MiniMindForSequenceClassification.from_causal_lm(sft)
    lm_head = None
    if cfg.lm_weight:
        lm_head = (lambda h: F.linear(h, rm.model.embed_tokens.weight)) if sft.config.tie_word_embeddings \
            else copy.deepcopy(sft.lm_head).requires_grad_(False)
    del sft
    optimizer = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    scheduler, start, logger = resume_or_start(rm, optimizer, cfg, out, resume_from, device)
    rm.train()
    step, t_start, losses = start, time.perf_counter(), []
    for i, idx in pair_batches(len(train), cfg.batch_size, cfg.seed, start, cfg.max_iters):
        x, y = train.collate(idx)
        out_rm = rm(x.to(device))
        chosen, rejected = out_rm["scores"][:len(idx)], out_rm["scores"][len(idx):]
        loss = bradley_terry_loss(chosen, rejected, cfg.center_weight)
        if lm_head is not None:  # the chosen rows' hidden states through the vocabulary head
            loss = loss + cfg.lm_weight * chosen_lm_loss(lm_head, out_rm["hidden"][:len(idx)], y[:len(idx)].to(device))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {i}; lower --lr")
        loss.backward()
        clip_grad(rm.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step = i + 1
        losses.append(loss.item())
        logger.step(step, loss.item(), scheduler.get_last_lr()[0], x.numel(),
                    pair_accuracy=(chosen > rejected).float().mean().item())
        if step % cfg.eval_every == 0 or step == cfg.max_iters:
            ev = pair_stats(*pair_scores(rm, valid), tasks)
            rm.train()
            logger.log({"step": step, **{f"valid_{k}": v for k, v in ev.items()}})
            logger.write(f"step {step}/{cfg.max_iters} | held-out pair accuracy {ev['pair_accuracy']:.1%} | "
                         f"margin {ev['margin']:.2f} | mean score {ev['mean_score']:+.2f}")
        if step % cfg.save_every == 0 or step == cfg.max_iters:
            save_checkpoint(ckpt_root, step, rm, rm.config.to_dict(), optimizer, scheduler,
                            keep=cfg.keep_checkpoints)
    wall = time.perf_counter() - t_start

    # 3) held-out accuracy, our directory and the transformers export (checked to give our scores)
    after = pair_stats(*pair_scores(rm, valid), tasks)
    if label_tests:  # would a policy that maximised this score answer the label tasks right?
        favourite, label_accuracy = reward_label_preference(rm, tok, label_tests, cfg.label_questions)
        after.update({f"label_accuracy_{t}": a for t, a in label_accuracy.items()}, favourite_label=favourite)
    final_dir = out / "final"
    save_pretrained(rm, rm.config.to_dict(), final_dir)
    copy_tokenizer(cfg.init_from, final_dir)
    hf = export_reward_model(rm, out / "hf", final_dir / "tokenizer").eval()
    x, _ = valid.collate(list(range(min(16, len(valid)))))
    with torch.no_grad():
        export_diff = (hf(x.cpu()).logits.squeeze(-1) - rm.cpu()(x.cpu())["scores"]).abs().max().item()
    summary = {"steps": step, "train_wall_s": wall, "after": after, "baselines": baselines, "pairs": stats,
               "export_max_score_difference": export_diff}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    cmd = command_line("gpt_minimind.train_reward")
    records = [make_record("gpt_minimind", cfg.run_name, "pair_accuracy", after["pair_accuracy"], "chance", 0.5,
                           wall, cmd)]
    if "dpo_implicit_accuracy" in baselines:
        records.append(make_record("gpt_minimind", cfg.run_name, "pair_accuracy_vs_dpo", after["pair_accuracy"],
                                   "dpo_implicit_reward", baselines["dpo_implicit_accuracy"], wall, cmd))
    for task in ("news_sentiment", "review_sentiment"):  # its best label against the SFT model's likeliest
        if f"label_accuracy_{task}" in after:
            records.append(make_record("gpt_minimind", cfg.run_name, f"best_label_accuracy_{task}",
                                       after[f"label_accuracy_{task}"], "sft_logp_best_label",
                                       baselines[f"sft_logp_label_accuracy_{task}"], wall, cmd))
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    per_task = ", ".join(f"{k[len('pair_accuracy_'):]} {v:.0%}" for k, v in after.items()
                         if k.startswith("pair_accuracy_"))
    labels = ", ".join(f"{k[len('label_accuracy_'):]} {v:.0%}" for k, v in after.items()
                       if k.startswith("label_accuracy_"))
    logger.write(f"done: {step} steps in {wall:.0f} s | held-out pair accuracy {after['pair_accuracy']:.1%}"
                 + (f" ({per_task})" if per_task else "")
                 + (f" | its best label is the reference: {labels}" if labels else "")
                 + " | " + ", ".join(f"{k} {v:.1%}" for k, v in baselines.items())
                 + f" | {final_dir}, transformers export {out / 'hf'} (max score difference {export_diff:.1e})")
    logger.close()
    return {"losses": losses, "summary": summary, "final_dir": final_dir}


if __name__ == "__main__":
    run_main(main, RewardConfig)
