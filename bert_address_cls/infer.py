"""Parse Chinese addresses with a fine-tuned model: one JSON object per address.

    python -m bert_address_cls.infer 浙江省杭州市西湖区文三路90号东部软件园3号楼 "北京海淀区中关村大街1号"
    python -m bert_address_cls.infer --file addresses.txt          # one address per line
    python -m bert_address_cls.infer --ckpt runs/bert_address_cls/cls/final ...

{"address": "...", "province": "浙江省", "city": "杭州市", "district": "西湖区", "town": null, ...,
 "province_predicted": "浙江省"}: the fields are the tagger's spans as written (null when absent);
province_predicted comes from the [CLS] head and names the province even when the text leaves it out.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from common.cli import DEBUG_FLAG, UserError, debug_requested, user_errors
from common.config import parse_config
from common.data import read_text_file
from common.runtime import pick_device

from .dataset import fields_of
from .parsing import MAX_LEN, load_parser, parse_batch


def parse(model, tok, texts: list[str], provinces: list[str], batch_size: int = 256) -> list[dict]:
    """One JSON-able dict per address (the format of the module docstring)."""
    limit = MAX_LEN - 2  # less [CLS] and [SEP]
    for i, text in enumerate(texts, 1):
        if len(text) > limit:
            print(f"warning: address {i} has {len(text)} characters: only its first {limit} are tagged",
                  file=sys.stderr)
    rows = []
    for b in range(0, len(texts), batch_size):
        chunk = texts[b: b + batch_size]
        for text, r in zip(chunk, parse_batch(model, tok, chunk, provinces)):
            rows.append({"address": text, **fields_of(text, r["spans"]), "province_predicted": r["province"]})
    return rows


@dataclass
class InferConfig:
    """Parse addresses given on the command line or in a file."""

    ckpt: str = "runs/bert_address_cls/cls/final"  # a train_cls.py output directory
    file: str = ""  # one address per line (UTF-8); blank lines skipped
    device: str = "auto"


def main(cfg: InferConfig, addresses: list[str]) -> list[dict]:
    texts = list(addresses)
    if cfg.file:
        path = Path(cfg.file)
        if not path.is_file():
            raise UserError(f"--file {path}: no such file")
        lines = [line.strip() for line in read_text_file(path).splitlines() if line.strip()]
        if not lines:
            raise UserError(f"--file {path}: no address in it (one address per line expected)")
        texts += lines
    if not texts:  # no address given at all: the demo's three
        texts = ["浙江省杭州市西湖区文三路90号东部软件园3号楼", "北京海淀区中关村大街1号", "杭州西湖区北山街道宝石社区"]
    model, tok, provinces = load_parser(cfg.ckpt, pick_device(cfg.device))  # after the input is known good
    rows = parse(model, tok, texts, provinces)
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    return rows


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(flags with their values, addresses): every flag of InferConfig takes one value."""
    flags, addresses, i = [], [], 0
    while i < len(argv):
        if argv[i].startswith("--"):
            takes_value = "=" not in argv[i] and argv[i] != "--help"
            flags += argv[i: i + 1 + takes_value]
            i += 1 + takes_value
        else:
            addresses.append(argv[i])
            i += 1
    return flags, addresses


if __name__ == "__main__":
    flags, addresses = split_argv(sys.argv[1:])
    with user_errors(debug_requested(flags)):
        main(parse_config(InferConfig, [f for f in flags if f != DEBUG_FLAG]), addresses)
