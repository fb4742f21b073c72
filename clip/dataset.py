"""Image-caption pairs for CLIP: easy-VQA's 64x64 pictures of one coloured shape, captioned from the picture.

    python -m clip.dataset        # fetch easy-vqa==1.0 from PyPI (3 MB), build the captions, print examples

easy-VQA (Zhou 2020, MIT; 4,000 train + 1,000 test images) comes with questions and answers, not captions.
Each image holds one shape (circle, rectangle, triangle) in one of 8 colours on a light plain background.
The answers give the shape and the colour; the picture gives the rest: the shape's pixels are those far
from the background colour (the corner pixel), their area gives the size (small / medium / large, cut at
the training set's tertiles) and their centroid the position (a 3 x 3 grid: "top left" ... "bottom right").
Each image then has a caption per phrasing (``TEMPLATES``): "a small teal triangle in the top left",
"top left: a teal triangle, small", ... Training draws a phrasing at random; evaluation uses the first.

Your own data (the format open_clip users have): a CSV with ``filepath,title`` columns or a JSONL with
``{"filepath": ..., "title": ...}`` per line, paths relative to the file; a bad row names the file, the line
and the column, a missing or unreadable image names its path (``load_pairs_file``).
"""

from __future__ import annotations

import collections
import csv
import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from common.config import parse_no_flags
from common.data import EASY_VQA, cache_dir, fetch_package, iter_jsonl
from common.errors import UserError

N_IMAGES = {"train": 4000, "test": 1000}
SHAPES = ("circle", "rectangle", "triangle")
COLORS = {"red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
          "teal": (0, 128, 128), "brown": (165, 42, 42), "gray": (128, 128, 128), "black": (0, 0, 0)}
SIZES = ("small", "medium", "large")
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
# the background's tint: its hue in six 60-degree sectors (red, yellow, green, cyan, blue, magenta). The
# backgrounds are pale (saturation 0 to 0.1) but flat, so the hue is exact; with it 72 % of the test pictures
# have a caption of their own, against 20 % without it (python -m clip.dataset prints the counts).
TINTS = ("pink", "cream", "mint", "cyan", "sky-blue", "lavender")

# The phrasings of one caption; {where} is "in the top left", ..., "in the middle" for the centre cell.
TEMPLATES = ("a {size} {color} {shape} {where} on a {tint} background",
             "{place}: a {color} {shape}, {size}, {tint} background",
             "a {color} {shape} on a {tint} background, {size}, {where}",
             "there is a {size} {shape} in {color} {where}, the background {tint}",
             "{tint} background, {size} {shape} colored {color} {where}")


def place_name(row: str, col: str) -> str:
    """The grid cell in words: "top left", "top", ..., "middle" for the centre cell."""
    if row == "middle":
        return "middle" if col == "center" else col
    return row if col == "center" else f"{row} {col}"


@dataclass(frozen=True)
class Item:
    """One picture's facts: shape, colour, size, grid cell, and the pixel figures they came from."""

    index: int
    shape: str
    color: str
    size: str
    row: str
    col: str
    area: float  # share of the 64 x 64 pixels that belong to the shape
    cx: float  # centroid, 0..1 from the left
    cy: float  # centroid, 0..1 from the top
    tint: str  # the background's hue (TINTS)

    @property
    def place(self) -> str:
        return place_name(self.row, self.col)

    def caption(self, template: int = 0) -> str:
        where = "in the middle" if self.place == "middle" else f"in the {self.place}"
        return TEMPLATES[template].format(size=self.size, color=self.color, shape=self.shape, where=where,
                                          place=self.place, tint=self.tint)

    def captions(self) -> list[str]:
        return [self.caption(i) for i in range(len(TEMPLATES))]


def easy_vqa_files() -> Path:
    """The wheel's questions and images, extracted once into the cache; returns .../easy_vqa/data."""
    members = [f"easy_vqa/data/{s}/questions.json" for s in N_IMAGES]
    members += [f"easy_vqa/data/{s}/images/{i}.png" for s, n in N_IMAGES.items() for i in range(n)]
    return fetch_package(EASY_VQA, members) / "easy_vqa" / "data"


