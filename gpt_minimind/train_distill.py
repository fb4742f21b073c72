"""Knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"): a small
student learns the pretraining text from the teacher's whole next-token distribution, not only from the
one token that came next.

    python -m gpt_minimind.train_pretrain --use-moe --num-experts 4 --num-experts-per-tok 2 \
        --out-dir runs/gpt_minimind/pretrain_moe --run-name pretrain_moe_cpu      # the teacher: 4 experts
    python -m gpt_minimind.train_distill        # that teacher -> a student half its width
    python -m gpt_minimind.train_distill --teacher runs/gpt_minimind/pretrain/final   # a dense teacher

    loss = alpha * T^2 * KL( softmax(teacher / T) || softmax(student / T) ) + (1 - alpha) * CE(student, next token)

A temperature T > 1 softens both distributions so the student also learns which wrong tokens the teacher
finds plausible ("dark knowledge"); T^2 keeps the soft term's gradients on the scale of the hard one's.
The default teacher is a mixture-of-experts model (model.py's MiniMindMoE: 4 SwiGLU experts per block,
each token sent to 2 of them, Mixtral's layout): 1.7x the dense cpu model's parameters.
The script trains the same student twice, from the same initialisation and batches: with the teacher
(alpha) and without it (alpha = 0, plain pretraining), and reports both validation losses beside the
teacher's, so the table shows what the teacher was worth at equal compute for the student.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from common.checkpoint import save_pretrained
from common.cli import run_main
from common.data import evenly_spaced, subset_note
from common.log import RunLogger
from common.results import command_line, make_record
from common.runtime import autocast, pick_device, seed_everything, set_threads
from common.schedule import clip_grad, make_scheduler

from .dataset import PackedBlocks
from .loading import load_model
from .model import MiniMindConfig, MiniMindForCausalLM
from .tokenizer import load_streams


@dataclass
class DistillConfig:
    """Distil a pretrained teacher into a smaller student; compare with the student trained alone."""

    teacher: str = "runs/gpt_minimind/pretrain_moe/final"  # model + tokenizer/ (train_pretrain.py's output)
    out_dir: str = "runs/gpt_minimind/distill"  # student_kd/, student_alone/, distill.json
    # the student: half the width of the cpu-preset teacher, with the teacher's vocabulary (vocab_size is taken
    # from the teacher); blocks of 128, shorter than the teacher's 256: the soft targets cost a V-wide softmax
    # per position
    student: MiniMindConfig = field(default_factory=lambda: MiniMindConfig(
        vocab_size=0, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=128))
    alpha: float = 0.5  # weight of the soft (teacher) term
    temperature: float = 2.0  # softening of both distributions
    batch_size: int = 16
    max_iters: int = 200  # optimizer steps for each of the two students
    lr: float = 3e-3
    warmup_iters: int = 30
    eval_every: int = 100
    eval_blocks: int = 128  # valid blocks (evenly spaced) for the estimates while training; the figures use all
    baseline: bool = True  # also train the student without the teacher (alpha = 0)
    log_every: int = 25
    seed: int = 1234
    threads: int = 0
    device: str = "auto"
    run_name: str = "distill_cpu"

    RENAMED: ClassVar[dict[str, str]] = {  # the flags of the previous release, kept for one release
        "dim": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
        "n_kv_head": "num_key_value_heads", "block_size": "max_position_embeddings"}


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                 T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, hard CE) for logits (B, T, V) and labels (B, T)."""
    V = student_logits.shape[-1]
    hard = F.cross_entropy(student_logits.float().reshape(-1, V), labels.reshape(-1))
    if alpha == 0:
        return hard, hard.detach()
    soft = F.kl_div(F.log_softmax(student_logits.float().reshape(-1, V) / T, -1),
                    F.log_softmax(teacher_logits.float().reshape(-1, V) / T, -1),
                    log_target=True, reduction="batchmean") * T * T
    return alpha * soft + (1 - alpha) * hard, hard.detach()


def subset_blocks(n_blocks: int, max_blocks: int) -> torch.Tensor:
    """Indices of ``max_blocks`` blocks evenly spaced over ``n_blocks`` (all of them when max_blocks <= 0 or
    >= n_blocks): a training-time estimate that sees the whole split's variety, not only its first pages."""
    return torch.tensor(evenly_spaced(n_blocks, max_blocks), dtype=torch.long)


# Copied from gpt_minimind/train_pretrain.py::evaluate
@torch.no_grad()
def evaluate(model: MiniMindForCausalLM, data: PackedBlocks, batch_size: int, device, dtype,
             max_blocks: int = 0) -> tuple[float, int]:
    """Mean next-token NLL (nats/token) and the token count: over every block (max_blocks 0), else over
    ``max_blocks`` blocks spread evenly over the split (the same ones at every evaluation of a run)."""
    model.eval()
    ids = subset_blocks(len(data), max_blocks)
    total, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        x, y = data.get(ids[i:i + batch_size])
        with autocast(device, dtype):
            out = model(x.to(device), labels=y.to(device))
        total += out["lm_loss"].item() * y.numel()
        count += y.numel()
    model.train()
    return total / count, count


