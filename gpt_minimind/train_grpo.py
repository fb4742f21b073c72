"""Reinforcement learning with a verifiable reward: GRPO (Shao et al. 2024, "DeepSeekMath", sec. 4.1) on
the arithmetic questions, whose answers a rule can check.

    python -m gpt_minimind.train_sft --init-from runs/gpt_minimind/sft/final --only-tasks arithmetic \
        --max-iters 1500 --out-dir runs/gpt_minimind/sft_arith --run-name sft_arith_cpu   # a policy right half the time
    python -m gpt_minimind.train_grpo                      # from runs/gpt_minimind/sft_arith/final
    python -m gpt_minimind.eval --stage sft=runs/gpt_minimind/sft/final grpo=runs/gpt_minimind/grpo/final

For each question q the policy samples a group of G answers o_1..o_G; a rule scores each one
(1 if the number is right, plus 0.1 if the answer is a bare integer: the format reward). GRPO needs no
value network: an answer's advantage is its reward standardised within its own group,

    A_i = (r_i - mean(r)) / (std(r) + eps),

so answers better than their siblings are pushed up and worse ones down. The per-token objective is
PPO's clipped ratio (ratio = pi / pi_old; with one update per batch, as here, it is 1 with the right
gradient) minus beta times a KL penalty to the frozen SFT model, estimated per token as
exp(ref - logp) - (ref - logp) - 1 (Schulman's k3, always >= 0).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.checkpoint import resume_or_start, resume_point, save_checkpoint, save_pretrained
from common.cli import UserError, run_main
from common.results import command_line, make_record
from common.runtime import pick_device, seed_everything, set_threads
from common.schedule import clip_grad

from .finetune import answer
from .loading import copy_tokenizer, policy_and_reference
from .model import MiniMindForCausalLM
from .rlhf import answer_text, collate, prompt_ids, sample_answers, token_logps
from .tasks import EXACT_TASKS, Example, arithmetic_tasks, build_examples, exact_match


@dataclass
class GRPOConfig:
    """Raise held-out accuracy on checkable questions (arithmetic by default) with GRPO and rule rewards."""

    init_from: str = "runs/gpt_minimind/sft_arith/final"  # the policy's start and the frozen KL reference
    tasks: list[str] = field(default_factory=lambda: ["arithmetic"])  # checkable tasks whose questions train
    out_dir: str = "runs/gpt_minimind/grpo"  # checkpoints, metrics.jsonl, loss.png, final/
    questions_per_step: int = 16  # prompts per optimizer step
    group_size: int = 8  # G answers sampled per prompt
    temperature: float = 1.0  # sampling temperature of the groups
    max_new_tokens: int = 8  # enough for a number; raise it for other tasks (a dictionary gloss needs ~24)
    max_iters: int = 150  # optimizer steps
    lr: float = 2e-5  # peak learning rate (larger rates drifted: BENCHMARKS.md, GRPO learning rates)
    warmup_iters: int = 10
    beta: float = 0.04  # KL penalty weight (DeepSeekMath: 0.04)
    clip_eps: float = 0.2  # PPO clip range
    format_reward: float = 0.1  # bonus for a bare integer answer
    grad_clip: float = 1.0
    eval_questions: int = 200  # held-out questions of the tasks for the greedy accuracy
    eval_every: int = 50
    save_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 1234
    threads: int = 0
    device: str = "auto"
    resume: bool = False
    run_name: str = "grpo_cpu"


_INTEGER = re.compile(r"^-?\d+$")


def reward(prediction: str, reference: str, format_bonus: float) -> float:
    """1 for the right answer, + format_bonus when a number is asked for and the answer is just an integer."""
    text = prediction.strip()
    bonus = format_bonus if _INTEGER.match(reference.strip()) and _INTEGER.match(text) else 0.0
    return float(exact_match(text, reference)) + bonus


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    r"""(Q, G) rewards -> advantages standardised within each group (row); a group whose answers all
    score the same teaches nothing (all zero).

    $$A_{q,g} = \frac{r_{q,g} - \mathrm{mean}_{g'} r_{q,g'}}{\mathrm{std}_{g'} r_{q,g'} + \epsilon}$$"""
    return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + eps)


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, beta: float, clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped policy-gradient objective with a k3 KL penalty, averaged over each answer's
    tokens, then over answers. logp* (B, T); advantages (B,); mask (B, T) True on answer tokens."""
    ratio = torch.exp(logp - logp_old)
    A = advantages[:, None]
    policy_term = torch.min(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
    kl = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1
    per_token = -(policy_term - beta * kl)
    per_answer = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    kl_mean = ((kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    return per_answer.mean(), kl_mean.detach()


def sample_group(model: MiniMindForCausalLM, tok, ex: Example, G: int, cfg: GRPOConfig, generator) -> tuple:
    """G sampled answers to one question -> (prompt ids, list of answer token lists, answer texts)."""
    ids = prompt_ids(tok, ex.prompt)
    answers = sample_answers(model, tok, ids, G, cfg.max_new_tokens, cfg.temperature, generator)
    return ids, answers, [answer_text(tok, a) for a in answers]


def task_questions(tasks: list[str], split: str) -> list[Example]:
    """The questions of ``tasks`` in ``split`` (arithmetic alone keeps its generation order)."""
    if list(tasks) == ["arithmetic"]:
        return list(arithmetic_tasks(split))
    bad = [t for t in tasks if t not in EXACT_TASKS]
    if bad:
        raise UserError(f"--tasks {' '.join(bad)}: GRPO needs answers a rule can check, one of "
                        f"{', '.join(EXACT_TASKS)}")
    return [ex for ex in build_examples(split, {t: -1 for t in tasks}) if ex.task in tasks]


def arithmetic_correct(model, tok, examples: list[Example], max_new_tokens: int = 8) -> list[bool]:
    """Greedy answer right or wrong, per held-out question (any checkable task's)."""
    model.eval()
    return [exact_match(answer(model, tok, ex.prompt, max_new_tokens), ex.answer) for ex in examples]


def arithmetic_accuracy(model, tok, examples: list[Example], max_new_tokens: int = 8) -> float:
    right = arithmetic_correct(model, tok, examples, max_new_tokens)
    return sum(right) / len(right)


def mcnemar(before: list[bool], after: list[bool]) -> dict:
    """Is 'after' better than 'before' on the same questions, or is the gap chance? Only the questions
    that changed count: g gained, l lost; under 'no effect' each change is a fair coin, so the exact
    two-sided p-value is P(Binomial(g + l, 1/2) as far from even as observed)."""
    g = sum(a and not b for b, a in zip(before, after))
    lost = sum(b and not a for b, a in zip(before, after))
    n, k = g + lost, min(g, lost)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"gained": g, "lost": lost, "p_value": p}


def main(cfg: GRPOConfig) -> dict:
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    resume_from = resume_point(ckpt_root, cfg.resume)
    policy, reference, tok = policy_and_reference(cfg.init_from, device)
    train_q = task_questions(cfg.tasks, "train")
    test_q = task_questions(cfg.tasks, "test")[:cfg.eval_questions]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    what = "+".join(cfg.tasks) if len(cfg.tasks) <= 2 else f"{len(cfg.tasks)}-task"

    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler, start, logger = resume_or_start(policy, optimizer, cfg, out, resume_from, device)
    right_before = arithmetic_correct(policy, tok, test_q, cfg.max_new_tokens) if start == 0 else None
    before = sum(right_before) / len(test_q) if right_before else None
    if before is not None:
        logger.log({"step": 0, "valid_accuracy": before})
        logger.write(f"step 0/{cfg.max_iters} | held-out {what} accuracy {before:.1%} (greedy)")
    t_start, rewards_log = time.perf_counter(), []
    for step in range(start, cfg.max_iters):
        # the questions and samples of a step depend only on (seed, step): a resumed run sees the same ones
        rng = random.Random(cfg.seed * 100_003 + step)
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + step)
        batch = rng.sample(train_q, cfg.questions_per_step)
        # 1) sample a group of answers per question and score them with the rule
        policy.eval()
        prompts, answers, rewards = [], [], []
        for ex in batch:
            ids, outs, texts = sample_group(policy, tok, ex, cfg.group_size, cfg, gen)
            prompts += [ids] * len(outs)
            answers += outs
            rewards.append([reward(t, ex.answer, cfg.format_reward) for t in texts])
        r = torch.tensor(rewards)  # (Q, G)
        adv = group_advantages(r).flatten().to(device)
        # 2) one policy-gradient step on all Q * G answers
        x, y = collate(prompts, answers, pad_id)
        x, y = x.to(device), y.to(device)
        mask = y != -100
        with torch.no_grad():
            logp_ref = token_logps(reference, x, y)
        policy.train()
        logp = token_logps(policy, x, y)
        loss, kl = grpo_loss(logp, logp.detach(), logp_ref, adv, mask, cfg.beta, cfg.clip_eps)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        loss.backward()
        clip_grad(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        done = step + 1
        correct = (r >= 1).float().mean().item()
        rewards_log.append(r.mean().item())
        logger.step(done, loss.item(), scheduler.get_last_lr()[0], int(mask.sum()), reward=r.mean().item(),
                    sample_accuracy=correct, kl=kl.item())
        if done % cfg.eval_every == 0 or done == cfg.max_iters:
            acc = arithmetic_accuracy(policy, tok, test_q, cfg.max_new_tokens)
            logger.log({"step": done, "valid_accuracy": acc})
            logger.write(f"step {done}/{cfg.max_iters} | held-out {what} accuracy {acc:.1%} | "
                         f"sampled answers right {correct:.0%} | KL {kl.item():.4f}")
        if done % cfg.save_every == 0 or done == cfg.max_iters:
            save_checkpoint(ckpt_root, done, policy, policy.config.to_dict(), optimizer, scheduler,
                            keep=cfg.keep_checkpoints)
    wall = time.perf_counter() - t_start
    right_after = arithmetic_correct(policy, tok, test_q, cfg.max_new_tokens)
    after = sum(right_after) / len(test_q)
    paired = mcnemar(right_before, right_after) if right_before else None
    final_dir = out / "final"
    save_pretrained(policy, policy.config.to_dict(), final_dir)
    copy_tokenizer(cfg.init_from, final_dir)
    summary = {"steps": cfg.max_iters, "train_wall_s": wall, "accuracy_before": before, "accuracy_after": after,
               "mean_reward_first_10": sum(rewards_log[:10]) / max(len(rewards_log[:10]), 1),
               "mean_reward_last_10": sum(rewards_log[-10:]) / max(len(rewards_log[-10:]), 1),
               "held_out_questions": len(test_q), "paired_test": paired}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.json").write_text(json.dumps([make_record(
        "gpt_minimind", cfg.run_name, f"{cfg.tasks[0]}_accuracy" if len(cfg.tasks) == 1 else "task_accuracy",
        after, "sft_model", before, wall,
        command_line("gpt_minimind.train_grpo"))], indent=2) + "\n")
    logger.write(f"done: {cfg.max_iters} steps in {wall:.0f} s | held-out {what} accuracy "
                 f"{before if before is None else f'{before:.1%}'} -> {after:.1%}"
                 + (f" ({paired['gained']} questions gained, {paired['lost']} lost: McNemar p = "
                    f"{paired['p_value']:.3f})" if paired else "") + f" | {final_dir}")
    logger.close()
    return {"summary": summary, "final_dir": final_dir}


if __name__ == "__main__":
    run_main(main, GRPOConfig)