def load_images(split: str) -> np.ndarray:
    """(N, 64, 64, 3) uint8, decoded once from the PNGs and cached as .npy beside them."""
    from PIL import Image

    root = easy_vqa_files() / split
    cache = root / "images.npy"
    if cache.exists():
        return np.load(cache)
    arr = np.stack([np.asarray(Image.open(root / "images" / f"{i}.png").convert("RGB"))
                    for i in range(N_IMAGES[split])])
    tmp = root / "images.tmp.npy"
    np.save(tmp, arr)
    tmp.replace(cache)
    return arr


def answers_per_image(split: str) -> dict[int, tuple[str | None, str | None]]:
    """(shape, colour) that each image's questions and answers establish; None where none does. An open
    question answers it ("what shape is in the image?" -> circle) or names it ("what color is the triangle?");
    a yes/no question establishes what it asks about when the answer says it is there ("is there a red
    shape?" yes, "is no circle present?" no). Images no question establishes are left to the pixels."""
    found: dict[int, dict[str, str]] = {}

    def note(image: int, word: str) -> None:
        found.setdefault(image, {})["shape" if word in SHAPES else "color"] = word

    for question, answer, image in json.loads((easy_vqa_files() / split / "questions.json").read_text()):
        words = question.rstrip("?").split()
        named = [w for w in words if w in SHAPES or w in COLORS]
        if answer in ("yes", "no"):
            if (answer == "yes") != bool({"not", "no"} & set(words)):
                for w in named:
                    note(image, w)
        else:
            note(image, answer)
            for w in named:
                note(image, w)
    return {i: (d.get("shape"), d.get("color")) for i, d in found.items()}


def shape_mask(img: np.ndarray) -> np.ndarray:
    """(64, 64) bool: pixels closer to the shape than to the background. The background is the corner
    pixel's colour; the shape's colour is the pixel farthest from it (shapes are drawn in one flat colour,
    with anti-aliased edges that count when they are more than half way)."""
    x = img.astype(np.float32)
    dist = np.linalg.norm(x - x[0, 0], axis=-1)
    return dist > 0.5 * dist.max()


def shape_from_pixels(mask: np.ndarray) -> str:
    """The share of its bounding box a shape fills: a rectangle ~1, a circle pi/4 ~ 0.79, a triangle ~0.5."""
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "rectangle" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"


def tint_of(rgb: np.ndarray) -> str:
    """The background's hue sector (TINTS)."""
    import colorsys

    hue = colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=np.float64) / 255.0))[0]
    return TINTS[int(hue * 6 + 0.5) % 6]


def nearest_color(rgb: np.ndarray) -> str:
    return min(COLORS, key=lambda c: float(np.sum((np.array(COLORS[c]) - rgb) ** 2)))


def describe(images: np.ndarray, answers: dict[int, tuple[str | None, str | None]],
             area_cuts: tuple[float, float]) -> list[Item]:
    """One Item per image: shape from the answers, colour from the answers (else the shape's pixels),
    size from the area (``area_cuts`` are the small/medium and medium/large borders), cell from the centroid."""
    items = []
    for i, img in enumerate(images):
        mask = shape_mask(img)
        ys, xs = np.nonzero(mask)
        area = mask.mean()
        shape, color = answers.get(i, (None, None))
        color = color or nearest_color(np.median(img[mask], axis=0))
        shape = shape or shape_from_pixels(mask)
        cx, cy = (xs.mean() + 0.5) / img.shape[1], (ys.mean() + 0.5) / img.shape[0]
        size = SIZES[int(area > area_cuts[0]) + int(area > area_cuts[1])]
        items.append(Item(i, shape, color, size, ROWS[min(int(cy * 3), 2)], COLS[min(int(cx * 3), 2)],
                          float(area), float(cx), float(cy), tint_of(img[0, 0])))
    return items


