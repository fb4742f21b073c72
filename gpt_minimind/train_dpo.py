"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language
Model is Secretly a Reward Model"), written out.

    python -m gpt_minimind.train_dpo                              # from runs/gpt_minimind/sft/final
    python -m gpt_minimind.train_dpo --data-file dpo.jsonl        # minimind's DPO format instead
    python -m gpt_minimind.eval --stage sft=runs/gpt_minimind/sft/final dpo=runs/gpt_minimind/dpo/final

For a prompt x with a preferred answer y_w and a worse one y_l, the policy pi (initialised from the SFT
model) is pushed to raise log pi(y_w|x) relative to a frozen reference pi_ref (the SFT model itself):

    loss = -log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

log pi(y|x) is the SUM of the answer tokens' log-probabilities (the prompt's are context). The implicit
reward of an answer is beta * (log pi - log pi_ref); "reward accuracy" is how often the chosen answer's
reward beats the rejected one's. beta sets how far from the reference the policy may move (eq. 7).

Preference pairs come from the checkable tasks: chosen = the correct answer, rejected = a plausible wrong
one (another label, a near-miss number, another word's meaning), and, for some questions, the SFT model's
own wrong answer sampled at temperature 1 (what it actually gets wrong, so DPO pushes on real errors).
"""

from __future__ import annotations

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

from .loading import copy_tokenizer, policy_and_reference
from .preference import PairData, all_logps, pair_batches, preference_pairs, sequence_logps


@dataclass
class DPOConfig:
    """Align the SFT model with preference pairs by DPO (a frozen reference, no reward model)."""

    init_from: str = "runs/gpt_minimind/sft/final"  # the policy's start and the frozen reference
    data_file: str = ""  # minimind DPO JSONL: {"chosen": [turns], "rejected": [turns]}; empty = checkable tasks
    out_dir: str = "runs/gpt_minimind/dpo"  # checkpoints, metrics.jsonl, loss.png, final/, pairs.jsonl
    train_pairs: int = 4000  # pairs built from the training questions
    own_samples: int = 1000  # of those, questions answered by the SFT model itself (its wrong answers kept)
    eval_pairs: int = 400  # held-out pairs (test questions) for reward accuracy / margin
    beta: float = 0.1  # paper: 0.1; larger keeps the policy closer to the reference
    sft_weight: float = 1.0  # + this x the chosen answers' mean token NLL (RPO, Pang et al. 2024; trl's rpo_alpha)
    batch_size: int = 16  # pairs per step (32 sequences)
    max_iters: int = 250  # optimizer steps (one pass over the 4,000 pairs)
    lr: float = 1e-4  # peak learning rate (DPO wants small steps; 5e-7 at 7B scale, larger for tiny models)
    warmup_iters: int = 20
    grad_clip: float = 1.0
    eval_every: int = 50
    save_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 25
    seed: int = 1234
    threads: int = 0
    device: str = "auto"
    resume: bool = False  # continue from the newest checkpoint in out_dir/checkpoints
    run_name: str = "dpo_cpu"


# ---------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------

def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Mean DPO loss over the batch, and the implicit rewards beta * log(pi / pi_ref) of both answers.

    $$\mathcal{L}_{DPO} = -\log \sigma\left(\beta \log \frac{\pi_\theta(y_w \mid x)}{\pi_{ref}(y_w \mid x)}
    - \beta \log \frac{\pi_\theta(y_l \mid x)}{\pi_{ref}(y_l \mid x)}\right)$$"""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    return loss, chosen_reward.detach(), rejected_reward.detach()


def reward_stats(policy, ref_logps, data: PairData, beta: float) -> dict:
    pc, pr = all_logps(policy, data)
    _, cr, rr = dpo_loss(pc, pr, *ref_logps, beta)
    return {"preference_accuracy": (pc > pr).float().mean().item(),  # the model itself ranks chosen first
            "reward_accuracy": (cr > rr).float().mean().item(), "reward_margin": (cr - rr).mean().item(),
            "chosen_logp": pc.mean().item(), "rejected_logp": pr.mean().item()}


def main(cfg: DPOConfig) -> dict:
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    resume_from = resume_point(ckpt_root, cfg.resume)
    policy, reference, tok = policy_and_reference(cfg.init_from, device)
    max_len = policy.config.max_position_embeddings

    # 1) pairs (cached in out_dir so that --resume trains on the very same ones)
    t0 = time.perf_counter()
    train_pairs, valid_pairs, pair_stats = preference_pairs(cfg, out / "pairs.json", resume_from is not None,
                                                            reference, tok, cfg.seed)
    train, valid = PairData(tok, train_pairs, max_len), PairData(tok, valid_pairs, max_len)
    ref_train, ref_valid = all_logps(reference, train), all_logps(reference, valid)
    print(f"pairs: {len(train)} train / {len(valid)} held out | SFT model's own answers: {pair_stats} | "
          f"reference log-probs precomputed | {time.perf_counter() - t0:.0f} s", flush=True)

    # 2) optimise
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler, start, logger = resume_or_start(policy, optimizer, cfg, out, resume_from, device)
    before = reward_stats(policy, ref_valid, valid, cfg.beta) if start == 0 else None
    if before:
        logger.log({"step": 0, **{f"valid_{k}": v for k, v in before.items()}})
        logger.write(f"step 0/{cfg.max_iters} | held-out preference accuracy {before['preference_accuracy']:.1%}"
                     " (the SFT model's log p(chosen) > log p(rejected))")
    policy.train()
    step, t_start, losses = start, time.perf_counter(), []
    for i, idx in pair_batches(len(train), cfg.batch_size, cfg.seed, start, cfg.max_iters):
        x, y = train.collate(idx)
        lp = sequence_logps(policy, x.to(device), y.to(device))
        loss, cr, rr = dpo_loss(lp[:len(idx)], lp[len(idx):], ref_train[0][idx].to(device),
                                ref_train[1][idx].to(device), cfg.beta)
        if cfg.sft_weight > 0:  # keep the chosen answers likely, not only likelier than the rejected
            loss = loss - cfg.sft_weight * lp[:len(idx)].sum() / (y[:len(idx)] != -100).sum()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {i}; lower --lr")
        loss.backward()
        clip_grad(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step = i + 1
        losses.append(loss.item())
        logger.step(step, loss.item(), scheduler.get_last_lr()[0], x.numel(),
                    reward_accuracy=(cr > rr).float().mean().item(), reward_margin=(cr - rr).mean().item())
        if step % cfg.eval_every == 0 or step == cfg.max_iters:
            stats = reward_stats(policy, ref_valid, valid, cfg.beta)
            policy.train()
            logger.log({"step": step, **{f"valid_{k}": v for k, v in stats.items()}})
            logger.write(f"step {step}/{cfg.max_iters} | held-out preference accuracy "
                         f"{stats['preference_accuracy']:.1%} | reward accuracy {stats['reward_accuracy']:.1%}"
                         f" | margin {stats['reward_margin']:.3f}")
        if step % cfg.save_every == 0 or step == cfg.max_iters:
            save_checkpoint(ckpt_root, step, policy, policy.config.to_dict(), optimizer, scheduler,
                            keep=cfg.keep_checkpoints)
    wall = time.perf_counter() - t_start
    after = reward_stats(policy, ref_valid, valid, cfg.beta)
    final_dir = out / "final"
    save_pretrained(policy, policy.config.to_dict(), final_dir)
    copy_tokenizer(cfg.init_from, final_dir)
    summary = {"steps": step, "train_wall_s": wall, "before": before, "after": after, "pairs": pair_stats,
               "beta": cfg.beta}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    cmd = command_line("gpt_minimind.train_dpo")
    base = before["preference_accuracy"] if before else None
    (out / "results.json").write_text(json.dumps([
        make_record("gpt_minimind", cfg.run_name, "preference_accuracy", after["preference_accuracy"],
                    "sft_model", base, wall, cmd),
        make_record("gpt_minimind", cfg.run_name, "reward_accuracy", after["reward_accuracy"], "chance", 0.5,
                    wall, cmd)], indent=2) + "\n")
    logger.write(f"done: {step} steps in {wall:.0f} s | held-out preference accuracy "
                 f"{after['preference_accuracy']:.1%} (SFT model {base if base is None else f'{base:.1%}'}), "
                 f"reward accuracy {after['reward_accuracy']:.1%}, margin {after['reward_margin']:.3f} | {final_dir}")
    logger.close()
    return {"losses": losses, "summary": summary, "final_dir": final_dir}


if __name__ == "__main__":
    run_main(main, DPOConfig)
