"""Masked-LM pretraining (BERT paper, sec. 3.1, "Task #1"), optionally with next-sentence prediction.

    python -m bert_address_cls.train_mlm                 # cpu preset: minutes on 2 cores
    python -m bert_address_cls.train_mlm --nsp           # + next-sentence prediction (Task #2)
    python -m bert_address_cls.train_mlm --preset gpu4gb # BERT-base widths, 6 layers, on one 4 GB GPU

15 % of the tokens are chosen; of those, 80 % become [MASK], 10 % a random token, 10 % stay as they are,
and the model must name the original token at every chosen position. The random and unchanged 10 %s
stop the model from learning that only [MASK] positions matter: at fine-tuning time there is no [MASK].
Text: news and People's Daily sentences plus generated training addresses (so the encoder has seen
place-name characters in place-name contexts before it is asked to tag them).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch

from common.checkpoint import resume_or_start, resume_point, save_checkpoint, save_pretrained
from common.cli import run_main
from common.data import evenly_spaced, subset_note
from common.results import command_line, make_record
from common.runtime import autocast, pick_device, pick_dtype, seed_everything, set_threads
from common.schedule import clip_grad

from .dataset import SPECIALS, build_split, corpus_documents
from .model import MODEL_PRESETS, BertConfig, BertForPreTraining
from .training import decay_groups, epoch_order, load_or_train_tokenizer


@dataclass
class MLMConfig:
    """Pretrain a small BERT with masked-LM (and optionally next-sentence prediction)."""

    # the cpu preset's model. vocab_size: the WordPiece vocabulary (characters) trained if tokenizer_dir has
    # none, then the tokenizer's real size; max_position_embeddings grows to max_len if it is shorter
    model: BertConfig = field(default_factory=lambda: BertConfig(**MODEL_PRESETS["cpu"], vocab_size=8000))
    max_len: int = 64  # tokens per example, [CLS] and [SEP] included
    # data
    tokenizer_dir: str = "runs/bert_address_cls/tokenizer"
    text_file: str = ""  # real-data path: JSONL with a "text" field per line (one document each); replaces the corpus
    n_addresses: int = 40000  # generated training addresses mixed into the text
    mask_prob: float = 0.15  # share of tokens chosen for prediction
    nsp: bool = False  # also train next-sentence prediction on sentence pairs
    # optimisation
    batch_size: int = 64
    max_iters: int = 800  # optimizer steps
    lr: float = 1e-3  # peak learning rate (small BERTs take large rates)
    warmup_iters: int = 80
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # runtime
    dtype: str = "auto"  # auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16, fp16
    device: str = "auto"
    threads: int = 0  # CPU threads (0 = torch's default)
    seed: int = 1234
    eval_every: int = 200
    eval_batches: int = 16  # valid batches per evaluation during training, evenly spaced (0: all); the final: all
    save_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 25
    out_dir: str = "runs/bert_address_cls/mlm"  # checkpoints, metrics.jsonl, loss.png, final/
    resume: bool = False
    run_name: str = "mlm_cpu"

    # old flag -> field, kept for one release
    RENAMED: ClassVar[dict[str, str]] = {"dim": "hidden_size", "n_layer": "num_hidden_layers",
                                         "n_head": "num_attention_heads", "ffn_dim": "intermediate_size",
                                         "dropout": "hidden_dropout_prob"}


PRESETS = {
    "cpu": {},
    "gpu4gb": {**MODEL_PRESETS["gpu4gb"], "max_len": 128, "batch_size": 64, "max_iters": 20000, "lr": 3e-4,
               "warmup_iters": 1000, "n_addresses": 200000, "eval_every": 1000, "save_every": 1000},
    "full": {**MODEL_PRESETS["full"], "max_len": 128, "batch_size": 128, "max_iters": 100000, "lr": 1e-4,
             "warmup_iters": 10000, "n_addresses": 500000, "eval_every": 5000, "save_every": 5000},
}


# ---------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------

def mask_tokens(ids: torch.Tensor, special: torch.Tensor, vocab_size: int, mask_id: int,
                generator: torch.Generator, prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption. ids (B, T); special (B, T) True on [CLS]/[SEP]/[PAD] (never chosen).
    Returns (inputs, labels): labels hold the original id at chosen positions and -100 elsewhere."""
    # 1) choose 15 % of the ordinary tokens
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & ~special
    if not chosen.any():  # a tiny batch could choose nothing; the loss needs one target
        chosen.view(-1)[(~special).view(-1).nonzero()[0]] = True
    labels = ids.masked_fill(~chosen, -100)
    # 2) of the chosen: 80 % -> [MASK], 10 % -> a random ordinary token, 10 % unchanged
    r = torch.rand(ids.shape, generator=generator)
    inputs = ids.masked_fill(chosen & (r < 0.8), mask_id)
    swap = chosen & (r >= 0.8) & (r < 0.9)
    inputs[swap] = torch.randint(len(SPECIALS), vocab_size, (int(swap.sum()),), generator=generator)
    return inputs, labels


