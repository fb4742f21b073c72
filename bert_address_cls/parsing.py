"""The address parser in use: load a train_cls.py directory, run it on texts, and score it against labelled
addresses (entity-level F1 as seqeval counts it, province/city/district accuracy, the rule-based cpca-new on
the same addresses). train_cls.py, evaluate.py and infer.py share these."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from common.checkpoint import load_pretrained, read_config

from .dataset import FIELDS, TAGS, Address, entity_scores, normalize, tags_to_spans
from .model import BertConfig, BertForAddressParsing

# ---------------------------------------------------------------------------------------------------
# Loading and running the parser
# ---------------------------------------------------------------------------------------------------

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
    load_pretrained(model, ckpt)  # names a missing or damaged weights file
    tok = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    return model.to(device).eval(), tok, cfg["provinces"]


MAX_LEN = 128  # tokens the parser reads per address, [CLS] and [SEP] included


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
                max_len: int = MAX_LEN) -> list[dict]:
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


# ---------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------

def predict(model, tok, addresses: list[Address], names: list[str], batch_size: int = 256) -> list[dict]:
    model.eval()
    out = []
    for b in range(0, len(addresses), batch_size):
        out += parse_batch(model, tok, [a.text for a in addresses[b: b + batch_size]], names)
    model.train()
    return out


def field_confusion(addresses: list[Address], preds: list[dict]) -> list[list[int]]:
    """Characters counted by (true field, predicted field); index len(FIELDS) is 'no field'."""
    k = {f: i for i, f in enumerate(FIELDS)}
    n = len(FIELDS) + 1
    m = [[0] * n for _ in range(n)]
    for a, p in zip(addresses, preds):
        g_char, p_char = [n - 1] * len(a.text), [n - 1] * len(a.text)
        for s, e, f in a.spans:
            g_char[s:e] = [k[f]] * (e - s)
        for s, e, f in p["spans"]:
            p_char[s:e] = [k[f]] * (e - s)
        for g, q in zip(g_char, p_char):
            m[g][q] += 1
    return m


def score(addresses: list[Address], preds: list[dict]) -> dict:
    ent = entity_scores([a.spans for a in addresses], [p["spans"] for p in preds])
    known = [(a, p) for a, p in zip(addresses, preds) if a.province]
    res = {**ent, "province_accuracy": sum(a.province == p["province"] for a, p in known) / max(len(known), 1)}
    for f in ("city", "district"):  # the written field found exactly (or rightly found absent)
        res[f"{f}_accuracy"] = sum({s for s in a.spans if s[2] == f} == {s for s in p["spans"] if s[2] == f}
                                   for a, p in zip(addresses, preds)) / len(addresses)
    return res


def province_by_written(addresses: list[Address], preds: list[dict]) -> dict[str, list[int]]:
    """Province errors by what the address writes: key 'PCD' / 'P-D' / '--D' ... (P province, C city,
    D district, - left out) -> [addresses, wrong]."""
    table: dict[str, list[int]] = {}
    for a, p in zip(addresses, preds):
        written = {f for _, _, f in a.spans}
        key = "".join(c if f in written else "-" for c, f in zip("PCD", ("province", "city", "district")))
        row = table.setdefault(key, [0, 0])
        row[0] += 1
        row[1] += p["province"] != a.province
    return dict(sorted(table.items(), reverse=True))


def cpca_scores(addresses: list[Address]) -> dict | None:
    """cpca-new (rules over the official division names) on the same addresses. It returns full names
    and where it found them: a written field counts as right when the position and the name are right;
    an unwritten one when cpca places it nowhere (it may still infer its name, as a [CLS] head does)."""
    if not all(a.meta for a in addresses):
        return None  # user data: no full names to compare with
    import cpca_new

    df = cpca_new.transform([a.text for a in addresses], pos_sensitive=True)
    res = {"province_accuracy": 0, "city_accuracy": 0, "district_accuracy": 0}
    for a, (_, row) in zip(addresses, df.iterrows()):
        res["province_accuracy"] += row["省"] == a.meta["province"]
        for f, name, pos in (("city", "市", "市_pos"), ("district", "区", "区_pos")):
            written = [s for s in a.spans if s[2] == f]
            found = int(row[pos]) if row[pos] == row[pos] else -1  # NaN -> -1
            if f == "city" and found >= 0 and found == row["省_pos"]:
                found = -1  # 北京市: the province's own name, not a written city
            if written:
                res[f"{f}_accuracy"] += found == written[0][0] and row[name] == a.meta[f]
            else:
                res[f"{f}_accuracy"] += found < 0
    return {k: v / len(addresses) for k, v in res.items()}


def format_report(result: dict, baseline: dict | None, n: int) -> str:
    lines = [f"test split: {n:,} addresses in towns never seen in training",
             f"entity P {result['precision']:.4f} | R {result['recall']:.4f} | F1 {result['f1']:.4f}",
             "| field | F1 | support |", "|---|---|---|"]
    lines += [f"| {f} | {v['f1']:.4f} | {v['support']:,} |" for f, v in result["per_field"].items()]
    lines += ["", "| | province (any) | city as written | district as written |", "|---|---|---|---|",
              f"| BERT | {result['province_accuracy']:.4f} | {result['city_accuracy']:.4f} | "
              f"{result['district_accuracy']:.4f} |"]
    if baseline:
        lines.append(f"| cpca-new | {baseline['province_accuracy']:.4f} | {baseline['city_accuracy']:.4f} | "
                     f"{baseline['district_accuracy']:.4f} |")
    return "\n".join(lines)
