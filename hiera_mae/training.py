"""What the training scripts and infer.py share: the dataset defaults, the data check, the held-out scores (the
reconstruction loss, the accuracy), the reconstruction pictures, and carrying the MAE's encoder into a classifier.
The loops themselves stay in train_mae.py and train_finetune.py."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from common.checkpoint import load_pretrained, read_config
from common.config import apply_overrides, from_flat_dict, to_flat_dict
from common.errors import UserError

from .dataset import ImageSet, load_any, normalize, pixel_stats
from .model import HieraConfig, HieraForImageClassification, HieraForPreTraining, patchify, unpatchify

# what a dataset changes of the defaults (a flag given on the command line wins)
DATASET_DEFAULTS = {
    "mnist": {"flip": False},  # a mirrored 2 is not a 2
    # 64 px photos: Hiera's own stem (7 x 7 conv, stride 4) gives the same 16 x 16 token grid
    "textile": {"image_size": [64, 64], "num_channels": 3, "patch_size": [7, 7], "patch_stride": [4, 4],
                "patch_padding": [3, 3]},
    # clips of 8 x 32 x 32: 2 frames x 4 x 4 px per token (4 x 8 x 8 tokens), no pooling in time, mask units of
    # 1 x 4 x 4 tokens (16 units), 75 % of them dropped (Hiera's video MAE drops 90 % of many more units)
    "moving-mnist": {"image_size": [8, 32, 32], "patch_size": [3, 7, 7], "patch_stride": [2, 4, 4],
                     "patch_padding": [1, 3, 3], "query_stride": [1, 2, 2], "masked_unit_size": [1, 4, 4],
                     "mask_ratio": 0.75, "num_labels": 8, "flip": False},
}


def dataset_defaults(cfg, table: dict = DATASET_DEFAULTS):
    """cfg with its dataset's defaults applied to the fields still at their default (a value changed on the
    command line wins). Works for any of the chapter's training configs."""
    base, mine = to_flat_dict(type(cfg)()), to_flat_dict(cfg)
    todo = {k: v for k, v in table.get("" if cfg.data_dir else cfg.dataset, {}).items()
            if k in mine and mine[k] == base[k]}
    return apply_overrides(cfg, todo) if todo else cfg


def load_for(cfg) -> tuple[ImageSet, ImageSet, list[float], list[float]]:
    """The data a config asks for, checked against the model's input size, and its pixel statistics."""
    m = cfg.model
    train, test = load_any(cfg.dataset, cfg.data_dir, m.image_size[-1], m.num_channels, cfg.clips, cfg.seed)
    shape = tuple(train.images.shape[1:])
    want = (m.num_channels, *m.image_size)
    if shape != want:
        name = cfg.data_dir or cfg.dataset
        raise UserError(f"--image-size {' '.join(map(str, m.image_size))} --num-channels {m.num_channels}: {name} "
                        f"gives inputs of {shape} (channels, size); expected {want}")
    if len(train) < cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size}: {cfg.data_dir or cfg.dataset} has only {len(train)} "
                        "training images; expected at least one batch (lower --batch-size)")
    mean, std = pixel_stats(train.images)
    return train, test, mean, std


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices and conv kernels; none on biases, norms, tables and the mask token."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "position_embeddings" not in name and "mask_token" not in name else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.no_grad()
def heldout_loss(model: HieraForPreTraining, images: torch.Tensor, mean, std, seed: int, device,
                 batch_size: int = 256) -> dict[str, float]:
    """Held-out reconstruction scores, with masks drawn from ``seed`` (the same masks at every evaluation, so the
    curve shows the model, not the luck of the masks). All over the hidden patches only:

    - ``heldout_loss``: the training objective (MSE on normalised pixels), as transformers and Hiera define it;
    - ``zero_loss``: what predicting 0 scores on the same patches. About 1.0 on photos, but far less on
      silhouettes: an all-black patch has no variance, its normalised target is 0, and 0 is a perfect guess;
    - ``content_loss`` / ``content_share``: the MSE on the hidden patches that have content (pixel variance > 0),
      and their share of the hidden patches; ``content_zero_loss``: what predicting 0 scores there, (n - 1) / n
      for n values per patch (the unbiased variance): 0.984 for 8 x 8 grey patches. The fair reading of "below
      0.75, where predicting zero scores about 1.0" for data with a black background."""
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    n_units = math.prod(model.config.mask_spatial_shape)
    sums = {"heldout_loss": 0.0, "zero_loss": 0.0, "content_loss": 0.0, "content_zero_loss": 0.0}
    n_hidden = n_content = 0
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size], mean, std).to(device)
        noise = torch.rand(len(x), n_units, generator=g).to(device)
        out = model(x, noise=noise)
        hidden = ~out["token_mask"]
        target = model.targets(x)[hidden]
        err = (out["logits"][hidden] - target).pow(2).mean(-1)  # per hidden patch
        content = patchify(x, model.config.pred_stride)[hidden].var(-1) > 1e-8
        sums["heldout_loss"] += err.sum().item()
        zero = target.pow(2).mean(-1)  # predicting 0, per hidden patch
        sums["zero_loss"] += zero.sum().item()
        sums["content_loss"] += err[content].sum().item()
        sums["content_zero_loss"] += zero[content].sum().item()
        n_hidden += len(err)
        n_content += int(content.sum())
    model.train(was)
    return {"heldout_loss": sums["heldout_loss"] / n_hidden, "zero_loss": sums["zero_loss"] / n_hidden,
            "content_loss": sums["content_loss"] / max(1, n_content), "content_share": n_content / n_hidden,
            "content_zero_loss": sums["content_zero_loss"] / max(1, n_content)}


