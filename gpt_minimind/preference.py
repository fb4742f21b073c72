"""Preference pairs: the data of the reward model (train_reward.py) and of DPO (train_dpo.py), and the
summed answer log-probabilities both methods compare.

A pair is (prompt turns, chosen answer, rejected answer). From the checkable tasks the chosen answer is
the correct one and the rejected one a plausible wrong answer (another label, a near-miss number,
another word's gloss) or, for some questions, the SFT model's own wrong answer sampled at temperature 1
(what it actually gets wrong, so training pushes on real errors). Your own pairs: minimind's DPO JSONL.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch

from common.cli import UserError
from common.data import iter_jsonl

from . import engine
from .dataset import epoch_order
from .finetune import encode_chat
from .model import MiniMindForCausalLM
from .tasks import EXACT_TASKS, NEWS_LABELS, Example, build_examples, exact_match

Pair = tuple[list[dict], str, str]  # (prompt turns, chosen answer, rejected answer)


def sequence_logps(model: MiniMindForCausalLM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) sum over the answer positions (label != -100) of log p(label | prefix)."""
    logp = model(x)["logits"].float().log_softmax(-1)
    mask = y != -100
    picked = logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)  # (B, T)
    return (picked * mask).sum(-1)


def plausible_wrong(ex: Example, pool: dict[str, list[str]], rng: random.Random) -> str:
    """A wrong answer of the kind the model might give: another label, a near-miss, another word's gloss."""
    if ex.task == "news_sentiment":
        return rng.choice([a for a in NEWS_LABELS if a != ex.answer])
    if ex.task == "review_sentiment":
        return "差评" if ex.answer == "好评" else "好评"
    if ex.task == "arithmetic":
        return str(int(ex.answer) + rng.choice([-10, -2, -1, 1, 2, 10]))
    while True:
        other = rng.choice(pool[ex.task])
        if not exact_match(other, ex.answer):
            return other


@torch.no_grad()
def sample_answer(model: MiniMindForCausalLM, tok, messages: list[dict], generator: torch.Generator,
                  max_new_tokens: int = 24) -> str:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    out, prompt = [], torch.tensor([ids], device=model.lm_head.weight.device)
    for t in engine.generate(model, prompt, max_new_tokens, temperature=1.0, top_k=20, eos_token_id=tok.eos_token_id,
                             generator=generator):
        if int(t) == tok.eos_token_id:
            break
        out.append(int(t))
    return tok.decode(out, skip_special_tokens=True).strip()


def build_pairs(split: str, n: int, n_own: int, model, tok, seed: int) -> tuple[list[Pair], dict]:
    """``n`` pairs from ``split``'s checkable questions; the first ``n_own`` questions are answered by
    ``model`` itself and, where it is wrong, its answer is the rejected one."""
    rng = random.Random(seed)
    examples = [ex for ex in build_examples(split, {t: -1 for t in EXACT_TASKS}, seed) if ex.task in EXACT_TASKS]
    pool: dict[str, list[str]] = {}
    for ex in examples:
        pool.setdefault(ex.task, []).append(ex.answer)
    examples = examples[:n]
    gen = torch.Generator().manual_seed(seed)
    pairs, own_wrong, own_tried = [], 0, 0
    for i, ex in enumerate(examples):
        rejected = None
        if i < n_own:
            own_tried += 1
            guess = sample_answer(model, tok, ex.prompt, gen)
            if guess and not exact_match(guess, ex.answer):
                rejected, own_wrong = guess, own_wrong + 1
        pairs.append((ex.prompt, ex.answer, rejected or plausible_wrong(ex, pool, rng)))
    return pairs, {"own_sampled": own_tried, "own_wrong": own_wrong}


