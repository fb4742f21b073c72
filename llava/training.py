"""What the two stages share: the config, building the model, the loop, the evaluation, and the saved format.

A stage trains some parameters and freezes the rest: stage 1 the projector, stage 2 the projector and the
language model (all of it, or LoRA adapters on a full-precision or 4-bit base). Checkpoints and final/ hold
the trained parameters only (``trainable.safetensors``) and ``llava.json``, which names the vision and language
directories they sit on, as LLaVA's own checkpoints name their base LLM; ``load_trained`` rebuilds the model.
"""

from __future__ import annotations

import collections
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from common.checkpoint import atomic_write_text, model_state, resume_or_start, resume_point, save_checkpoint
from common.data import evenly_spaced, subset_note
from common.distributed import all_reduce_mean, cleanup, init_distributed, wrap
from common.errors import UserError
from common.results import command_line, make_record
from common.runtime import autocast, pick_device, pick_dtype, seed_everything, set_threads
from common.schedule import clip_grad

from .dataset import (
    SYSTEM_PROMPT,
    Example,
    easy_vqa_questions,
    encode,
    encode_prompt,
    load_images,
    pad_left,
    pad_right,
    pixel_values,
    prior_answers,
    question_prior,
    read_image,
    score,
)
from .loading import build, check_dir, smollm2_dir
from .model import IGNORE_INDEX, LlavaConfig, LlavaModel


@dataclass
class StageConfig:
    """What both stages take (each stage script sets its own defaults)."""

    # the CPU default: 2x2-pooled patches (16) behind the CLS token kept whole: the small tower's CLS reads the
    # shape a linear probe gets 98 % right, its pooled patches 92 % (README: where the shape is)
    model: LlavaConfig = field(default_factory=lambda: LlavaConfig(pool=2, vision_feature_select_strategy="full"))
    vision: str = "runs/clip/hf"  # a CLIP directory: the clip chapter's export (python -m clip.export_hf)
    llm: str = ""  # a transformers causal-LM directory ("" = SmolLM2-135M-Instruct, fetched from PyPI)
    data_file: str = ""  # your own conversations (LLaVA's JSONL); "" = easy-VQA
    valid_file: str = ""  # held-out conversations scored by exact match (required with --data-file)
    system_prompt: str = SYSTEM_PROMPT  # the chat's system line ("" = the template's own)
    blind: bool = False  # the control: every picture replaced by a blank one, in training and evaluation
    balance_answers: bool = False  # draw each (question, answer) pair equally often: "is there a red shape?" is
    # "no" for 7 pictures in 8, and a model trained on that learns to answer without looking (README)
    pack_questions: bool = False  # each picture once with all its conversations, each seeing the picture and
    # none of the others (pack_questions); --batch-size then counts pictures
    batch_size: int = 8  # conversations per optimizer step (summed over ranks); pictures with --pack-questions
    max_iters: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_iters: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_examples: int = 1000  # held-out questions scored at each evaluation (evenly spread; 0 = all)
    eval_batch_size: int = 32  # prompts decoded together
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast on GPUs and on CPUs with native bf16 (AVX512-BF16, AMX), else fp32
    threads: int = 0
    distributed: str = "ddp"  # ddp or fsdp, under torchrun / accelerate launch
    deepspeed: str = ""  # a DeepSpeed JSON config (llava/ds_zero2.json, ds_zero3.json): ZeRO instead of ddp/fsdp
    seed: int = 1234
    eval_first: bool = False  # also score the held-out questions before training
    eval_final: bool = True  # score them after training (infer.py --eval scores a saved stage the same way)
    eval_every: int = 100_000  # steps between held-out evaluations (one runs at the end anyway)
    save_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    out_dir: str = "runs/llava/stage"
    resume: bool = False
    run_name: str = ""  # names the records in doc/results.json