# ---------------------------------------------------------------------------------------------------
# Data: tokenised once; examples are single sentences/addresses, or sentence pairs for NSP
# ---------------------------------------------------------------------------------------------------

class MLMData:
    """Token id lists per sentence, grouped by document (NSP needs to know which sentence follows which)."""

    def __init__(self, tok, documents: list[list[str]], max_len: int):
        self.tok, self.max_len = tok, max_len
        flat = [s for d in documents for s in d]
        ids = tok(flat, add_special_tokens=False)["input_ids"] if flat else []
        self.docs, i = [], 0
        for d in documents:
            self.docs.append([x[: max_len - 2] for x in ids[i: i + len(d)]])
            i += len(d)
        self.items = [(di, si) for di, d in enumerate(self.docs) for si in range(len(d)) if d[si]]

    def __len__(self) -> int:
        return len(self.items)

    def example(self, k: int, nsp: bool, rng: random.Random) -> tuple[list[int], list[int], int]:
        """(ids with [CLS]/[SEP], token types, NSP label: 0 = B follows A, 1 = B is random, -1 = no pair)."""
        cls_id, sep_id = self.tok.cls_token_id, self.tok.sep_token_id
        di, si = self.items[k]
        a = self.docs[di][si]
        if not nsp:
            return [cls_id, *a, sep_id], [0] * (len(a) + 2), -1
        half = (self.max_len - 3) // 2
        if si + 1 < len(self.docs[di]) and rng.random() < 0.5:
            b, label = self.docs[di][si + 1], 0
        else:
            dj, sj = self.items[rng.randrange(len(self.items))]
            b, label = self.docs[dj][sj], 1
        a, b = a[:half], b[: self.max_len - 3 - min(len(a), half)]
        return [cls_id, *a, sep_id, *b, sep_id], [0] * (len(a) + 2) + [1] * (len(b) + 1), label

    def batch(self, indices: list[int], nsp: bool, rng: random.Random):
        rows = [self.example(k, nsp, rng) for k in indices]
        T = max(len(r[0]) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)  # [PAD] = 0
        types = torch.zeros(len(rows), T, dtype=torch.long)
        for i, (x, t, _) in enumerate(rows):
            ids[i, : len(x)], types[i, : len(t)] = torch.tensor(x), torch.tensor(t)
        return ids, types, torch.tensor([r[2] for r in rows])