def train_student(cfg: DistillConfig, teacher, mcfg: MiniMindConfig, train: PackedBlocks, valid: PackedBlocks,
                  alpha: float, out: Path, device) -> dict:
    seed_everything(cfg.seed)  # the same initial student and batch order for both runs
    student = MiniMindForCausalLM(mcfg).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = make_scheduler(optimizer, "cosine", cfg.warmup_iters, cfg.max_iters, min_ratio=0.1)
    logger = RunLogger(out, cfg.max_iters, log_every=cfg.log_every, device=device)
    dtype = torch.float32
    step, t0 = 0, time.perf_counter()
    while step < cfg.max_iters:
        for _, x, y in train.batches(cfg.batch_size, cfg.seed, epoch=step // max(len(train) // cfg.batch_size, 1)):
            x, y = x.to(device), y.to(device)
            teacher_logits = None
            if alpha > 0:
                with torch.no_grad():
                    teacher_logits = teacher(x)["logits"]
            loss, hard = distill_loss(student(x)["logits"], teacher_logits, y, alpha, cfg.temperature)
            loss.backward()
            clip_grad(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            logger.step(step, hard.item(), scheduler.get_last_lr()[0], x.numel())
            if step % cfg.eval_every == 0 or step == cfg.max_iters:
                vl, _ = evaluate(student, valid, cfg.batch_size, device, dtype, cfg.eval_blocks)
                logger.log({"step": step, "valid_loss": vl})
                logger.write(f"step {step}/{cfg.max_iters} | valid loss {vl:.3f} (alpha {alpha})"
                             + subset_note(min(cfg.eval_blocks, len(valid)) if cfg.eval_blocks > 0 else len(valid),
                                           len(valid), "valid blocks"))
            if step >= cfg.max_iters:
                break
    wall = time.perf_counter() - t0
    vl, _ = evaluate(student, valid, cfg.batch_size, device, dtype)  # the whole valid split
    save_pretrained(student, mcfg.to_dict(), out / "final")
    logger.close()
    return {"alpha": alpha, "valid_loss": vl, "wall_s": wall, "n_params": student.num_parameters()}


def main(cfg: DistillConfig) -> dict:
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    teacher, tok = load_model(cfg.teacher, device)
    out = Path(cfg.out_dir)
    t0 = time.perf_counter()
    streams, _, _ = load_streams("bpe", Path(cfg.teacher) / "tokenizer", cfg.out_dir)  # the teacher's tokenizer
    block_size = cfg.student.max_position_embeddings
    train, valid = PackedBlocks(streams["train"], block_size), PackedBlocks(streams["valid"], block_size)
    print(f"data: {len(train)} train / {len(valid)} valid blocks of {block_size} | "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    teacher_loss, _ = evaluate(teacher, valid, cfg.batch_size, device, torch.float32)  # the whole valid split
    if cfg.student.vocab_size not in (0, teacher.config.vocab_size):
        raise SystemExit(f"--vocab-size {cfg.student.vocab_size}: the student must share the teacher's "
                         f"{teacher.config.vocab_size} tokens (leave it at 0)")
    mcfg = replace(cfg.student, vocab_size=teacher.config.vocab_size)
    runs = {"student_kd": train_student(cfg, teacher, mcfg, train, valid, cfg.alpha, out / "student_kd", device)}
    if cfg.baseline:
        runs["student_alone"] = train_student(cfg, teacher, mcfg, train, valid, 0.0, out / "student_alone", device)
    result = {"teacher_valid_loss": teacher_loss, "teacher_params": teacher.num_parameters(), **runs,
              "temperature": cfg.temperature, "steps": cfg.max_iters}
    (out / "distill.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"teacher ({teacher.num_parameters() / 1e6:.2f} M) valid loss {teacher_loss:.3f} | student "
          f"({runs['student_kd']['n_params'] / 1e6:.2f} M) with the teacher {runs['student_kd']['valid_loss']:.3f}"
          + (f", alone {runs['student_alone']['valid_loss']:.3f}" if cfg.baseline else ""))
    alone = runs.get("student_alone", {}).get("valid_loss")
    cmd = command_line("gpt_minimind.train_distill", f"python -m gpt_minimind.train_distill --teacher {cfg.teacher}")
    (out / "results.json").write_text(json.dumps([make_record(
        "gpt_minimind", cfg.run_name, "valid_loss", runs["student_kd"]["valid_loss"],
        "student_without_teacher" if alone is not None else "", alone, runs["student_kd"]["wall_s"],
        cmd)], indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_main(main, DistillConfig)
