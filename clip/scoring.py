"""What a trained CLIP can do without further training: zero-shot classification and retrieval.

Zero-shot (paper sec. 3.1.2): a class becomes text, "a small red circle ...", and an image is given the class
whose text embedding is nearest its image embedding. Prompt ensembling (sec. 3.1.4): each class is many
prompts, and its text feature the mean of their normalised features (renormalised).

Retrieval: every held-out image against every distinct caption (one phrasing, the first template).
image -> text: the image's own caption among all distinct captions; text -> image: a caption's images among
all images, a hit when any image the caption describes is in the top k (several images can share a caption,
and the caption is equally true of each). Recall@1/5/10 and the median rank, both ways.
"""

from __future__ import annotations

import collections
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

from common.checkpoint import load_pretrained, read_config
from common.runtime import autocast

from .dataset import COLORS, COLS, ROWS, SHAPES, SIZES, TEMPLATES, TINTS, place_name
from .model import CLIPConfig, CLIPModel
from .tokenizer import encode

# Prompts per class: the first caption template with the class filled in and every value of the attributes
# the class does not name (size, place, and colour or shape) filled in turn, the background tint cycling
# through its six values, so that a class's feature is its mean over all of them (prompt ensembling, with
# the nuisance attributes averaged out): 27 prompts per shape+colour class.
PLACES = tuple(place_name(r, c) for r in ROWS for c in COLS)


def _prompts(**fixed: str) -> tuple[str, ...]:
    """Template 0 for every combination of the attributes not in ``fixed`` ({shape}/{color} stay as fields)."""
    out = []
    for size, place in itertools.product(SIZES, [fixed["place"]] if "place" in fixed else PLACES):
        where = "in the middle" if place == "middle" else f"in the {place}"
        for color in ([fixed["color"]] if "color" in fixed else COLORS):
            for shape in ([fixed["shape"]] if "shape" in fixed else SHAPES):
                tint = TINTS[len(out) % len(TINTS)]
                out.append(TEMPLATES[0].format(size=size, color=color, shape=shape, where=where, tint=tint))
    return tuple(out)


JOINT_PROMPTS = _prompts(shape="{shape}", color="{color}")


def place_prompts(place: str) -> tuple[str, ...]:
    """The prompts of one grid cell: template 0 with every size, colour and shape (72), the tint cycling."""
    return _prompts(place=place)


def load_model(ckpt: str | Path, device) -> tuple[CLIPModel, object]:
    """A trained CLIP (train_clip.py's final/, or an imported one) and its tokenizer."""
    from transformers import AutoTokenizer

    ckpt = Path(ckpt)
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(2, "no CLIP here (config.json missing): train one with python -m clip.train_clip",
                                str(ckpt))
    model = load_pretrained(CLIPModel(CLIPConfig.from_dict(read_config(ckpt))), ckpt).to(device).eval()
    return model, AutoTokenizer.from_pretrained(str(ckpt / "tokenizer"))


@torch.no_grad()
def image_features(model, pixels: torch.Tensor, device, dtype, batch_size: int = 250) -> torch.Tensor:
    """(N, E) normalised image embeddings, in batches."""
    model.eval()
    feats = []
    for i in range(0, len(pixels), batch_size):
        with autocast(device, dtype):
            feats.append(model.get_image_features(pixels[i:i + batch_size].to(device)).float())
    return F.normalize(torch.cat(feats), dim=-1)


@torch.no_grad()
def text_features(model, tok, texts: list[str], device, dtype, batch_size: int = 500) -> torch.Tensor:
    """(N, E) normalised caption embeddings, in batches."""
    model.eval()
    feats = []
    for i in range(0, len(texts), batch_size):
        ids, mask = encode(tok, texts[i:i + batch_size], model.config.max_position_embeddings)
        with autocast(device, dtype):
            feats.append(model.get_text_features(ids.to(device), mask.to(device)).float())
    return F.normalize(torch.cat(feats), dim=-1)


def class_features(model, tok, prompts: tuple[str, ...], classes: list[dict], device, dtype) -> torch.Tensor:
    """(K, E): per class, the renormalised mean of its prompts' normalised features (prompt ensembling)."""
    texts = [p.format(**c) for c in classes for p in prompts]
    f = text_features(model, tok, texts, device, dtype).view(len(classes), len(prompts), -1).mean(1)
    return F.normalize(f, dim=-1)