def area_tertiles(images: np.ndarray) -> tuple[float, float]:
    areas = np.array([shape_mask(img).mean() for img in images])
    lo, hi = np.quantile(areas, [1 / 3, 2 / 3])
    return float(lo), float(hi)


def easy_vqa_split(split: str) -> tuple[np.ndarray, list[Item]]:
    """(images (N, 64, 64, 3) uint8, their Items). Size borders come from the training split for both."""
    images = load_images(split)
    cuts_file = easy_vqa_files() / "area_tertiles.json"
    if not cuts_file.exists():
        cuts_file.write_text(json.dumps(area_tertiles(load_images("train"))))
    cuts = tuple(json.loads(cuts_file.read_text()))
    return images, describe(images, answers_per_image(split), cuts)


def hard_negative_partners(items: list[Item], k: int = 8, place: bool = False, same_tint: bool = False
                           ) -> list[list[int]]:
    """For each image, up to ``k`` images whose captions differ from its own in the shape word (and the
    background tint): the same colour and size, another shape, centroids nearest first. With ``place``, also up
    to ``k`` that differ in the grid cell (same shape, colour and size, another cell, drawn at random), so that
    half the partners differ in place. A batch that holds such pairs makes the loss pay for ignoring the shape
    (or the place) (train_clip.py, --hard-negatives): 32 random captions of this data nearly always differ in
    colour or size, and a model that reads those words solves the batch without the shape. With ``same_tint``
    the partners share the tint too (where a group has none, the tint is let go), so the background word
    cannot tell them apart; then the tint itself is taught by nothing but random negatives (README, lesson 4)."""
    groups: dict[tuple, list[Item]] = collections.defaultdict(list)
    for it in items:
        groups[it.color, it.size, it.tint].append(it)
        groups[it.color, it.size].append(it)

    def differing(it: Item, same_shape: bool) -> list[Item]:
        for key in ([(it.color, it.size, it.tint)] if same_tint else []) + [(it.color, it.size)]:
            found = [o for o in groups[key] if (o.shape == it.shape) == same_shape
                     and (o.place != it.place or not same_shape)]
            if found:
                return found
        return []

    out = []
    for it in items:
        shapes = sorted(differing(it, False), key=lambda o: (o.cx - it.cx) ** 2 + (o.cy - it.cy) ** 2)
        mine = [o.index for o in shapes[:k]]
        if place:
            places = differing(it, True)
            mine += [o.index for o in random.Random(it.index).sample(places, min(k, len(places)))]
        out.append(mine)
    return out


SWAPPABLE = {"place": [(r, c) for r in ROWS for c in COLS], "size": SIZES, "tint": TINTS, "color": tuple(COLORS),
             "shape": SHAPES}


def swapped_caption(item: Item, template: int, attribute: str, rng: random.Random) -> str:
    """The caption of ``item`` in phrasing ``template`` with one ``attribute`` (a key of SWAPPABLE) changed to
    another value drawn by ``rng``: a caption that is false for this picture and differs from its true one in
    a word or two. As an extra negative of its picture (train_clip.py, --swap-negatives; NegCLIP, Yuksekgonul
    et al. 2023) it makes the loss pay for a text tower that reads past that word."""
    if attribute not in SWAPPABLE:
        raise UserError(f"--swap-negatives {attribute}: expected some of {', '.join(SWAPPABLE)}")
    if attribute == "place":
        row, col = rng.choice([rc for rc in SWAPPABLE["place"] if rc != (item.row, item.col)])
        return replace(item, row=row, col=col).caption(template)
    value = rng.choice([v for v in SWAPPABLE[attribute] if v != getattr(item, attribute)])
    return replace(item, **{attribute: value}).caption(template)


# ---------------------------------------------------------------------------------------------------
# Your own pairs: a CSV (filepath,title) or JSONL file next to the images
# ---------------------------------------------------------------------------------------------------