class Trainable(nn.Module):
    """The parameters a stage trains, under their names in the model ('.' written '__'): what the optimizer
    steps and what a checkpoint holds (the frozen tower and base weights are never copied to disk)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.params = nn.ParameterDict({n.replace(".", "__"): p for n, p in model.named_parameters()
                                        if p.requires_grad})

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.params.values())


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Split:
    """Examples and the pictures they point into: (N, 3, S, S) normalised, or blank ones for the control."""

    examples: list[Example]
    pixels: torch.Tensor

    def pictures(self, idx: list[int], blind: bool) -> torch.Tensor:
        rows = self.pixels[[self.examples[i].image for i in idx]]
        return torch.zeros_like(rows) if blind else rows  # zeros: the mean colour after normalisation


def easy_vqa_split(name: str, examples: list[Example], processor) -> Split:
    return Split(examples, pixel_values(load_images(name), processor))


def own_split(examples: list[Example], processor, path: str) -> Split:
    """Your conversations: the pictures read once (a file that is not a picture is named), indices set."""
    files = sorted({e.image for e in examples})
    where = {f: i for i, f in enumerate(files)}
    pixels = pixel_values([read_image(f, f"{path}: {f}") for f in files], processor)
    return Split([replace(e, image=where[e.image]) for e in examples], pixels)


def load_splits(cfg: StageConfig, own: tuple[list[Example], list[Example]] | None, processor, train_examples
                ) -> tuple[Split, Split]:
    """(train, held-out): your conversations (read before the model was loaded, so a bad row fails fast) with
    their pictures, or easy-VQA's ``train_examples()`` on the training pictures and its test questions."""
    if own:
        return own_split(own[0], processor, cfg.data_file), own_split(own[1], processor, cfg.valid_file)
    return (easy_vqa_split("train", train_examples(), processor),
            easy_vqa_split("test", easy_vqa_questions("test"), processor))


def epoch_order(n: int, seed: int, epoch: int, weights: list[float] | None = None) -> list[int]:
    """The order of one epoch: a function of (seed, epoch) only, so --resume sees the same batches. Without
    weights a shuffle; with them n draws with replacement, each example in proportion to its weight."""
    rng = random.Random(seed * 1000 + epoch)
    if weights is not None:
        return rng.choices(range(n), weights=weights, k=n)
    order = list(range(n))
    rng.shuffle(order)
    return order


def answer_balance(examples: list[Example]) -> list[float]:
    """Weights that make every (question, answer) pair of the first turn equally likely: 1 / its count. Each yes/no
    question is then answered yes and no equally often, so its wording alone predicts nothing."""
    counts = collections.Counter((e.turns[0][0], e.turns[0][1]) for e in examples)
    return [1.0 / counts[(e.turns[0][0], e.turns[0][1])] for e in examples]


def encode_all(tok, examples: list[Example], n_image: int, system: str, max_len: int) -> list[tuple[list, list]]:
    """Each conversation's (input_ids, labels); one longer than the context is an error."""
    rows = [encode(tok, e.turns, n_image, system) for e in examples]
    for e, (ids, _) in zip(examples, rows):
        if len(ids) > max_len:
            raise UserError(f"a conversation about picture {e.image} is {len(ids)} tokens with its {n_image} visual "
                            f"words; the language model's context is {max_len}. Shorten it")
    return rows


def collate(tok, examples: list[Example], n_image: int, system: str, max_len: int):
    """(input_ids, attention_mask, labels), right-padded; a conversation longer than the context is an error."""
    rows = encode_all(tok, examples, n_image, system, max_len)
    ids = pad_right([r[0] for r in rows], tok.pad_token_id)
    labels = pad_right([r[1] for r in rows], IGNORE_INDEX)
    mask = pad_right([[1] * len(r[0]) for r in rows], 0)
    return ids, mask, labels


def picture_groups(examples: list[Example]) -> list[list[int]]:
    """The examples' indices grouped by picture, in order of first appearance (what pack_questions packs)."""
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.image, []).append(i)
    return list(groups.values())