def zero_shot(model, tok, img: torch.Tensor, items: list, device, dtype) -> dict[str, float | list]:
    """Accuracy of shape+colour (24-way), and of shape (3-way) and colour (8-way) alone, from prompts only;
    and the 24-way predictions (for the confusion matrix). The 24 classes are scored as CLIP scores classes,
    p(class | image) = softmax over the classes of exp(t) cos(image, class); shape and colour are its
    marginals (p(circle) = the sum over colours of p(circle, colour)), so all three come from one head."""
    classes = [{"shape": s, "color": c} for s in SHAPES for c in COLORS]
    logits = model.logit_scale.exp().item() * img @ class_features(model, tok, JOINT_PROMPTS, classes, device,
                                                                   dtype).t()
    p = logits.softmax(-1).view(-1, len(SHAPES), len(COLORS)).cpu()  # (N, shape, colour)
    shape = torch.tensor([SHAPES.index(it.shape) for it in items])
    color = torch.tensor([list(COLORS).index(it.color) for it in items])
    joint = p.flatten(1).argmax(-1)
    # where the shape is: 9 cells, each the mean of its prompts over the other words (a separate head)
    cells = F.normalize(torch.stack([text_features(model, tok, list(place_prompts(pl)), device, dtype).mean(0)
                                     for pl in PLACES]), dim=-1)
    place = torch.tensor([PLACES.index(it.place) for it in items])
    return {"zero_shot_shape_acc": (p.sum(2).argmax(-1) == shape).float().mean().item(),
            "zero_shot_color_acc": (p.sum(1).argmax(-1) == color).float().mean().item(),
            "zero_shot_joint_acc": (joint == shape * len(COLORS) + color).float().mean().item(),
            "zero_shot_place_acc": ((img @ cells.t()).argmax(-1).cpu() == place).float().mean().item(),
            "joint_predictions": joint.tolist()}


def ranks(scores: torch.Tensor, relevant: list[list[int]]) -> torch.Tensor:
    """For each query row of ``scores`` (Q, N): 1 + how many candidates score above its best relevant one."""
    best = torch.stack([scores[q, rel].max() for q, rel in enumerate(relevant)])
    return 1 + (scores > best[:, None]).sum(-1)


def recall_figures(r: torch.Tensor, prefix: str) -> dict[str, float]:
    return {**{f"{prefix}_recall_at_{k}": (r <= k).float().mean().item() for k in (1, 5, 10)},
            f"{prefix}_median_rank": r.float().median().item()}


def retrieval(img: torch.Tensor, txt: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """img (N, E) and txt (U, E) for the U distinct captions in ``sorted(set(captions))`` order."""
    distinct = sorted(set(captions))
    index = {c: j for j, c in enumerate(distinct)}
    own = [index[c] for c in captions]
    sims = img @ txt.t()  # (N, U)
    images_of = [[] for _ in distinct]
    for i, j in enumerate(own):
        images_of[j].append(i)
    return {**recall_figures(ranks(sims, [[j] for j in own]), "i2t"),
            **recall_figures(ranks(sims.t(), images_of), "t2i"), "distinct_captions": float(len(distinct))}


ATTRIBUTES = ("shape", "color", "size", "row", "col", "tint")  # the facts a caption states (dataset.Item)


def i2t_misses(img: torch.Tensor, txt: torch.Tensor, items: list) -> dict[str, int]:
    """Where image -> text retrieval fails: for each picture whose best caption is not its own, the caption
    words it got wrong (the attributes in which that caption's pictures differ from it), counted, most common
    first, e.g. {"row+col": 207, "col": 120}. img (N, E); txt (U, E) for the distinct first captions, sorted."""
    captions = [it.caption() for it in items]
    distinct = sorted(set(captions))
    facts = {it.caption(): it for it in items}  # a caption fixes every attribute, so any of its pictures will do
    best = (img @ txt.t()).argmax(-1).tolist()
    wrong = collections.Counter()
    for it, cap, j in zip(items, captions, best):
        if distinct[j] != cap:
            wrong["+".join(a for a in ATTRIBUTES if getattr(it, a) != getattr(facts[distinct[j]], a))] += 1
    return dict(wrong.most_common())


def evaluate(model, tok, data, device, dtype) -> dict:
    """Zero-shot (easy-VQA only: it needs the labels) and retrieval on ``data`` (dataset.Pairs), with a
    one-line summary under "line"."""
    was_training = model.training
    img = image_features(model, data.pixels, device, dtype)
    captions = [caps[0] for caps in data.captions]
    txt = text_features(model, tok, sorted(set(captions)), device, dtype)
    res = retrieval(img, txt, captions)
    if data.items is not None:
        res.update(zero_shot(model, tok, img, data.items, device, dtype))
        res["image_to_text_misses"] = i2t_misses(img, txt, data.items)
    model.train(was_training)
    line = (f"retrieval R@1 image->text {res['i2t_recall_at_1']:.3f}, text->image {res['t2i_recall_at_1']:.3f} "
            f"(R@10 {res['i2t_recall_at_10']:.3f} / {res['t2i_recall_at_10']:.3f})")
    if "zero_shot_shape_acc" in res:
        line += (f" | zero-shot shape {res['zero_shot_shape_acc']:.1%}, colour {res['zero_shot_color_acc']:.1%}, "
                 f"both {res['zero_shot_joint_acc']:.1%}, place {res['zero_shot_place_acc']:.1%}")
    return {**res, "line": line}
