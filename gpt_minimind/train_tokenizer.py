"""Train a byte-level BPE tokenizer on the pretraining corpus and save it as a transformers tokenizer.

    python -m gpt_minimind.train_tokenizer            # ~1 minute on 2 CPU cores

Byte-level BPE (GPT-2; Sennrich et al. 2016 for BPE): start from the 256 byte values, so any text is
encodable and nothing is ever unknown, then repeatedly merge the most frequent adjacent pair into a new
token until the vocabulary is full. A Chinese character is 3 UTF-8 bytes; frequent characters and
words become single tokens, rare ones stay as byte pieces.

Special tokens (minimind's): <|endoftext|> = 0 (padding), <|im_start|> = 1 (begin), <|im_end|> = 2 (end).
The chat template is ChatML: ``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from common.config import parse_config

from .dataset import load_documents

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' and add_default_system %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TokenizerConfig:
    """Byte-level BPE on the pretraining text."""

    vocab_size: int = 6400  # minimind's size: a small model cannot afford a big embedding table
    min_frequency: int = 2  # a pair must occur this often to be merged
    out_dir: str = "runs/gpt_minimind/tokenizer"  # a transformers tokenizer directory
    data_file: str = ""  # minimind-format JSONL ({"text": ...}) instead of the default corpus
    hf_dataset: str = ""  # or a Hugging Face dataset with a text column (streamed)
    max_documents: int = 0  # train on at most this many documents (0 = all)


def train_bpe(texts, vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # bytes -> printable symbols, split
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tok.train_from_iterator(texts, trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def save_hf_tokenizer(tok: Tokenizer, out_dir: str | Path) -> Path:
    """Wrap as PreTrainedTokenizerFast with the special tokens and chat template, so that
    ``AutoTokenizer.from_pretrained(out_dir)`` loads it with no custom code."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE,
                                   model_max_length=32768, clean_up_tokenization_spaces=False)
    fast.save_pretrained(out_dir)
    return Path(out_dir)


def chars_per_token(tok: Tokenizer, texts: list[str]) -> float:
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts))
    return sum(map(len, texts)) / n_tokens


def main(cfg: TokenizerConfig) -> dict:
    splits = load_documents(cfg.data_file, cfg.hf_dataset, cfg.max_documents)
    t0 = time.perf_counter()
    tok = train_bpe(splits["train"], cfg.vocab_size, cfg.min_frequency)
    wall = time.perf_counter() - t0
    out = save_hf_tokenizer(tok, cfg.out_dir)
    held_out = splits["valid"] or splits["train"][:100]
    stats = {"vocab_size": tok.get_vocab_size(), "chars_per_token_valid": chars_per_token(tok, held_out),
             "train_documents": len(splits["train"]), "train_wall_s": wall}
    (out / "tokenizer_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    sample = held_out[0][:30]
    pieces = [tok.decode([i]) for i in tok.encode(sample).ids]
    print(f"vocab {stats['vocab_size']} | {stats['chars_per_token_valid']:.2f} characters per token on "
          f"{len(held_out)} held-out documents | trained in {wall:.0f} s -> {out}")
    print(f"{sample!r} -> {pieces}  (\ufffd: a byte piece of a character that has no token of its own)")
    return stats


if __name__ == "__main__":
    main(parse_config(TokenizerConfig))