def pack_questions(tok, groups: list[list[Example]], n_image: int, system: str, max_len: int, image_token_id: int):
    """One row per picture: what its conversations share (the system line, the visual words) once, then each
    conversation's own tokens. Each token attends to the shared prefix and to the earlier tokens of its own
    conversation only, and its position is the one it has in its conversation alone, so every conversation is
    scored exactly as ``collate`` scores it on a row of its own (tests/test_llava.py), while the prefix and the
    picture run once. Returns (input_ids, a boolean (B, 1, T, T) attention mask, labels, position_ids, the
    number of real tokens)."""
    rows, labels, positions, segments = [], [], [], []
    for group in groups:
        enc = encode_all(tok, group, n_image, system, max_len)
        # the common prefix stops before each conversation's first labelled token: its own part must start with
        # an unlabelled token, since the token before it in the row belongs to another conversation
        p = min(next((k for k, x in enumerate(lab) if x != IGNORE_INDEX), len(ids)) for ids, lab in enc) - 1
        for ids, _ in enc[1:]:
            p = next((k for k in range(p) if ids[k] != enc[0][0][k]), p)
        if enc[0][0][:p].count(image_token_id) != n_image:
            raise UserError(f"the conversations about picture {group[0].image} do not share their visual words at "
                            "the start; --no-pack-questions trains them one per row")
        row, lab, pos, seg = list(enc[0][0][:p]), [IGNORE_INDEX] * p, list(range(p)), [0] * p
        for k, (ids, lab_) in enumerate(enc, 1):
            row += ids[p:]
            lab += lab_[p:]
            pos += range(p, len(ids))
            seg += [k] * (len(ids) - p)  # 0 is the prefix, k the k-th conversation
        rows.append(row)
        labels.append(lab)
        positions.append(pos)
        segments.append(seg)
    ids = pad_right(rows, tok.pad_token_id)
    seg = pad_right(segments, -1)  # padding: a segment of its own, which attends to the prefix (no empty row)
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    allowed = causal & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))  # (B, T query, T key)
    return (ids, allowed[:, None], pad_right(labels, IGNORE_INDEX), pad_right(positions, 0),
            int((seg >= 0).sum()))