def score_line(h: dict[str, float]) -> str:
    return (f"held-out masked-unit loss {h['heldout_loss']:.4f} (predicting 0: {h['zero_loss']:.4f}) | on patches "
            f"with content {h['content_loss']:.4f} ({100 * h['content_share']:.0f} % of them; predicting 0: "
            f"{h.get('content_zero_loss', float('nan')):.3f})")


@torch.no_grad()
def draw_reconstructions(model: HieraForPreTraining, images: torch.Tensor, mean, std, path: Path, seed: int = 0,
                         title: str = "") -> Path:
    """Rows of input / masked input / reconstruction (the visible patches pasted back) for a few held-out
    images; a clip shows its frames side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    x = normalize(images, mean, std).to(device)
    noise = torch.rand(len(x), math.prod(model.config.mask_spatial_shape),
                       generator=torch.Generator().manual_seed(seed)).to(device)
    out = model(x, noise=noise)
    recon = model.reconstruct(x, out["logits"], out["token_mask"]).cpu()
    cfg = model.config
    per_patch = out["token_mask"][..., None].expand_as(out["logits"]).float()  # 1 on a visible patch's pixels
    visible = unpatchify(per_patch, cfg.pred_stride, model.decoder.final_grid, cfg.num_channels).cpu().bool()
    model.train(was)
    s = torch.tensor(std).view(1, -1, *[1] * (x.ndim - 2))
    m = torch.tensor(mean).view(1, -1, *[1] * (x.ndim - 2))

    def show(t: torch.Tensor):  # (ch, [T,] H, W) normalised -> (H, T * W [, 3]) in [0, 1]
        t = (t * s[0] + m[0]).clamp(0, 1)
        if t.ndim == 4:  # a clip: frames side by side
            t = torch.cat(list(t.unbind(1)), dim=-1)
        return t[0].numpy() if t.shape[0] == 1 else t.permute(1, 2, 0).numpy()

    grey = (0.5 - m) / s  # hidden patches drawn mid-grey
    rows = [("input", x.cpu()), ("masked", torch.where(visible, x.cpu(), grey.expand_as(x).cpu())),
            ("reconstruction", recon)]
    n = len(x)
    wide = x.ndim == 5
    fig, axes = plt.subplots(3, n, figsize=(1.4 * n * (images.shape[2] if wide else 1) / (2 if wide else 1),
                                            4.4), squeeze=False)
    for r, (label, batch) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(show(batch[c]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


ARCHITECTURE = ("image_size", "num_channels", "embed_dim", "patch_size", "patch_stride", "patch_padding",
                "mlp_ratio", "depths", "num_heads", "embed_dim_multiplier", "num_query_pool", "query_stride",
                "masked_unit_size", "masked_unit_attention", "layer_norm_eps")


def model_config(cfg, n_classes: int) -> HieraConfig:
    """The classifier's config: the architecture from --init's config.json (unless --scratch), the head from
    the data."""
    values = to_flat_dict(cfg.model)
    if not cfg.scratch:
        saved = read_config(cfg.init) if Path(cfg.init, "config.json").is_file() else None
        if saved is None:
            raise UserError(f"--init {cfg.init}: no config.json there; run train_mae.py first (or pass --scratch)")
        values.update({k: saved[k] for k in ARCHITECTURE if k in saved})
    values["num_labels"] = n_classes
    return from_flat_dict(HieraConfig, values)


def load_encoder(model: HieraForImageClassification, init: str) -> None:
    """Copy the MAE's encoder (``hiera.*``) into the classifier; the decoder, the fusion heads and the encoder
    norm are left behind, the pooler's norm and the classifier start fresh: exactly those keys, or an error."""
    mae = HieraForPreTraining(config_from_dir(init))  # as it was built: its decoder is not the classifier's business
    load_pretrained(mae, init)
    state = {k: v for k, v in mae.state_dict().items() if k.startswith("hiera.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh = {k for k in model.state_dict() if k.startswith(("hiera.pooler.", "classifier."))}
    if set(missing) != fresh or unexpected:
        raise UserError(f"--init {init}: the encoder does not fit (missing {sorted(set(missing) - fresh)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")


@torch.no_grad()
def accuracy(model: HieraForImageClassification, images: torch.Tensor, labels: torch.Tensor, mean, std, device,
             batch_size: int = 256) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy over a split, and the predictions."""
    was = model.training
    model.eval()
    preds = torch.cat([model(normalize(images[i:i + batch_size], mean, std).to(device)).argmax(-1).cpu()
                       for i in range(0, len(images), batch_size)])
    model.train(was)
    return (preds == labels).float().mean().item(), preds


def plot_heldout(rows: list[dict], png: Path) -> Path:
    """The MAE's curves: the training loss, the held-out loss on all hidden patches and on those with content, and
    what predicting zero scores on each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    held = [r for r in rows if "heldout_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.6, label="training loss (hidden patches)")
    if held:
        steps = [r["step"] for r in held]
        ax.plot(steps, [r["heldout_loss"] for r in held], "o-", label="held-out, all hidden patches")
        ax.plot(steps, [r["content_loss"] for r in held], "s-", label="held-out, patches with content")
        ax.axhline(held[-1]["zero_loss"], ls="--", c="gray", lw=0.8, label="predicting 0, all hidden patches")
        if "content_zero_loss" in held[-1]:  # (n - 1) / n, n values per patch
            ax.axhline(held[-1]["content_zero_loss"], ls=":", c="gray", lw=0.8,
                       label="predicting 0, patches with content")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE on normalised pixels")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


def step_batch(n: int, cfg, step: int, rank: int, world: int) -> tuple[torch.Tensor, slice, torch.Generator]:
    """Step ``step``'s batch of a split of ``n`` items: the indices (a fresh permutation each epoch, from the seed),
    this rank's slice of them, and the generator its shifts, flips and masks are drawn from. All depend on
    (seed, step) only, drawn for the whole batch and then sliced: a resumed run sees the same data, and so does
    any number of processes."""
    steps_per_epoch = max(1, n // cfg.batch_size)
    epoch, pos = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    batch = order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
    local = cfg.batch_size // world
    return batch, slice(rank * local, (rank + 1) * local), torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)


def config_from_dir(path: str) -> HieraConfig:
    """The HieraConfig a final/ directory's config.json describes (its other entries ignored)."""
    saved = read_config(path)
    fields = set(to_flat_dict(HieraConfig()))
    return from_flat_dict(HieraConfig, {k: v for k, v in saved.items() if k in fields})
