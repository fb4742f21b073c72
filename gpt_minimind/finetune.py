"""The fine-tuning pieces every conversation stage shares: SFT data with assistant-only labels, the
training loop ``finetune`` (train_sft.py trains every weight with it, train_lora.py and peft_zoo.py
only an adapter's), and a greedy ``answer`` for scoring.

Each conversation is rendered with the tokenizer's chat template,
``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>\\n``, and the loss is the
next-token loss on the assistant's tokens only (its answer and the closing <|im_end|>, so the model
learns to stop); the user's words and the role headers are context, with label -100. Every assistant
turn of a multi-turn conversation is learned.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from common.checkpoint import resume_or_start, resume_point, save_checkpoint
from common.runtime import autocast, pick_dtype
from common.schedule import clip_grad

from . import engine
from .dataset import epoch_order
from .model import MiniMindForCausalLM
from .tasks import TASKS, Example, build_examples, parse_mix, read_conversations


@dataclass
class SFTConfig:
    """Fine-tune a pretrained checkpoint on conversations, loss on the assistant's tokens only."""

    init_from: str = "runs/gpt_minimind/pretrain/final"  # the pretrained model (and its tokenizer/)
    data_file: str = ""  # minimind SFT JSONL ({"conversations": [...]}); empty = the tasks of tasks.py
    mix: list[str] = field(default_factory=list)  # TASK=N overrides of tasks.DEFAULT_MIX (N=-1: all, 0: none)
    only_tasks: list[str] = field(default_factory=list)  # train and validate on these tasks only (empty: all)
    out_dir: str = "runs/gpt_minimind/sft"  # checkpoints, metrics.jsonl, loss.png, final/
    batch_size: int = 16  # conversations per step
    max_iters: int = 800  # optimizer steps (~1.1 epochs of the default mix; run time: README)
    lr: float = 5e-4  # peak learning rate: below pretraining's, the model already knows the language
    min_lr_ratio: float = 0.1  # the cosine ends at lr * this
    warmup_iters: int = 50  # linear warmup steps
    weight_decay: float = 0.0  # none: short fine-tune
    grad_clip: float = 1.0  # clip the global gradient norm
    max_len: int = 0  # tokens per conversation, longer ones are cut (0 = the model's context length)
    eval_every: int = 200  # steps between held-out assistant-token losses
    eval_examples: int = 256  # held-out conversations for that loss
    save_every: int = 200  # steps between checkpoints
    keep_checkpoints: int = 2
    log_every: int = 50
    seed: int = 1234
    threads: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16
    resume: bool = False  # continue from the newest checkpoint in out_dir/checkpoints
    run_name: str = "sft_cpu"  # names this run's records in doc/results.json


# ---------------------------------------------------------------------------------------------------
# Data: conversations -> ids with assistant-only labels
# ---------------------------------------------------------------------------------------------------

def encode_chat(tok, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation, and labels that keep only the assistant's tokens.

    The chat template is applied as text and tokenized once (so the ids are exactly what inference
    sees); then each ``<|im_start|>assistant\\n`` header opens a span that runs to its <|im_end|>,
    inclusive. labels[t] is the target of position t (already shifted: the token after ids[t])."""
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)[:max_len + 1]
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    learn = [False] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i:i + len(header)] == header:
            j = i + len(header)
            while j < len(ids) and ids[j] != tok.eos_token_id:
                learn[j] = True
                j += 1
            if j < len(ids):
                learn[j] = True  # the <|im_end|> that ends the turn: the model must learn to stop
            i = j
        i += 1
    labels = [ids[t + 1] if learn[t + 1] else -100 for t in range(len(ids) - 1)]
    return ids[:-1], labels


class SFTData:
    """Encoded conversations, served as right-padded batches in a seeded order per epoch.

    Right padding needs no attention mask in a causal model: real tokens never look ahead at the
    padding after them, and padding positions carry label -100."""

    def __init__(self, tok, examples: list[Example], max_len: int):
        rows = [encode_chat(tok, ex.messages, max_len) for ex in examples]
        self.rows = [r for r in rows if any(t != -100 for t in r[1])]  # a cut that lost every answer teaches nothing
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        if not self.rows:
            raise ValueError("no conversation has an assistant token left after truncation; raise --max-len")

    def __len__(self) -> int:
        return len(self.rows)

    def collate(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(len(self.rows[i][0]) for i in idx)
        x = torch.full((len(idx), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(idx), T), -100, dtype=torch.long)
        for b, i in enumerate(idx):
            ids, labels = self.rows[i]
            x[b, :len(ids)] = torch.tensor(ids)
            y[b, :len(labels)] = torch.tensor(labels)
        return x, y

    def batches(self, batch_size: int, seed: int, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        order = epoch_order(len(self.rows), seed, epoch)
        for b in range(start, len(order) // batch_size):
            yield self.collate(order[b * batch_size:(b + 1) * batch_size])


def assistant_loss(model: MiniMindForCausalLM, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the positions whose label is not -100 (the assistant's tokens)."""
    logits = model(x)["logits"]
    n = int((y != -100).sum())
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100), n


@torch.no_grad()
def evaluate(model, data: SFTData, batch_size: int, device, dtype) -> float:
    model.eval()
    total = count = 0
    for i in range(0, len(data), batch_size):
        x, y = data.collate(list(range(i, min(i + batch_size, len(data)))))
        with autocast(device, dtype):
            loss, n = assistant_loss(model, x.to(device), y.to(device))
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / max(count, 1)