# ---------------------------------------------------------------------------------------------------------
# Evaluation: greedy answers to held-out questions, exact match per question type
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def answer(model: LlavaModel, tok, prompts: list[str], pixels: torch.Tensor, system: str,
           max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to one question per picture (a batch: prompts left-padded)."""
    ids, mask = pad_left([encode_prompt(tok, q, model.num_image_tokens(), system) for q in prompts],
                         tok.pad_token_id)
    dev = model.multi_modal_projector.linear_1.weight.device if hasattr(model, "multi_modal_projector") else "cpu"
    out = model.generate(ids.to(dev), mask.to(dev), pixels.to(dev), max_new_tokens, eos_token_id=end_of_turn(tok))
    return [tok.decode(o, skip_special_tokens=True).strip() for o in out]


def end_of_turn(tok) -> int:
    """The token the chat template closes a turn with (<|im_end|> for SmolLM2), else eos."""
    for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        if t in tok.get_vocab():
            return tok.convert_tokens_to_ids(t)
    return tok.eos_token_id


def evaluate(model: LlavaModel, tok, split: Split, k: int, system: str, blind: bool, batch: int = 32,
             max_new_tokens: int = 5, prior: dict[str, str] | None = None, dtype: torch.dtype = torch.float32
             ) -> dict:
    """Exact match on ``k`` evenly spread held-out questions (all when k is 0): overall and per type. Every
    easy-VQA answer is at most 3 tokens and its end of turn: a longer reply is wrong whatever follows, so
    decoding stops at ``max_new_tokens``."""
    was = model.training
    model.eval()
    idx = evenly_spaced(len(split.examples), k)
    preds = []
    for s in range(0, len(idx), batch):
        chunk = idx[s:s + batch]
        with autocast(next(model.parameters()).device, dtype):
            preds += answer(model, tok, [split.examples[i].turns[0][0] for i in chunk],
                            split.pictures(chunk, blind), system, max_new_tokens=max_new_tokens)
    model.train(was)
    res = score(preds, [split.examples[i] for i in idx], prior)
    res = {f"exact_match_{k_.replace('/', '_').replace(' ', '_')}": v for k_, v in res.items()}
    line = " | ".join(f"{k_[12:]} {100 * v:.1f} %" for k_, v in res.items())
    return {**res, "n": len(idx), "line": f"exact match {subset_note(len(idx), len(split.examples), 'questions')}: "
            f"{line}", "examples": [(split.examples[i].turns[0][0], p) for i, p in zip(idx[:5], preds[:5])]}


# ---------------------------------------------------------------------------------------------------------
# Saving and loading a trained stage
# ---------------------------------------------------------------------------------------------------------

def stage_meta(cfg: StageConfig, model: LlavaModel, extra: dict) -> dict:
    return {"llava": asdict(model.config), "vision": cfg.vision, "llm": cfg.llm or str(smollm2_dir()),
            "system_prompt": cfg.system_prompt, **extra}


def save_final(out: Path, trainable: Trainable, meta: dict, state: dict | None = None) -> Path:
    from common.checkpoint import save_pretrained

    final = out / "final"
    save_pretrained(trainable, meta, final, state=state)
    atomic_write_text(final / "llava.json", json.dumps(meta, indent=2) + "\n")
    return final


def read_meta(path: str | Path, flag: str = "--ckpt") -> dict:
    p = Path(path) / "llava.json"
    if not p.is_file():
        raise UserError(f"{flag} {path}: no llava.json there; expected a final/ directory of train_stage1.py or "
                        "train_stage2.py")
    return json.loads(p.read_text())


def load_trainable(model: nn.Module, path: str | Path, only_prefix: str = "") -> int:
    """Copy a saved stage's parameters into ``model`` by name; ``only_prefix`` keeps those under it (stage 2
    starting from stage 1's projector). Returns how many tensors were loaded."""
    from safetensors.torch import load_file

    state = {k.replace("params.", "", 1).replace("__", "."): v
             for k, v in load_file(str(Path(path) / "model.safetensors")).items()}
    if only_prefix:
        state = {k: v for k, v in state.items() if k.startswith(only_prefix)}
    own = dict(model.named_parameters())
    missing = [k for k in state if k not in own]
    if missing:
        raise UserError(f"{path}: holds {missing[0]}, which this model has not (another --projector-type or "
                        "--mode?)")
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise UserError(f"{path}: {k} is {tuple(v.shape)} there, {tuple(own[k].shape)} here (another "
                                "vision tower or language model?)")
            own[k].copy_(v)
    return len(state)


def add_lora(model: LlavaModel, r: int, alpha: int, dropout: float) -> None:
    """peft LoRA adapters on every linear layer of the language model (attention and MLP; not lm_head)."""
    from peft import LoraConfig, get_peft_model

    model.language_model = get_peft_model(model.language_model, LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"))


def load_trained(path: str | Path, bits: int | None = None, device: str = "cpu"):
    """(LlavaModel, tokenizer, image processor, meta) rebuilt from a final/ (or checkpoint) directory: the
    named vision and language directories, LoRA when the stage used it, then the trained parameters. ``bits``
    overrides the base's quantization (0 for a full-precision base, as the export needs)."""
    meta = read_meta(path)
    bits = meta.get("bits", 0) if bits is None else bits
    model, tok, processor = build(meta["vision"], meta["llm"], LlavaConfig(**meta["llava"]), bits)
    if meta.get("mode") in ("lora", "qlora"):
        add_lora(model, meta["lora_r"], meta["lora_alpha"], 0.0)
    load_trainable(model, path)
    return model.to(device).eval(), tok, processor, meta


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------

def run(cfg: StageConfig, model: LlavaModel, tok, train: Split, valid: Split, stage: str, meta_extra: dict,
        run_name: str, dist_info=None) -> dict:
    """Train ``model``'s trainable parameters on ``train``; evaluate on ``valid`` after (and before: --eval-first);
    write checkpoints, final/, metrics.jsonl, loss.png, train_summary.json and results.json."""
    dist_info = dist_info or init_distributed("cpu")
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device, cpu_bf16=True)  # the weights stay fp32; autocast runs the matmuls
    if dist_info.is_main:
        print(f"{device} | {'fp32' if dtype == torch.float32 else str(dtype)[6:] + ' autocast'}", flush=True)
    out = Path(cfg.out_dir)
    engine = None
    model.to(device)
    if not cfg.deepspeed:
        net = wrap(model, dist_info, cfg.distributed, ())  # FSDP2 swaps the parameters for shards: wrap first
    trainable = Trainable(model)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    decay = [p for n, p in trainable.params.items() if p.ndim >= 2]
    no_decay = [p for n, p in trainable.params.items() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))
    if cfg.deepspeed:  # ZeRO: DeepSpeed's engine shards AdamW's state (stage 2) and the parameters too (3)
        net = engine = deepspeed_engine(cfg, model, optimizer, dist_info)
    resume_from = resume_point(out / "checkpoints", cfg.resume, dist_info.is_main)
    scheduler, start, logger = resume_or_start(trainable, optimizer, cfg, out, resume_from, device,
                                               cfg.min_lr_ratio, is_main=dist_info.is_main)
    n_image = model.num_image_tokens()
    max_len = getattr(model.language_model.config, "max_position_embeddings", 8192)
    meta = stage_meta(cfg, model, meta_extra)
    prior = prior_answers(train.examples)  # scores the held-out questions the wording alone would get wrong
    first = None
    if start == 0 and dist_info.is_main and cfg.eval_first:
        first = evaluate(model, tok, valid, cfg.eval_examples, cfg.system_prompt, cfg.blind, cfg.eval_batch_size,
                         prior=prior, dtype=dtype)
        logger.write(f"step 0 | {first['line']}")
    local_bs = cfg.batch_size // dist_info.world_size
    groups = picture_groups(train.examples) if cfg.pack_questions else None
    n_items = len(groups) if groups else len(train.examples)  # what a step draws: pictures or conversations
    steps_per_epoch = max(1, n_items // cfg.batch_size)
    weights = answer_balance(train.examples) if cfg.balance_answers else None
    model.train()
    model.vision_tower.eval()  # frozen: no dropout, whatever the mode
    t0 = time.perf_counter()
    for step in range(start, cfg.max_iters):
        epoch, pos = divmod(step, steps_per_epoch)
        order = epoch_order(n_items, cfg.seed, epoch, weights)
        batch = order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
        mine = batch[dist_info.rank * local_bs:(dist_info.rank + 1) * local_bs]  # this rank's share
        if groups:  # one row per picture, all its conversations
            ids, mask, labels, positions, n_tokens = pack_questions(
                tok, [[train.examples[i] for i in groups[g]] for g in mine], n_image, cfg.system_prompt, max_len,
                model.config.image_token_id)
            pictures = train.pictures([groups[g][0] for g in mine], cfg.blind)
        else:
            ids, mask, labels = collate(tok, [train.examples[i] for i in mine], n_image, cfg.system_prompt, max_len)
            positions, n_tokens, pictures = None, int(mask.sum()), train.pictures(mine, cfg.blind)
        with autocast(device, dtype):
            loss = net(ids.to(device), pictures.to(device), mask.to(device), labels.to(device),
                       position_ids=None if positions is None else positions.to(device))["loss"]
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
        # the loss of the global batch is the mean over all its answer tokens: weigh this rank's mean by its
        # share of them (the ranks' answers differ in length), times the ranks DDP's gradient average divides by
        n_local = int((labels[:, 1:] != IGNORE_INDEX).sum())
        n_global = all_reduce_sum(n_local, dist_info)
        weighted = loss * (n_local * dist_info.world_size / n_global)
        loss = torch.tensor(all_reduce_mean(loss.item() * n_local, dist_info) * dist_info.world_size / n_global)
        if engine is not None:  # the engine averages gradients over the ranks, clips and steps (its JSON)
            engine.backward(weighted)
            engine.step()
        else:
            scaler.scale(weighted).backward()
            scaler.unscale_(optimizer)
            clip_grad(trainable.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        done = step + 1
        logger.step(done, loss.item(), scheduler.get_last_lr()[0], n_tokens * dist_info.world_size)
        if done % cfg.eval_every == 0 and done < cfg.max_iters and full_weights(net, dist_info):
            ev = evaluate(model, tok, valid, cfg.eval_examples, cfg.system_prompt, cfg.blind, cfg.eval_batch_size,
                          prior=prior, dtype=dtype)
            logger.log({"step": done, **{k: v for k, v in ev.items() if k.startswith("exact_match")}})
            logger.write(f"step {done}/{cfg.max_iters} | {ev['line']}")
        if cfg.distributed == "fsdp" and dist_info.enabled:
            net.reshard()
        if (done % cfg.save_every == 0 or done == cfg.max_iters) and engine is None:
            save_checkpoint(out / "checkpoints", done, trainable, meta, optimizer, scheduler,
                            keep=cfg.keep_checkpoints, is_main=dist_info.is_main)
            if dist_info.is_main:
                atomic_write_text(out / "checkpoints" / f"step_{done:06d}" / "llava.json", json.dumps(meta) + "\n")
    wall = time.perf_counter() - t0
    result = {"trainable": trainable}
    zero3 = any(hasattr(p, "ds_id") for p in trainable.parameters())  # ZeRO-3: each rank holds slices
    # the trained weights, gathered where they are sharded: a collective under FSDP2 and ZeRO-3, every rank
    state = zero3_state(trainable) if zero3 else model_state(trainable)
    # under ZeRO-3 every layer gathers its weights as it runs: every rank decodes alongside rank 0
    if zero3 and not dist_info.is_main and cfg.eval_final:
        evaluate(model, tok, valid, cfg.eval_examples, cfg.system_prompt, cfg.blind, cfg.eval_batch_size,
                 prior=prior, dtype=dtype)
    if full_weights(net, dist_info):
        final = {"line": "no held-out evaluation (--no-eval-final)", "examples": []}
        if cfg.eval_final:
            final = evaluate(model, tok, valid, cfg.eval_examples, cfg.system_prompt, cfg.blind, cfg.eval_batch_size,
                             prior=prior, dtype=dtype)
            logger.log({"step": cfg.max_iters, **{k: v for k, v in final.items() if k.startswith("exact_match")}})
        final_dir = save_final(out, trainable, meta, state)
        summary = {"steps": cfg.max_iters, "train_wall_s": wall, "s_per_step": wall / max(1, cfg.max_iters - start),
                   "trainable_params": trainable.num_parameters(), "initial": first, "final": final,
                   "peak_rss_mb": peak_rss_mb(), **meta_extra}
        atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2) + "\n")
        cmd = command_line(f"llava.train_{stage}")
        # the baseline beside each figure: the question-prior ceiling on the same held-out questions (what a model
        # that reads the question and not the picture can reach)
        subset = [valid.examples[i] for i in evenly_spaced(len(valid.examples), cfg.eval_examples)]
        prior = {f"exact_match_{k.replace('/', '_')}": v for k, v in question_prior(train.examples, subset).items()}
        records = [make_record("llava", run_name, k, v, "question_prior", prior.get(k), wall, cmd)
                   for k, v in final.items() if k.startswith("exact_match")]
        atomic_write_text(out / "results.json", json.dumps(records, indent=2) + "\n")
        logger.write(f"done: {cfg.max_iters} steps in {wall:.0f} s | {final['line']} | {final_dir}")
        for q, a in final["examples"]:
            logger.write(f"  {q} -> {a}")
        result.update(summary=summary, final_dir=final_dir)
    logger.close()
    cleanup()
    return result