def read_image(file: str | Path, size: int, where: str) -> np.ndarray:
    """(size, size, 3) uint8: the picture in RGB, resized (bicubic). A missing or unreadable file is one error
    line that starts with ``where`` (the data file's line, or the flag that named the file)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            return np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))
    except FileNotFoundError:
        raise UserError(f"{where}: image {file} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{where}: {file} is not an image PIL can read ({type(err).__name__})") from None


def load_pairs_file(path: str | Path, image_size: int) -> tuple[np.ndarray, list[str]]:
    """(images (N, S, S, 3) uint8 resized to image_size, captions) from a CSV with ``filepath,title`` columns
    or a JSONL with those fields; image paths relative to the file's folder. Every error names the file and
    line (and the column) or the image's path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    rows: list[tuple[int, str, str]] = []
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"filepath", "title"} - set(reader.fieldnames or [])
            if missing:
                raise UserError(f"{path}:1: the header has no column {', '.join(sorted(missing))} "
                                f"(expected filepath,title; got {','.join(reader.fieldnames or [])})")
            for row in reader:
                line = reader.line_num
                for col in ("filepath", "title"):
                    if not (row.get(col) or "").strip():
                        raise UserError(f"{path}:{line}: column {col!r} is empty")
                rows.append((line, row["filepath"], row["title"]))
    else:
        for line, rec in iter_jsonl(path, {"filepath": str, "title": str}, with_lineno=True):
            rows.append((line, rec["filepath"], rec["title"]))
    if not rows:
        raise UserError(f"{path}: no image-caption rows")
    images = [read_image((path.parent / rel) if not Path(rel).is_absolute() else Path(rel), image_size,
                         f"{path}:{line}") for line, rel, _ in rows]
    return np.stack(images), [t for _, _, t in rows]


# ---------------------------------------------------------------------------------------------------
# Tensors: images normalised, augmentation that keeps the caption true
# ---------------------------------------------------------------------------------------------------

def to_tensor(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float, normalised per channel."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def shift_ranges(items: list[Item], size: int, max_shift: int = 2) -> torch.Tensor:
    """(N, 4) int: per picture the shifts (dx_min, dx_max, dy_min, dy_max), within +-``max_shift`` pixels, that
    keep its centroid in its grid cell, so that a shifted picture's caption stays true. A third of easy-VQA's
    shapes lie within 2 pixels of a cell border; shifted freely, one augmented picture in nine would carry a
    caption with the wrong place."""
    cell = size / 3

    def bounds(centre: float, index: int) -> tuple[int, int]:
        # the cell is [index * cell, (index + 1) * cell); the outer cells reach past the picture's edges
        lo = -max_shift if index == 0 else max(-max_shift, math.ceil(index * cell - centre))
        hi = max_shift if index == 2 else min(max_shift, math.ceil((index + 1) * cell - centre) - 1)
        return lo, hi

    return torch.tensor([[*bounds(it.cx * size, COLS.index(it.col)), *bounds(it.cy * size, ROWS.index(it.row))]
                         for it in items])


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2, ranges: torch.Tensor | None = None
            ) -> torch.Tensor:
    """A random translation by up to ``max_shift`` pixels, edges repeated, drawn per picture from ``ranges``
    (shift_ranges: the shifts that keep it in its grid cell; None: any). Small enough that the shape keeps
    its size class. No flips (the caption says left or right), no crops that cut the shape, no colour jitter
    (the colour is in the caption)."""
    B, S = x.shape[0], x.shape[-1]
    if ranges is None:
        ranges = torch.tensor([-max_shift, max_shift] * 2).expand(B, 4)
    u = torch.rand(B, 2, generator=gen)
    lo, hi = ranges[:, 0::2], ranges[:, 1::2]  # (B, 2): x then y
    dx, dy = (lo + (u * (hi - lo + 1)).long().clamp(max=hi - lo)).unbind(1)
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    top, left = max_shift - dy, max_shift - dx  # the window moves against the content: content right = window left
    return torch.stack([padded[i, :, top[i]: top[i] + S, left[i]: left[i] + S] for i in range(B)])


