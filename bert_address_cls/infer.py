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

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from common.checkpoint import load_weights, read_config
from common.config import parse_config
from common.runtime import pick_device

from .dataset import TAGS, fields_of, normalize, tags_to_spans
from .model import BertConfig, BertForAddressParsing


def load_parser(ckpt: str | Path, device="cpu") -> tuple[BertForAddressParsing, object, list[str]]:
    """(model, tokenizer, province names) from a train_cls.py output directory."""
    ckpt = Path(ckpt)
    if not (ckpt / "model.safetensors").is_file():
        raise FileNotFoundError(f"{ckpt}: no model.safetensors; train with python -m bert_address_cls.train_cls")
    cfg = read_config(ckpt)
    for key in ("num_tags", "provinces"):
        if key not in cfg:
            raise ValueError(f"{ckpt / 'config.json'}: field {key!r} missing; is this a train_cls.py directory?")
    model = BertForAddressParsing(BertConfig.from_dict(cfg), cfg["num_tags"], len(cfg["provinces"]))
    load_weights(model, load_file(str(ckpt / "model.safetensors")), str(ckpt / "model.safetensors"))
    tok = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    return model.to(device).eval(), tok, cfg["provinces"]


def encode(tok, texts: list[str], max_len: int):
    """ids (B, T) padded with 0, attention mask, and each token's character index (-1 for [CLS]/[SEP]/pad).
    Texts longer than max_len - 2 characters are cut (their tail gets no tags)."""
    enc = tok([normalize(t) for t in texts], return_offsets_mapping=True, truncation=True, max_length=max_len)
    T = max(len(x) for x in enc["input_ids"])
    ids = torch.zeros(len(texts), T, dtype=torch.long)
    char = torch.full((len(texts), T), -1, dtype=torch.long)
    for i, (x, offs) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        ids[i, : len(x)] = torch.tensor(x)
        for j, (s, e) in enumerate(offs):
            if e > s and 0 < j < len(x) - 1:
                char[i, j] = s
    return ids, (ids != 0).long(), char


@torch.no_grad()
def parse_batch(model: BertForAddressParsing, tok, texts: list[str], provinces: list[str],
                max_len: int = 128) -> list[dict]:
    """Spans (character offsets) and the [CLS] province for each text."""
    device = model.classifier.weight.device
    ids, mask, char = encode(tok, texts, max_len)
    out = model(ids.to(device), mask.to(device))
    tag_ids = out["tag_logits"].argmax(-1).cpu()
    prov = out["province_logits"].argmax(-1).cpu()
    results = []
    for i, text in enumerate(texts):
        tags = ["O"] * len(text)
        for j in range(ids.shape[1]):
            if char[i, j] >= 0:
                tags[char[i, j]] = TAGS[tag_ids[i, j]]
        results.append({"spans": tags_to_spans(tags), "province": provinces[prov[i]]})
    return results


def parse(model, tok, texts: list[str], provinces: list[str], batch_size: int = 256) -> list[dict]:
    """One JSON-able dict per address (the format of the module docstring)."""
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
    model, tok, provinces = load_parser(cfg.ckpt, pick_device(cfg.device))
    texts = list(addresses)
    if cfg.file:
        path = Path(cfg.file)
        if not path.is_file():
            raise FileNotFoundError(f"--file {path}: no such file")
        texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        texts = ["浙江省杭州市西湖区文三路90号东部软件园3号楼", "北京海淀区中关村大街1号", "杭州西湖区北山街道宝石社区"]
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
    main(parse_config(InferConfig, flags), addresses)
