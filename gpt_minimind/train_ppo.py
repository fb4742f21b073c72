"""RLHF with PPO (Schulman et al. 2017) against a learned reward model, the recipe of InstructGPT (Ouyang
et al. 2022) and Stiennon et al. 2020, written out; train_reward.py trains the reward model first.

    python -m gpt_minimind.train_reward         # the reward model, from the SFT model and DPO's pairs
    python -m gpt_minimind.train_ppo            # the policy, from runs/gpt_minimind/sft/final
    python -m gpt_minimind.eval --stage sft=runs/gpt_minimind/sft/final ppo=runs/gpt_minimind/ppo/final

Four models: the policy pi (trained, from SFT), the reference pi_ref (the SFT model, frozen), the reward
model r (frozen) and the value model V (trained). Each step:

1. Rollouts: sample answers to a batch of prompts from pi with the KV cache; r scores each whole answer.
2. Rewards per answer token t: r_t = -beta * (log pi(a_t) - log pi_ref(a_t)), and the last token
   also gets the reward model's score (minus a penalty if the answer never ended). The KL term is what
   keeps the policy near the SFT model, whose text the reward model was trained to judge; beta adapts
   after each batch to hold the KL near a target (Ziegler et al. 2019's controller).
3. Advantages by GAE (Schulman et al. 2016): delta_t = r_t + gamma V(s_t+1) - V(s_t),
   A_t = delta_t + gamma lambda A_t+1, returns R_t = A_t + V(s_t); A whitened over the batch.
4. Several epochs of minibatch updates on the same rollouts, with the ratio rho = pi / pi_old:
   policy loss  mean max(-A rho, -A clip(rho, 1 - eps, 1 + eps))
   value loss   0.5 mean max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)
   stopping the epochs early once the KL between pi_old and pi passes 1.5 x target_kl.

The value model is separate from the policy (InstructGPT's choice, and trl's PPOTrainer since 2024; the
older trl put a value head on the policy's body): a copy of the reward model, which already reads answers
as good or bad, so its first estimates are useful. A value head on
the policy's own body would save one model's memory (1.2 M parameters here, nothing) but mixes the
value loss's gradients into the policy's weights and needs a loss weight to balance them.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from common.checkpoint import resume_or_start, resume_point, save_checkpoint, save_pretrained
from common.cli import UserError, run_main
from common.results import command_line, make_record
from common.runtime import pick_device, seed_everything, set_threads
from common.schedule import clip_grad

from .finetune import answer
from .loading import copy_tokenizer, load_reward_model, policy_and_reference
from .rlhf import collate, full_rows, prompt_ids, sample_answers, score_answers, token_logps
from .tasks import EXACT_TASKS, Example, build_examples, exact_match, read_conversations


@dataclass
class PPOConfig:
    """Raise the reward model's score of the SFT model's answers with PPO, a value model, GAE and a KL penalty."""

    init_from: str = "runs/gpt_minimind/sft/final"  # the policy's start and the frozen reference
    reward_model: str = "runs/gpt_minimind/reward/final"  # train_reward.py's model (frozen; the value model's start)
    tasks: list[str] = field(default_factory=lambda: list(EXACT_TASKS))  # prompts: these tasks' training questions
    data_file: str = ""  # or your prompts: minimind SFT JSONL; each conversation up to its last user turn
    out_dir: str = "runs/gpt_minimind/ppo"  # checkpoints, metrics.jsonl, loss.png, final/
    prompts_per_step: int = 16
    samples_per_prompt: int = 4  # answers sampled per prompt (one batch through the KV cache)
    max_new_tokens: int = 24
    temperature: float = 1.0
    ppo_epochs: int = 4  # passes over each batch of rollouts
    minibatch_size: int = 16  # answers per update
    max_iters: int = 80  # rollout batches
    lr: float = 2e-5  # the policy's peak learning rate
    value_lr: float = 1e-4  # the value model's
    warmup_iters: int = 5
    kl_coef: float = 0.1  # beta of the per-token KL penalty: its start when kl_target is set
    kl_target: float = 0.3  # nats per answer: beta adapts to hold the rollouts' KL near it (0 = fixed beta)
    kl_horizon: int = 256  # answers over which the controller may move beta by e x 20 % (Ziegler et al.)
    gamma: float = 1.0  # no discount within an answer (InstructGPT, trl)
    lam: float = 0.95  # GAE lambda
    clip_eps: float = 0.2  # policy ratio clip
    clip_value: float = 0.2  # value clip around the rollout's values
    target_kl: float = 0.02  # stop a batch's epochs once KL(pi_old || pi) > 1.5 x this (on a minibatch)
    missing_eos_penalty: float = 1.0  # subtracted from the score of an answer that never ended
    grad_clip: float = 1.0
    eval_questions: int = 200  # held-out questions of the tasks: greedy accuracy and reward-model score
    eval_every: int = 20
    save_every: int = 20
    keep_checkpoints: int = 2
    log_every: int = 5
    seed: int = 1234
    threads: int = 0
    device: str = "auto"
    resume: bool = False
    run_name: str = "ppo_cpu"


class PolicyAndValue(nn.Module):
    """The two trained models as one module: one checkpoint, one optimizer (a parameter group each)."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy, self.value = policy, value