def load_documents(cfg: MLMConfig) -> tuple[list[list[str]], list[list[str]]]:
    """(train, valid) documents: corpus documents split 98/2 by md5, plus the generated addresses (each
    its own one-sentence document) of the train and valid splits."""
    if cfg.text_file:
        from common.data import iter_jsonl

        docs = [[row["text"][i: i + cfg.max_len - 2] for i in range(0, len(row["text"]), cfg.max_len - 2)]
                for row in iter_jsonl(cfg.text_file, required={"text": str}) if row["text"]]
    else:
        docs = corpus_documents(cfg.max_len - 2)
    bucket = [int(hashlib.md5(d[0].encode()).hexdigest(), 16) % 50 for d in docs]
    train = [d for d, b in zip(docs, bucket) if b]
    valid = [d for d, b in zip(docs, bucket) if not b]
    train += [[a.text] for a in build_split("train", cfg.n_addresses)]
    valid += [[a.text] for a in build_split("valid", max(cfg.n_addresses // 50, 64))]
    return train, valid


def valid_batches(n_items: int, batch_size: int, max_batches: int = 0) -> tuple[list[int], int]:
    """(the valid batches to score, how many there are): the items in their order cut into batches of
    ``batch_size`` (the last one shorter); all of them (max_batches 0), else ``max_batches`` evenly spaced."""
    n_batches = math.ceil(n_items / batch_size)
    return evenly_spaced(n_batches, max_batches), n_batches


@torch.no_grad()
def evaluate(model, data: MLMData, cfg: MLMConfig, device, dtype, vocab_size: int, mask_id: int,
             max_batches: int = 0) -> dict:
    """MLM loss and accuracy (top-1 at the chosen positions), NSP accuracy, on the valid items in their order:
    every item (max_batches 0: the figure the results quote), else ``max_batches`` batches spread evenly over
    the split (a training-time estimate: the same batches at every evaluation of a run). Batch b's masks and
    NSP partners come from generators seeded by b alone, so the figure is deterministic, a batch scores the
    same in the subset as in the whole, and neither the global RNG nor the training's generators are touched."""
    model.eval()
    picked, n_batches = valid_batches(len(data), cfg.batch_size, max_batches)
    loss_sum = correct = total = nsp_right = nsp_total = items = 0
    for b in picked:
        gen, rng = torch.Generator().manual_seed(b), random.Random(b)
        indices = list(range(b * cfg.batch_size, min((b + 1) * cfg.batch_size, len(data))))
        ids, types, nsp_labels = data.batch(indices, cfg.nsp, rng)
        inputs, labels = mask_tokens(ids, ids < len(SPECIALS), vocab_size, mask_id, gen, cfg.mask_prob)
        with autocast(device, dtype):
            out = model(inputs.to(device), token_type_ids=types.to(device), labels=labels.to(device),
                        next_sentence_label=nsp_labels.to(device) if cfg.nsp else None)
        n = int((labels != -100).sum())
        loss_sum += out["mlm_loss"].item() * n
        correct += int((out["mlm_logits"].argmax(-1).cpu() == labels[labels != -100]).sum())
        total += n
        items += len(indices)
        if cfg.nsp:
            nsp_right += int((out["nsp_logits"].argmax(-1).cpu() == nsp_labels).sum())
            nsp_total += len(nsp_labels)
    model.train()
    res = {"mlm_loss": loss_sum / max(total, 1), "mlm_accuracy": correct / max(total, 1)}
    if cfg.nsp:
        res["nsp_accuracy"] = nsp_right / max(nsp_total, 1)
    return {**res, "items": items, "predicted": total, "batches": len(picked), "of_batches": n_batches}


def main(cfg: MLMConfig) -> dict:
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    resume_from = resume_point(ckpt_root, cfg.resume)
    t0 = time.perf_counter()
    tok = load_or_train_tokenizer(cfg.tokenizer_dir, cfg.model.vocab_size)
    train_docs, valid_docs = load_documents(cfg)
    train, valid = MLMData(tok, train_docs, cfg.max_len), MLMData(tok, valid_docs, cfg.max_len)
    print(f"data: {len(train):,} train / {len(valid):,} valid sentences and addresses | "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    V, mask_id = len(tok), tok.mask_token_id
    mcfg = replace(cfg.model, vocab_size=V, max_position_embeddings=max(cfg.model.max_position_embeddings, cfg.max_len))
    model = BertForPreTraining(mcfg).to(device)
    optimizer = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    scheduler, start, logger = resume_or_start(model, optimizer, cfg, out, resume_from, device)
    # before and after training: every valid item (the figures results.json records); in between, a subset
    first = evaluate(model, valid, cfg, device, dtype, V, mask_id) if start == 0 else None
    steps_per_epoch = len(train) // cfg.batch_size
    model.train()
    t_train = time.perf_counter()
    for step in range(start, cfg.max_iters):
        epoch, pos = divmod(step, steps_per_epoch)
        indices = epoch_order(len(train), cfg.seed, epoch)[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
        # masks and NSP partners depend only on (seed, step): a resumed run draws the same ones
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
        ids, types, nsp_labels = train.batch(indices, cfg.nsp, random.Random(cfg.seed * 100_003 + step))
        inputs, labels = mask_tokens(ids, ids < len(SPECIALS), V, mask_id, gen, cfg.mask_prob)
        with autocast(device, dtype):
            out_ = model(inputs.to(device), token_type_ids=types.to(device), labels=labels.to(device),
                         next_sentence_label=nsp_labels.to(device) if cfg.nsp else None)
        loss = out_["loss"]
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        loss.backward()
        clip_grad(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        done = step + 1
        logger.step(done, out_["mlm_loss"].item(), scheduler.get_last_lr()[0], int((ids != 0).sum()),
                    **({"nsp_loss": out_["nsp_loss"].item()} if cfg.nsp else {}))
        if done % cfg.eval_every == 0 or done == cfg.max_iters:
            ev = evaluate(model, valid, cfg, device, dtype, V, mask_id, cfg.eval_batches)
            logger.log({"step": done, **{f"valid_{k}": v for k, v in ev.items()}})
            logger.write(f"step {done}/{cfg.max_iters} | valid MLM loss {ev['mlm_loss']:.3f} | MLM accuracy "
                         f"{ev['mlm_accuracy']:.1%}" + (f" | NSP accuracy {ev['nsp_accuracy']:.1%}" if cfg.nsp else "")
                         + subset_note(ev["batches"], ev["of_batches"], "batches"))
        if done % cfg.save_every == 0 or done == cfg.max_iters:
            save_checkpoint(ckpt_root, done, model, mcfg.to_hf_dict("BertForPreTraining"), optimizer, scheduler,
                            keep=cfg.keep_checkpoints)
    wall = time.perf_counter() - t_train
    final = evaluate(model, valid, cfg, device, dtype, V, mask_id)
    final_dir = out / "final"
    save_pretrained(model, mcfg.to_hf_dict("BertForPreTraining"), final_dir)
    tok.save_pretrained(final_dir / "tokenizer")
    logger.close()
    summary = {"steps": cfg.max_iters, "train_wall_s": wall, "initial": first, "final": final,
               "params": sum(p.numel() for p in model.parameters()), "vocab_size": V}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    cmd = command_line("bert_address_cls.train_mlm",
                       "python -m bert_address_cls.train_mlm" + (" --nsp" if cfg.nsp else ""))
    records = [make_record("bert_address_cls", cfg.run_name, metric, final[metric], "before_training",
                           first[metric] if first else None, wall, cmd) for metric in ("mlm_accuracy", "mlm_loss")]
    if cfg.nsp:
        records.append(make_record("bert_address_cls", cfg.run_name, "nsp_accuracy", final["nsp_accuracy"],
                                   "chance", 0.5, wall, cmd))
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    print(f"done: {cfg.max_iters} steps in {wall:.0f} s | valid MLM accuracy "
          f"{first['mlm_accuracy'] if first else float('nan'):.1%} -> {final['mlm_accuracy']:.1%}, MLM loss "
          f"{first['mlm_loss'] if first else float('nan'):.3f} -> {final['mlm_loss']:.3f} (all {final['items']:,} "
          f"valid items, {final['predicted']:,} masked positions) | {final_dir}")
    return {"summary": summary, "final_dir": final_dir}


if __name__ == "__main__":
    run_main(main, MLMConfig, presets=PRESETS)