def load_conversations(cfg: SFTConfig) -> tuple[list[Example], list[Example]]:
    """(train, held-out) conversations: the user's file (2 % held out by position) or tasks.py's mix."""
    if cfg.data_file:
        examples = read_conversations(cfg.data_file)
        n_valid = max(1, len(examples) // 50)
        return examples[n_valid:], examples[:n_valid]
    unknown = sorted(set(cfg.only_tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"--only-tasks {unknown}: not tasks of tasks.py ({', '.join(TASKS)})")
    mix = parse_mix(cfg.mix)
    if cfg.only_tasks:
        mix = {t: (-1 if t in cfg.only_tasks and n == 0 else n) if t in cfg.only_tasks else 0 for t, n in mix.items()}
    train = build_examples("train", mix, cfg.seed)
    valid = build_examples("test", {t: -1 if not cfg.only_tasks or t in cfg.only_tasks else 0 for t in TASKS},
                           cfg.seed)[:cfg.eval_examples]
    return train, valid


# ---------------------------------------------------------------------------------------------------
# The loop (train_sft.py, train_lora.py, peft_zoo.py)
# ---------------------------------------------------------------------------------------------------

def finetune(model: MiniMindForCausalLM, tok, cfg, params: list[torch.nn.Parameter], device,
             save_final: Callable[[Path], None]) -> dict:
    """Train ``params`` of ``model`` on cfg's conversations; checkpoints, --resume, metrics.jsonl, loss.png.
    ``save_final(dir)`` writes the result (a whole model for SFT, an adapter for LoRA)."""
    dtype = pick_dtype(cfg.dtype, device)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    resume_from = resume_point(ckpt_root, cfg.resume)
    max_len = cfg.max_len or model.config.max_position_embeddings
    t0 = time.perf_counter()
    train_ex, valid_ex = load_conversations(cfg)
    train, valid = SFTData(tok, train_ex, max_len), SFTData(tok, valid_ex, max_len)
    n_answer = sum(sum(t != -100 for t in r[1]) for r in train.rows)
    n_all = sum(len(r[0]) for r in train.rows)
    steps_per_epoch = len(train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train)} conversations are fewer than one batch of {cfg.batch_size}")
    n_train = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    print(f"data: {len(train)} train / {len(valid)} held-out conversations, {n_all / 1e6:.2f} M tokens of which "
          f"{n_answer / n_all:.0%} are learned (assistant) | {steps_per_epoch} steps per epoch | "
          f"trainable {n_train / 1e6:.3f} M of {n_total / 1e6:.2f} M parameters ({n_train / n_total:.2%}) | "
          f"{device} {dtype} | data {time.perf_counter() - t0:.0f} s", flush=True)

    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler, start, logger = resume_or_start(model, optimizer, cfg, out, resume_from, device, cfg.min_lr_ratio)
    if start == 0:
        vl = evaluate(model, valid, cfg.batch_size, device, dtype)
        logger.log({"step": 0, "valid_loss": vl})
        logger.write(f"step 0/{cfg.max_iters} | held-out assistant loss {vl:.3f}")
    first_valid = vl if start == 0 else None
    model.train()
    step, losses, step_times, t_start = start, [], [], time.perf_counter()
    while step < cfg.max_iters:
        epoch, b = divmod(step, steps_per_epoch)
        for x, y in train.batches(cfg.batch_size, cfg.seed, epoch, start=b):
            t_step = time.perf_counter()
            with autocast(device, dtype):
                loss, _ = assistant_loss(model, x.to(device), y.to(device))
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr or check the data")
            loss.backward()
            clip_grad(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            losses.append(loss.item())
            step_times.append(time.perf_counter() - t_step)
            logger.step(step, loss.item(), scheduler.get_last_lr()[0], x.numel(), epoch=epoch)
            if step % cfg.eval_every == 0 or step == cfg.max_iters:
                vl = evaluate(model, valid, cfg.batch_size, device, dtype)
                logger.log({"step": step, "valid_loss": vl})
                logger.write(f"step {step}/{cfg.max_iters} | held-out assistant loss {vl:.3f}")
            if step % cfg.save_every == 0 or step == cfg.max_iters:
                save_checkpoint(ckpt_root, step, model, model.config.to_dict(), optimizer, scheduler,
                                keep=cfg.keep_checkpoints)
            if step >= cfg.max_iters:
                break
    wall = time.perf_counter() - t_start
    if start >= cfg.max_iters:  # resumed a finished run: nothing trained, score what is there
        vl = evaluate(model, valid, cfg.batch_size, device, dtype)
    final_dir = out / "final"
    save_final(final_dir)
    summary = {"steps": step, "train_wall_s": wall, "valid_loss": vl, "initial_valid_loss": first_valid,
               "trainable_params": n_train, "total_params": n_total, "train_conversations": len(train),
               "step_s_median": sorted(step_times)[len(step_times) // 2] if step_times else None}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.write(f"done: {step} steps in {wall:.0f} s | held-out assistant loss {vl:.3f} | {final_dir}")
    logger.close()
    return {"losses": losses, "summary": summary, "out_dir": out, "final_dir": final_dir}


@torch.no_grad()
def answer(model: MiniMindForCausalLM, tok, messages: list[dict], max_new_tokens: int) -> str:
    """Greedy reply to a conversation, decoded up to the end-of-turn token."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = ids[-max(1, model.config.max_position_embeddings - max_new_tokens):]  # the end, leaving room
    device = model.lm_head.weight.device
    out = []
    for t in engine.generate(model, torch.tensor([ids], device=device), max_new_tokens, eos_token_id=tok.eos_token_id):
        if int(t) == tok.eos_token_id:
            break
        out.append(int(t))
    return tok.decode(out, skip_special_tokens=True)
