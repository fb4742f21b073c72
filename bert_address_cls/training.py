"""What both training stages (train_mlm.py, train_cls.py) train with: the chapter's tokenizer, AdamW's
weight-decay groups, and the order of the examples in each epoch. The objectives and the loops stay in
the stage scripts."""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .dataset import tokenizer_texts, train_tokenizer


def load_or_train_tokenizer(tokenizer_dir: str | Path, vocab_size: int):
    """The WordPiece (character) tokenizer in ``tokenizer_dir``; trained there first if it is not yet."""
    if (Path(tokenizer_dir) / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    t0 = time.perf_counter()
    tok = train_tokenizer(tokenizer_texts(), vocab_size, tokenizer_dir)
    print(f"tokenizer: {len(tok)} tokens (characters) -> {tokenizer_dir} | {time.perf_counter() - t0:.0f} s")
    return tok


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the trainable matrices, none on biases, LayerNorms and embeddings."""
    groups = {True: [], False: []}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups[p.ndim >= 2 and "embeddings" not in n].append(p)
    return [{"params": groups[True], "weight_decay": weight_decay}, {"params": groups[False], "weight_decay": 0.0}]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch: a function of (seed, epoch) only, so --resume sees the same batches."""
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return order