@dataclass
class Pairs:
    """Images (N, 3, S, S) normalised, and per image the captions a batch may draw from (one per phrasing)
    and the facts zero-shot classification scores (None for your own data)."""

    pixels: torch.Tensor
    captions: list[list[str]]
    items: list[Item] | None = None


def load_data(data_file: str, valid_file: str, image_size: int) -> tuple[Pairs, Pairs]:
    """(train, held-out) pairs: your CSV/JSONL files, or easy-VQA's train and test splits."""
    if data_file:
        if not valid_file:
            raise UserError("--data-file needs --valid-file: the held-out pairs that retrieval is scored on")
        splits = [load_pairs_file(f, image_size) for f in (data_file, valid_file)]
        return tuple(Pairs(to_tensor(im, MEAN, STD), [[c] for c in caps]) for im, caps in splits)
    out = []
    for split in ("train", "test"):
        images, items = easy_vqa_split(split)
        if images.shape[1] != image_size:
            raise UserError(f"--image-size {image_size}: easy-vqa's pictures are {images.shape[1]} pixels square")
        out.append(Pairs(to_tensor(images, MEAN, STD), [it.captions() for it in items], items))
    return tuple(out)


def place_blind_recall(items: list[Item]) -> tuple[float, float]:
    """The retrieval R@1 (image->text, text->image; first phrasing, as scoring.retrieval) of a model that
    reads every caption word right except the place: among pictures that agree on shape, colour, size and
    tint it can only guess, so these are expectations over its guesses, not bounds. Image->text: 1 / (the
    distinct captions of the picture's group); text->image, per distinct caption: (its pictures) / (the
    pictures of its group). The goal R@1 >= 0.5 lies above both on easy-VQA's test split."""
    key = lambda it: (it.shape, it.color, it.size, it.tint)  # noqa: E731 (what the model reads)
    group = collections.defaultdict(list)  # key -> the first captions of its pictures
    for it in items:
        group[key(it)].append(it.caption())
    i2t = np.mean([1 / len(set(group[key(it)])) for it in items])
    firsts = {it.caption(): it for it in items}
    t2i = np.mean([group[key(it)].count(c) / len(group[key(it)]) for c, it in firsts.items()])
    return float(i2t), float(t2i)


def main() -> None:
    parse_no_flags(__doc__)
    for split in N_IMAGES:
        images, items = easy_vqa_split(split)
        caps = [it.caption() for it in items]
        count = collections.Counter(caps)
        bare = collections.Counter((it.size, it.color, it.shape, it.place) for it in items)  # without the tint
        unique = np.mean([count[c] == 1 for c in caps])
        unique_bare = np.mean([bare[it.size, it.color, it.shape, it.place] == 1 for it in items])
        print(f"easy-vqa {split}: {len(items)} images {images.shape[1]}x{images.shape[2]}, {len(count)} distinct "
              f"captions, {unique:.0%} of the pictures with a caption of their own ({unique_bare:.0%} without the "
              f"background); e.g. {items[0].captions()[:2]}")
        r = shift_ranges(items, images.shape[1]).float()
        kept = (r[:, 1] - r[:, 0] + 1) * (r[:, 3] - r[:, 2] + 1) / 25  # share of the 25 free shifts that keep the cell
        print(f"  {(kept < 1).float().mean():.0%} of the pictures lie within 2 pixels of a cell border; shifted "
              f"freely, {1 - kept.mean():.1%} of the shifted pictures would leave their cell")
        i2t, t2i = place_blind_recall(items)
        print(f"  a model blind to the place alone, guessing among ties, expects retrieval R@1 {i2t:.3f} "
              f"image->text, {t2i:.3f} text->image here")
    print(f"cache: {cache_dir()}")


if __name__ == "__main__":
    from common.cli import user_errors

    with user_errors():
        main()