def read_dpo_jsonl(path: str | Path) -> list[Pair]:
    """minimind's DPO format: {"chosen": [turns], "rejected": [turns]}, the same prompt, different last turns."""
    pairs = []
    for lineno, rec in iter_jsonl(path, required={"chosen": list, "rejected": list}, with_lineno=True):
        c, r = rec["chosen"], rec["rejected"]
        ok = (c and r and c[:-1] == r[:-1] and all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                                   for t in c + r)
              and c[-1].get("role") == r[-1].get("role") == "assistant")
        if not ok:
            raise UserError(f"{path}:{lineno}: 'chosen' and 'rejected' must be turn lists with the same "
                             "prompt turns and a final assistant turn each")
        pairs.append((c[:-1], c[-1]["content"], r[-1]["content"]))
    return pairs


class PairData:
    """Encoded pairs; a batch is [chosen rows; rejected rows], right-padded to one length."""

    def __init__(self, tok, pairs: list[Pair], max_len: int):
        self.rows = [(encode_chat(tok, p + [{"role": "assistant", "content": c}], max_len),
                      encode_chat(tok, p + [{"role": "assistant", "content": r}], max_len)) for p, c, r in pairs]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.rows)

    def collate(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [self.rows[i][0] for i in idx] + [self.rows[i][1] for i in idx]
        T = max(len(s[0]) for s in seqs)
        x = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(seqs), T), -100, dtype=torch.long)
        for b, (ids, labels) in enumerate(seqs):
            x[b, :len(ids)], y[b, :len(labels)] = torch.tensor(ids), torch.tensor(labels)
        return x, y


@torch.no_grad()
def all_logps(model, data: PairData, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probs of every pair: the reference's are computed once, up front."""
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(data), batch_size):
        idx = list(range(i, min(i + batch_size, len(data))))
        x, y = data.collate(idx)
        device = model.lm_head.weight.device
        lp = sequence_logps(model, x.to(device), y.to(device)).cpu()
        chosen.append(lp[:len(idx)])
        rejected.append(lp[len(idx):])
    return torch.cat(chosen), torch.cat(rejected)


def preference_pairs(cfg, cache_file: Path, reuse: bool, model, tok, seed: int
                     ) -> tuple[list[Pair], list[Pair], dict]:
    """(train pairs, held-out pairs, stats) as ``cfg`` asks: ``cfg.data_file`` (its first 5 % held out) or
    built from the checkable tasks (``train_pairs``, ``own_samples`` answered by ``model``, ``eval_pairs``)
    with ``seed``. Written to ``cache_file``; with ``reuse`` (a resumed run) read back from it, so that a
    resumed run trains on the very same pairs. DPO and the reward model call this with the same defaults
    and the same SFT model, so they get the same pairs."""
    if reuse and cache_file.is_file():
        saved = json.loads(cache_file.read_text())
        return saved["train"], saved["valid"], saved["stats"]
    if cfg.data_file:
        all_pairs = read_dpo_jsonl(cfg.data_file)
        n_valid = max(1, len(all_pairs) // 20)
        train, valid, stats = all_pairs[n_valid:], all_pairs[:n_valid], {}
    else:
        train, stats = build_pairs("train", cfg.train_pairs, cfg.own_samples, model, tok, seed)
        valid, _ = build_pairs("test", cfg.eval_pairs, 0, model, tok, seed)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps({"train": train, "valid": valid, "stats": stats}, ensure_ascii=False) + "\n")
    return train, valid, stats


def pair_batches(n: int, batch_size: int, seed: int, start: int, max_iters: int) -> Iterator[tuple[int, list[int]]]:
    """(step, pair indices) for steps ``start`` .. ``max_iters`` - 1: whole batches in a seeded order per
    epoch, so a run resumed at any step sees the batches an uninterrupted one would."""
    steps_per_epoch = n // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{n} pairs are fewer than one batch of {batch_size}")
    order, order_epoch = [], -1
    for step in range(start, max_iters):
        epoch, b = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(n, seed, epoch), epoch
        yield step, order[b * batch_size:(b + 1) * batch_size]