def deepspeed_engine(cfg: StageConfig, model: LlavaModel, optimizer: torch.optim.Optimizer, dist_info):
    """DeepSpeed's engine over ``model`` and our AdamW (whose learning rate our schedule keeps setting), this
    rank's micro-batch and the JSON's ZeRO stage. DeepSpeed joins the process group itself (launched by torchrun,
    accelerate or its own ``deepspeed`` launcher); on a machine without GPUs it runs on the CPU over gloo."""
    try:
        import deepspeed
    except ImportError:
        raise UserError("--deepspeed: the deepspeed package is not installed (pip install deepspeed; it trains "
                        "on CUDA GPUs, and on CPUs through its gloo backend)") from None
    path = Path(cfg.deepspeed)
    if not path.is_file():
        raise UserError(f"--deepspeed {cfg.deepspeed}: no such file; expected a DeepSpeed JSON config such as "
                        "llava/ds_zero2.json")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if cfg.resume:
        raise UserError("--resume with --deepspeed: this chapter's checkpoints are written by common/checkpoint.py, "
                        "which the ZeRO path does not use; train to the end or drop --deepspeed")
    ds.update(train_micro_batch_size_per_gpu=cfg.batch_size // dist_info.world_size, gradient_accumulation_steps=1,
              gradient_clipping=cfg.grad_clip)
    for key in ("train_batch_size", "optimizer", "scheduler"):  # ours: the batch split, AdamW, the schedule
        ds.pop(key, None)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine


