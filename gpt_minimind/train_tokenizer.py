"""Train the chapter's byte-level BPE tokenizer (tokenizer.py) on the pretraining corpus.

    python -m gpt_minimind.train_tokenizer            # run time: README, Run it

Byte-level BPE starts from the 256 byte values and merges the most frequent adjacent pair until the
vocabulary is full; tokenizer.py explains it and holds the code. The result is a transformers
tokenizer directory (``AutoTokenizer.from_pretrained`` loads it) with minimind's special tokens and
the ChatML chat template.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.cli import run_main

from .tokenizer import build_tokenizer


@dataclass
class TokenizerConfig:
    """Byte-level BPE on the pretraining text."""

    vocab_size: int = 6400  # minimind's size: a small model cannot afford a big embedding table
    min_frequency: int = 2  # a pair must occur this often to be merged
    out_dir: str = "runs/gpt_minimind/tokenizer"  # a transformers tokenizer directory
    data_file: str = ""  # minimind-format JSONL ({"text": ...}) instead of the default corpus
    hf_dataset: str = ""  # or a Hugging Face dataset with a text column (streamed)
    max_documents: int = 0  # train on at most this many documents (0 = all)


def main(cfg: TokenizerConfig) -> dict:
    stats = build_tokenizer(cfg.out_dir, cfg.data_file, cfg.hf_dataset, cfg.vocab_size, cfg.min_frequency,
                            cfg.max_documents)
    sample, pieces = stats.pop("sample")
    print(f"vocab {stats['vocab_size']} | {stats['chars_per_token_valid']:.2f} characters per token on "
          f"held-out documents | trained in {stats['train_wall_s']:.0f} s -> {cfg.out_dir}")
    print(f"{sample!r} -> {pieces}  (\ufffd: a byte piece of a character that has no token of its own)")
    return stats


if __name__ == "__main__":
    run_main(main, TokenizerConfig)