# ---------------------------------------------------------------------------------------------------
# The PPO pieces (tests: tests/test_gpt_minimind_finetune.py)
# ---------------------------------------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance); zero outside the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Generalised advantage estimation over answer-aligned (B, L) tensors (mask: True on answer tokens,
    a prefix of each row). Returns (advantages, returns = advantages + values); zero past each answer.

    $$\delta_t = r_t + \gamma V_{t+1} - V_t, \qquad A_t = \delta_t + \gamma \lambda A_{t+1}, \qquad R_t = A_t + V_t$$"""
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    L = rewards.shape[1]
    for t in reversed(range(L)):
        next_value = values[:, t + 1] if t + 1 < L else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def kl_penalized_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> torch.Tensor:
    r"""(B, L) per-token rewards: -kl_coef * (log pi - log pi_ref) on every answer token, + the score on the last.

    $$r_t = -\beta \left(\log \pi_\theta(a_t \mid s_t) - \log \pi_{ref}(a_t \mid s_t)\right)
    + [t = T]\, r_\phi(x, y)$$"""
    rewards = -kl_coef * (logp - ref_logp) * mask
    last = (mask.sum(-1) - 1).clamp(min=0)
    return rewards.index_put((torch.arange(len(scores), device=scores.device), last), scores, accumulate=True)


class AdaptiveKLController:
    """Ziegler et al. 2019 (sec. 2.2), as InstructGPT and trl used it: after each batch of rollouts,
    beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * answers / horizon. A fixed beta lets a policy that
    finds a hole in the reward model walk as far from the SFT model as the hole pays for (seen here:
    README); the controller holds the KL near the target instead, so the bound is a setting."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_answers: int) -> float:
        if self.target > 0:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.beta *= 1 + error * n_answers / self.horizon
        return self.beta


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float) -> tuple[torch.Tensor, dict]:
    r"""PPO's clipped surrogate, as a loss to minimise, and its diagnostics.

    $$\mathcal{L}_{clip} = -\mathbb{E}_t\left[\min\left(\rho_t A_t,
    \mathrm{clip}(\rho_t, 1 - \epsilon, 1 + \epsilon) A_t\right)\right],
    \quad \rho_t = \frac{\pi_\theta(a_t \mid s_t)}{\pi_{old}(a_t \mid s_t)}$$"""
    ratio = torch.exp(logp - old_logp)
    loss = masked_mean(torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)), mask)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean(((ratio - 1).abs() > clip_eps).float(), mask).item(),
                 "approx_kl": masked_mean(ratio - 1 - (logp - old_logp), mask).item()}  # k3 of KL(old || new)
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_value: float) -> torch.Tensor:
    """0.5 * mean max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, -c, c)."""
    clipped = old_values + (values - old_values).clamp(-clip_value, clip_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the answer tokens: 1 = perfect values, 0 = no better than a constant."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    resid = returns - values
    var_e = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
    return (1 - var_e / var_r).item() if var_r > 0 else float("nan")


def answer_aligned(t: torch.Tensor, starts: torch.Tensor, L: int) -> torch.Tensor:
    """(B, T) row tensor -> (B, L): row i from position starts[i] on (answers begin after their prompts).
    Past a row's end it reads zeros, never another token of the row; the answer mask says what is real."""
    idx = starts[:, None] + torch.arange(L, device=t.device)
    return torch.nn.functional.pad(t, (0, L)).gather(1, idx)


@dataclass
class Rollouts:
    """One batch of sampled answers and everything PPO's updates read: rows (x, y) as collate builds them,
    and answer-aligned (B, L) tensors (position j = the answer's j-th token)."""

    x: torch.Tensor
    y: torch.Tensor
    starts: torch.Tensor  # (B,) x position of each answer's first token's prediction
    mask: torch.Tensor  # (B, L) True on answer tokens
    ended: torch.Tensor  # (B,) the answer ends with the end-of-turn token
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor  # whitened
    returns: torch.Tensor


@torch.no_grad()
def make_rollouts(policy, reference, value, prompts: list[list[int]], answers: list[list[int]],
                  scores: torch.Tensor, cfg: PPOConfig, pad_id: int, eos_id: int, kl_coef: float | None = None
                  ) -> Rollouts:
    """Steps 2 and 3: the log-probabilities of the sampled answers under pi and pi_ref, the values, the
    KL-penalised rewards (``scores``: the reward model's, one per answer) and GAE."""
    device = policy.lm_head.weight.device
    x, y = collate(prompts, answers, pad_id)
    x, y = x.to(device), y.to(device)
    starts = torch.tensor([len(p) - 1 for p in prompts], device=device)
    lengths = torch.tensor([len(a) for a in answers], device=device)
    L = int(lengths.max())
    mask = torch.arange(L, device=device)[None] < lengths[:, None]  # (B, L) True on each answer's tokens
    ended = torch.tensor([bool(a) and a[-1] == eos_id for a in answers], device=device)
    policy.eval()
    value.eval()
    old_logp = answer_aligned(token_logps(policy, x, y, cfg.temperature), starts, L)
    ref_logp = answer_aligned(token_logps(reference, x, y, cfg.temperature), starts, L)
    old_values = answer_aligned(value(x)["values"], starts, L) * mask
    scores = scores.to(device) - cfg.missing_eos_penalty * (~ended).float()
    rewards = kl_penalized_rewards(old_logp, ref_logp, scores, mask, cfg.kl_coef if kl_coef is None else kl_coef)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    return Rollouts(x, y, starts, mask, ended, old_logp, ref_logp, old_values, masked_whiten(advantages, mask),
                    returns)


def ppo_update(policy, value, optimizer, ro: Rollouts, cfg: PPOConfig, seed: int) -> tuple[dict, int]:
    """Step 4: ``cfg.ppo_epochs`` passes of minibatch updates over the rollouts, stopped (before the update)
    at the first minibatch whose KL(pi_old || pi) passes 1.5 x target_kl, as Spinning Up's PPO does.
    Returns (per-minibatch stats, epochs begun)."""
    policy.train()
    value.train()
    B, L = ro.mask.shape
    stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "approx_kl": [],
                                     "entropy": []}
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed + epoch)).to(ro.x.device)
        for i in range(0, B - cfg.minibatch_size + 1, cfg.minibatch_size):
            mb = perm[i:i + cfg.minibatch_size]
            m, starts = ro.mask[mb], ro.starts[mb]
            logp_all = (policy(ro.x[mb])["logits"].float() / cfg.temperature).log_softmax(-1)  # the sampling policy
            logp = answer_aligned(logp_all.gather(-1, ro.y[mb].clamp(min=0)[..., None]).squeeze(-1), starts, L)
            pg, pstats = policy_loss(logp, ro.old_logp[mb], ro.advantages[mb], m, cfg.clip_eps)
            vf = value_loss(answer_aligned(value(ro.x[mb])["values"], starts, L), ro.old_values[mb], ro.returns[mb],
                            m, cfg.clip_value)
            with torch.no_grad():
                entropy = answer_aligned(-(logp_all.exp() * logp_all).sum(-1), starts, L)
            stats["entropy"].append(masked_mean(entropy, m).item())
            stats["policy_loss"].append(pg.item())
            stats["value_loss"].append(vf.item())
            stats["clip_fraction"].append(pstats["clip_fraction"])
            stats["approx_kl"].append(pstats["approx_kl"])
            if pstats["approx_kl"] > 1.5 * cfg.target_kl:  # the policy has moved far enough on these rollouts
                return stats, epoch + 1
            loss = pg + vf  # the two models share no parameter: each loss trains its own
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"PPO loss is {loss.item()}; lower --lr")
            loss.backward()
            clip_grad(policy.parameters(), cfg.grad_clip)
            clip_grad(value.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return stats, cfg.ppo_epochs


# ---------------------------------------------------------------------------------------------------
# Prompts and evaluation
# ---------------------------------------------------------------------------------------------------

def ppo_prompts(cfg: PPOConfig, split: str) -> list[Example]:
    """The questions PPO samples answers to: the tasks' (train / test split) or the data file's."""
    if cfg.data_file:
        examples = read_conversations(cfg.data_file)
        n_valid = max(1, len(examples) // 20)
        return examples[n_valid:] if split == "train" else examples[:n_valid]
    bad = [t for t in cfg.tasks if t not in EXACT_TASKS]
    if bad:
        raise UserError(f"--tasks {' '.join(bad)}: expected checkable tasks, some of {', '.join(EXACT_TASKS)}")
    return [ex for ex in build_examples(split, {t: -1 for t in cfg.tasks}) if ex.task in cfg.tasks]


@torch.no_grad()
def evaluate_policy(policy, rm, tok, examples: list[Example], max_new_tokens: int) -> dict:
    """Greedy answers to held-out questions: exact-match accuracy (where there is a reference) and the
    reward model's mean score."""
    policy.eval()
    preds = [answer(policy, tok, ex.prompt, max_new_tokens) for ex in examples]
    scores = score_answers(rm, tok, [ex.prompt for ex in examples], preds)
    scored = [(p, ex.answer) for p, ex in zip(preds, examples) if ex.answer]
    acc = sum(exact_match(p, a) for p, a in scored) / len(scored) if scored else float("nan")
    return {"accuracy": acc, "rm_score": scores.mean().item(), "scores": scores.tolist()}


def paired_gain(before: list[float], after: list[float]) -> dict:
    """Mean per-question gain after - before and its standard error (the same questions both times)."""
    d = torch.tensor(after) - torch.tensor(before)
    return {"mean": d.mean().item(), "standard_error": (d.std() / len(d) ** 0.5).item() if len(d) > 1 else 0.0}


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------

def main(cfg: PPOConfig) -> dict:
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    n_answers = cfg.prompts_per_step * cfg.samples_per_prompt
    if cfg.minibatch_size > n_answers or n_answers % cfg.minibatch_size:
        raise UserError(f"--minibatch-size {cfg.minibatch_size}: expected a divisor of --prompts-per-step x "
                        f"--samples-per-prompt = {n_answers}, so that every answer is used")
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    resume_from = resume_point(ckpt_root, cfg.resume)
    train_q, test_q = ppo_prompts(cfg, "train"), ppo_prompts(cfg, "test")[:cfg.eval_questions]  # bad data fails first
    if len(train_q) < cfg.prompts_per_step:
        raise UserError(f"{len(train_q)} training prompts are fewer than --prompts-per-step {cfg.prompts_per_step}")
    policy, reference, tok = policy_and_reference(cfg.init_from, device)
    rm = load_reward_model(cfg.reward_model, device)
    value = copy.deepcopy(rm).requires_grad_(True)  # the value model starts as the reward model
    models = PolicyAndValue(policy, value)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    optimizer = torch.optim.AdamW([{"params": list(policy.parameters()), "lr": cfg.lr},
                                   {"params": list(value.parameters()), "lr": cfg.value_lr}],
                                  betas=(0.9, 0.95), weight_decay=0.0)
    scheduler, start, logger = resume_or_start(models, optimizer, cfg, out, resume_from, device)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    if start > 0:  # the controller's beta is part of the run's state (in the checkpoint it resumed from)
        state = torch.load(ckpt_root / f"step_{start:06d}" / "trainer_state.pt", map_location="cpu", weights_only=True)
        kl_ctl.beta = state["extra"]["kl_coef"]
    before = evaluate_policy(policy, rm, tok, test_q, cfg.max_new_tokens) if start == 0 else None
    if before:
        logger.log({"step": 0, "valid_accuracy": before["accuracy"], "valid_rm_score": before["rm_score"]})
        logger.write(f"step 0/{cfg.max_iters} | held-out accuracy {before['accuracy']:.1%} | reward-model score "
                     f"{before['rm_score']:+.3f} (the SFT model, greedy)")
    t_start = time.perf_counter()
    for step in range(start, cfg.max_iters):
        # 1) rollouts; the prompts and samples of a step depend only on (seed, step): a resumed run sees the same
        rng = random.Random(cfg.seed * 100_003 + step)
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + step)
        prompts, answers = [], []
        for ex in rng.sample(train_q, cfg.prompts_per_step):
            ids = prompt_ids(tok, ex.prompt)
            outs = sample_answers(policy, tok, ids, cfg.samples_per_prompt, cfg.max_new_tokens, cfg.temperature, gen)
            prompts += [ids] * len(outs)
            answers += outs
        with torch.no_grad():  # the reward model's head at each answer's last token (known: no pad-id guessing)
            last = torch.tensor([len(p) + len(a) - 1 for p, a in zip(prompts, answers)], device=device)
            values = rm(full_rows(prompts, answers, pad_id).to(device))["values"]
            scores = values[torch.arange(len(answers), device=device), last]
        # 2) the KL-penalised rewards, 3) GAE
        ro = make_rollouts(policy, reference, value, prompts, answers, scores, cfg, pad_id, tok.eos_token_id,
                           kl_ctl.beta)
        # 4) epochs of minibatch updates, stopped early past the KL target
        stats, epochs_done = ppo_update(policy, value, optimizer, ro, cfg, seed=cfg.seed + step * 31)
        scheduler.step()
        done = step + 1
        kl_ref = ((ro.old_logp - ro.ref_logp) * ro.mask).sum(-1).mean().item()  # per answer, on the rollouts
        beta = kl_ctl.beta
        kl_ctl.update(kl_ref, len(answers))
        mean = {k: sum(v) / len(v) for k, v in stats.items() if v}
        logger.step(done, mean["policy_loss"] + mean["value_loss"], scheduler.get_last_lr()[0], int(ro.mask.sum()),
                    score=scores.mean().item(), kl_to_ref=kl_ref, kl_coef=beta, **mean, epochs=epochs_done,
                    explained_variance=explained_variance(ro.old_values, ro.returns, ro.mask),
                    answer_tokens=ro.mask.sum(-1).float().mean().item(), ended=ro.ended.float().mean().item())
        if done % cfg.eval_every == 0 or done == cfg.max_iters:
            ev = evaluate_policy(policy, rm, tok, test_q, cfg.max_new_tokens)
            logger.log({"step": done, "valid_accuracy": ev["accuracy"], "valid_rm_score": ev["rm_score"]})
            logger.write(f"step {done}/{cfg.max_iters} | held-out accuracy {ev['accuracy']:.1%} | reward-model "
                         f"score {ev['rm_score']:+.3f} | rollouts: score {scores.mean().item():+.3f}, KL to the "
                         f"reference {kl_ref:.3f} nats/answer (beta {beta:.3f}), epochs {epochs_done}")
        if done % cfg.save_every == 0 or done == cfg.max_iters:
            save_checkpoint(ckpt_root, done, models, {"policy": policy.config.to_dict()}, optimizer, scheduler,
                            extra={"kl_coef": kl_ctl.beta}, keep=cfg.keep_checkpoints)
    wall = time.perf_counter() - t_start
    after = evaluate_policy(policy, rm, tok, test_q, cfg.max_new_tokens)
    final_dir = out / "final"
    save_pretrained(policy, policy.config.to_dict(), final_dir)
    copy_tokenizer(cfg.init_from, final_dir)
    save_pretrained(value, value.config.to_dict(), out / "value")
    gain = paired_gain(before["scores"], after["scores"]) if before else None
    summary = {"steps": cfg.max_iters, "train_wall_s": wall, "held_out_questions": len(test_q),
               "before": {k: v for k, v in before.items() if k != "scores"} if before else None,
               "after": {k: v for k, v in after.items() if k != "scores"}, "rm_score_gain": gain}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    cmd = command_line("gpt_minimind.train_ppo")
    (out / "results.json").write_text(json.dumps([
        make_record("gpt_minimind", cfg.run_name, "rm_score", after["rm_score"], "sft_model",
                    before["rm_score"] if before else None, wall, cmd),
        make_record("gpt_minimind", cfg.run_name, "task_accuracy", after["accuracy"], "sft_model",
                    before["accuracy"] if before else None, wall, cmd)], indent=2) + "\n")
    was = f"{before['accuracy']:.1%} -> " if before else ""
    logger.write(f"done: {cfg.max_iters} steps in {wall:.0f} s | held-out accuracy {was}{after['accuracy']:.1%} | "
                 f"reward-model score " + (f"{before['rm_score']:+.3f} -> " if before else "")
                 + f"{after['rm_score']:+.3f}" + (f" (paired gain {gain['mean']:+.3f} +- {gain['standard_error']:.3f})"
                                                   if gain else "") + f" | {final_dir}")
    logger.close()
    return {"summary": summary, "final_dir": final_dir}


if __name__ == "__main__":
    run_main(main, PPOConfig)