def zero3_state(trainable: Trainable) -> dict[str, torch.Tensor]:
    """The full tensors of ZeRO-3-partitioned parameters, gathered on every rank (a collective), under the
    names ``save_pretrained`` writes."""
    import deepspeed

    params = dict(trainable.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {k: v.detach().clone().contiguous() for k, v in params.items()}


def all_reduce_sum(value: int, dist_info) -> int:
    """The sum of a python int over the ranks."""
    if not dist_info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.long)
    torch.distributed.all_reduce(t)
    return int(t.item())


def full_weights(net: nn.Module, dist_info) -> bool:
    """Whether this rank should evaluate: rank 0. Under FSDP2 every rank first gathers the full weights (a
    collective: all ranks call this), so that generate, which is not the sharded forward, reads them."""
    if dist_info.enabled and hasattr(net, "unshard"):
        net.unshard()
    return dist_info.is_main


def peak_rss_mb() -> float:
    """The process's peak resident memory (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(cfg: StageConfig):
    """Threads, seed, the process group; returns DistInfo. A batch that does not split over the ranks is an
    error before any model is loaded."""
    dist_info = init_distributed(pick_device(cfg.device).type)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    if cfg.dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"--dtype {cfg.dtype}: expected auto, fp32, bf16 or fp16")
    if cfg.pack_questions and cfg.balance_answers:
        raise UserError("--pack-questions with --balance-answers: a packed row holds every question about its "
                        "picture once, so the answers cannot be drawn by weight; choose one")
    if cfg.batch_size % dist_info.world_size:
        raise UserError(f"--batch-size {cfg.batch_size}: expected a multiple of the {dist_info.world_size} processes")
    if cfg.model.anyres:
        raise UserError("--anyres: the stages feed one view per picture (easy-VQA's pictures are the tower's size); "
                        "the anyres path is model.py's LlavaModel.anyres_features, tested against LLaVA-NeXT but not "
                        "trained by these scripts")
    if cfg.data_file and not cfg.valid_file:
        raise UserError("--data-file needs --valid-file: held-out conversations to score")
    check_dir(cfg.vision, "--vision", "a CLIP directory (the clip chapter's `python -m clip.export_hf` writes "
                                      "runs/clip/hf)")
    if cfg.llm:
        check_dir(cfg.llm, "--llm", "a transformers causal-LM directory (Llama family)")
    return dist_info
