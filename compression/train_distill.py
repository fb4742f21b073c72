"""Distil SmolLM2-135M into a student made of a third of its layers, against the same student trained on the
text alone for the same steps.

    python -m compression.train_distill --mode ce             # the control: next-token CE only
    python -m compression.train_distill --mode kd             # + logit distillation (KL at temperature T)
    python -m compression.train_distill --mode kd_feat        # + feature distillation through a projection

Each run: about 6 minutes on 2 cores at the defaults. All three start from the same student (distill.py:
student_from_teacher), see the same batches in the same order, and freeze the same parameters (the embedding,
tied to the output head: 28 M of SmolLM2's 135 M parameters, and not what a layer-dropped student lacks).
Writes runs/compression/distill/<mode>/: metrics.jsonl, loss.png, final/ (a transformers directory).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.checkpoint import resume_or_start, resume_point, save_checkpoint
from common.cli import run_main
from common.errors import UserError
from common.results import command_line, make_record
from common.runtime import pick_device, seed_everything, set_threads
from common.schedule import clip_grad

from .dataset import encode, heldout_loss, load_splits, random_windows, token_windows
from .distill import FeatureProjector, kd_loss, student_from_teacher
from .loading import load_model, resolve_model


@dataclass
class DistillConfig:
    """Distil a model into a layer-dropped copy of itself."""

    model: str = "smollm2"  # the teacher: smollm2, subject, or a transformers Llama-family directory
    mode: str = "kd"  # ce (no teacher), kd (+ logits), kd_feat (+ logits + hidden states)
    student_layers: int = 10  # decoder layers the student keeps (evenly spaced, first and last included) (>= 1)
    temperature: float = 2.0  # T of the softened distributions (> 0)
    alpha: float = 0.5  # weight of the KL term; 1 - alpha weighs the CE (<= 1)
    beta: float = 1.0  # weight of the feature term (kd_feat) (>= 0)
    text_file: str = ""  # your own UTF-8 text (last 10 % held out); empty: the Shakespeare plays
    seq_len: int = 128  # tokens per training window (>= 16)
    batch_size: int = 4  # windows per step
    max_iters: int = 100  # optimizer steps
    lr: float = 2e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * this
    warmup_iters: int = 10
    grad_clip: float = 1.0
    eval_windows: int = 12  # held-out windows of eval_seq_len (as evaluate.py) (>= 1)
    eval_seq_len: int = 512  # tokens per held-out window (>= 16)
    device: str = "auto"
    threads: int = 0  # CPU threads (0 = torch's default)
    seed: int = 1234
    eval_every: int = 50
    save_every: int = 50
    keep_checkpoints: int = 1
    log_every: int = 10
    out_dir: str = ""  # default runs/compression/distill/<mode>
    resume: bool = False
    run_name: str = ""  # names this run's records in doc/results.json (default: distill_<mode>)


def main(cfg: DistillConfig) -> dict:
    if cfg.mode not in ("ce", "kd", "kd_feat"):
        raise UserError(f"--mode {cfg.mode}: expected ce, kd or kd_feat")
    resolve_model(cfg.model)  # one error line before anything is read
    device = pick_device(cfg.device)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir or f"runs/compression/distill/{cfg.mode}")
    resume_from = resume_point(out / "checkpoints", cfg.resume)

    # 1) data and models: the frozen teacher, the student cut from it, the projector (kd_feat)
    train_text, held_text = load_splits(cfg.text_file)
    teacher, tok = load_model(cfg.model)
    n_teacher = len(teacher.model.layers)
    if cfg.student_layers >= n_teacher:
        raise UserError(f"--student-layers {cfg.student_layers}: the teacher has {n_teacher} layers; expected fewer")
    student, keep = student_from_teacher(teacher, cfg.student_layers)
    teacher.requires_grad_(False).to(device)
    student.to(device).train()
    student.model.embed_tokens.requires_grad_(False)  # tied to lm_head: frozen in every mode (docstring)
    d = student.config.hidden_size
    projector = FeatureProjector(d, teacher.config.hidden_size, len(keep)).to(device) if cfg.mode == "kd_feat" \
        else None
    trainable = [p for p in student.parameters() if p.requires_grad] + \
        (list(projector.parameters()) if projector is not None else [])
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    holder = torch.nn.ModuleDict({"student": student} | ({"projector": projector} if projector is not None else {}))
    scheduler, start, logger = resume_or_start(holder, optimizer, cfg, out, resume_from, device, cfg.min_lr_ratio)
    train_ids = encode(tok, train_text)
    vx = token_windows(tok, held_text, cfg.eval_seq_len, cfg.eval_windows, "the held-out text").to(device)
    logger.write(f"student: layers {keep} of {n_teacher} | {sum(p.numel() for p in trainable) / 1e6:.1f} M trainable "
                 f"of {student.num_parameters() / 1e6:.1f} M | mode {cfg.mode} | T {cfg.temperature}")
    if start == 0:
        logger.log({"step": 0, "valid_loss": heldout_loss(student, vx)})

    # 2) the loop: batch = f(seed, step), the same in every mode
    t0, losses, valid = time.perf_counter(), [], None
    for step in range(start, cfg.max_iters):
        x = random_windows(train_ids, cfg.seq_len, cfg.batch_size, cfg.seed * 100_003 + step).to(device)
        want_h = cfg.mode == "kd_feat"
        s_out = student(x, labels=x, output_hidden_states=want_h, use_cache=False)
        terms = {"ce": s_out.loss}
        loss = s_out.loss
        if cfg.mode != "ce":
            with torch.no_grad():
                t_out = teacher(x, output_hidden_states=want_h, use_cache=False)
            terms["kd"] = kd_loss(s_out.logits[:, :-1], t_out.logits[:, :-1], cfg.temperature)
            loss = cfg.alpha * terms["kd"] + (1 - cfg.alpha) * s_out.loss
            if want_h:  # student layer j's output against the output of the teacher layer it came from
                hs = [s_out.hidden_states[j + 1] for j in range(len(keep))]
                ts = [t_out.hidden_states[k + 1] for k in keep]
                terms["feat"] = projector(hs, ts)
                loss = loss + cfg.beta * terms["feat"]
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad(trainable, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(s_out.loss.item())
        logger.step(step + 1, s_out.loss.item(), scheduler.get_last_lr()[0], x.numel(),
                    **{k: v.item() for k, v in terms.items() if k != "ce"})
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_iters:
            valid = heldout_loss(student, vx)
            logger.log({"step": step + 1, "valid_loss": valid})
            logger.write(f"step {step + 1}/{cfg.max_iters} | held-out loss {valid:.4f} | ppl {math.exp(valid):.2f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_iters:
            save_checkpoint(out / "checkpoints", step + 1, holder, {"student_layers": keep}, optimizer, scheduler,
                            keep=cfg.keep_checkpoints)
    wall = time.perf_counter() - t0

    # 3) the student as a transformers directory; the teacher's held-out loss for reference
    valid = heldout_loss(student, vx) if valid is None else valid
    final = out / "final"
    student.save_pretrained(str(final))
    tok.save_pretrained(str(final))
    teacher_loss = heldout_loss(teacher, vx)
    summary = {"mode": cfg.mode, "steps": cfg.max_iters, "train_wall_s": wall, "valid_loss": valid,
               "valid_ppl": math.exp(valid), "teacher_valid_loss": teacher_loss, "student_layers": keep,
               "student_params": student.num_parameters(), "teacher_params": teacher.num_parameters()}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    records = [make_record("compression", cfg.run_name or f"distill_{cfg.mode}", "heldout_loss", valid, "teacher",
                           teacher_loss, wall, command_line("compression.train_distill"))]
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    logger.write(f"done: {cfg.max_iters} steps in {wall:.0f} s | student held-out loss {valid:.4f} (teacher "
                 f"{teacher_loss:.4f}) | {final}")
    logger.close()
    return {"losses": losses, "summary": summary, "out_dir": out}


if __name__ == "__main__":
    run_main(main, DistillConfig)
