"""Self-distillation with no labels: a student learns to match an EMA teacher across views of one image.

    python -m dinov2.train_dino                              # animal-mnist, about 13 minutes on 2 CPU cores
    python -m dinov2.train_dino --dataset mnist --no-flip
    python -m dinov2.train_dino --centering centering        # running-mean centring instead of Sinkhorn-Knopp
    python -m dinov2.train_dino --ibot-weight 0 --koleo-weight 0                 # DINO alone
    python -m dinov2.train_dino --data-dir photos/ --num-channels 3       # your own images
    torchrun --nproc_per_node 2 -m dinov2.train_dino         # DDP: each rank crops its share of the batch

The losses (DINOv2 sec. 4; names as in facebookresearch/dinov2/dinov2/loss/):
- DINO: for every pair (teacher global view i, student view j != i), the cross-entropy
  -sum_k P_t(i)_k log P_s(j)_k between the teacher's sharpened, centred distribution over K prototypes and the
  student's: the student learns that a 12 px corner of the image means what the whole image means.
- iBOT: the student sees its global views with some patches replaced by a mask token and predicts, at each
  masked patch, the teacher's distribution for the unmasked patch there (a second head, its own centre).
- KoLeo: -mean log(distance to the nearest neighbour) of the student's L2-normalised [CLS] features within the
  batch: spreads the features out (Sablayrolles et al. 2019).
Collapse is what self-distillation fears: the teacher can output one prototype for every image (entropy 0) or
the uniform distribution (entropy ln K), and the student matches it perfectly. Centering (subtract a running mean
of the teacher's logits) fights the first, sharpening (teacher temperature 0.04-0.07 < the student's 0.1) the
second; Sinkhorn-Knopp (``--centering sinkhorn_knopp``) instead makes every prototype equally used in the batch.

Writes to ``--out-dir``: checkpoints/, final/ (the teacher's backbone as a transformers Dinov2 directory, with the
data's pixel statistics), metrics.jsonl (every loss apart, the collapse monitors), loss.png, monitors.png,
train_summary.json and results.json.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import atomic_write_text, resume_or_start, resume_point, save_checkpoint, save_pretrained
from common.cli import run_main
from common.config import to_flat_dict
from common.data import evenly_spaced
from common.distributed import all_reduce_mean, cleanup, init_distributed, wrap
from common.errors import UserError
from common.results import command_line, make_record
from common.runtime import autocast, pick_device, pick_dtype, seed_everything, set_threads
from common.schedule import clip_grad

from .dataset import CropConfig, ImageSet, batch_masks, load_data, multi_crop, pixel_stats, view_transforms
from .eval_knn import evaluate_backbone, extract_features, knn_accuracy, labelled, pixel_features
from .model import MODEL_PRESETS, DinoHeadConfig, DinoStudent, Dinov2Config, Dinov2Model


@dataclass
class TrainConfig:
    """DINO + iBOT + KoLeo from random weights. DINOv2's values (configs/ssl_default_config.yaml) where they
    carry over; the sizes and the schedule lengths scaled to minutes on a CPU."""

    model: Dinov2Config = field(default_factory=lambda: Dinov2Config(**MODEL_PRESETS["cpu"]))
    head: DinoHeadConfig = field(default_factory=DinoHeadConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    # data (labels are used by the evaluation only)
    dataset: str = "animal-mnist"  # animal-mnist, mnist or textile (dataset.py)
    data_dir: str = ""  # your own image folder instead (class sub-folders give the evaluation its labels)
    # the losses
    dino_weight: float = 1.0
    ibot_weight: float = 1.0  # 0 = no iBOT (no masks, no patch head)
    koleo_weight: float = 0.3  # DINOv2's is 0.1; 0.3 scored best of 0.1-2 with Sinkhorn-Knopp here, by about the
    # seed spread (README)
    separate_ibot_head: bool = True  # iBOT's own head (DINOv2's large runs); False shares the DINO head
    centering: str = "sinkhorn_knopp"  # or centering (running-mean softmax centring). DINOv2's published recipes
    # (configs/train/vitl14.yaml, vitg14.yaml) use Sinkhorn-Knopp; here it spreads the images over ~27 % of the
    # prototypes, centring over ~5 %, at the same k-NN (README, the ablation)
    center_momentum: float = 0.9  # the running mean's momentum
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # after the warm-up. DINOv2 rises to 0.07; here that drifted the targets towards
    # uniform within 100 steps (README, lesson 1), so the default holds 0.04 (DINO's own choice in its paper)
    warmup_teacher_temp: float = 0.04  # at step 0 (a warm-up from a lower value: --warmup-teacher-temp 0.02)
    teacher_temp_warmup: float = 0.3  # share of the run over which the teacher temperature rises (DINOv2: 30 of
    # 100 epochs)
    mask_ratio_min: float = 0.1  # iBOT: each masked image hides 10-50 % of its patches, in blocks
    mask_ratio_max: float = 0.5
    mask_probability: float = 0.5  # share of the global views that are masked at all
    # the teacher
    momentum_teacher: float = 0.992  # EMA momentum at step 0, rising to 1.0 by a cosine (DINOv2's)
    # optimisation (AdamW; DINOv2: lr 0.004 * sqrt(batch / 1024), wd 0.04 -> 0.2, clip 3.0)
    batch_size: int = 64  # images per step (summed over ranks); each gives 2 + n_local views
    max_iters: int = 750  # optimizer steps: under 15 minutes on 2 cores with the evaluations (850 took 989 s, and
    # the k-NN score flattens after about 500 steps: README, lesson 2)
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    warmup_iters: int = 60
    weight_decay: float = 0.04  # at step 0, on matrices only
    weight_decay_end: float = 0.2  # at the end (cosine)
    grad_clip: float = 3.0
    freeze_last_layer_iters: int = -1  # steps the prototypes stay fixed (-1 = one epoch, DINOv2's)
    # runtime
    dtype: str = "auto"
    device: str = "auto"
    threads: int = 0
    seed: int = 1234
    eval_every: int = 250  # steps between k-NN evaluations and collapse monitors (each scores 10,000 images)
    eval_images: int = 0  # score k-NN on this many evenly spaced images of each split (0 = all)
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    out_dir: str = "runs/dinov2/train"
    resume: bool = False
    run_name: str = ""  # names the records in doc/results.json ("" = dino_<dataset>_cpu)


PRESETS = {
    "cpu": {},
    "gpu4gb": {**MODEL_PRESETS["gpu4gb"], "batch_size": 256, "max_iters": 5000, "warmup_iters": 500,
               "eval_every": 500, "save_every": 500, "hidden_dim": 2048, "bottleneck_dim": 256,
               "num_prototypes": 8192, "n_local": 8},
}
DATASET_DEFAULTS = {  # what each dataset changes of the defaults (a flag given on the command line wins)
    "mnist": {"flip": False},  # a mirrored 2 or 7 is not a digit
    # 64 px grey photos: 8 px patches (an 8 x 8 grid), 24 px local crops, and solarization (it keeps a photo a
    # photo; it blanks a silhouette)
    "textile": {"image_size": 64, "patch_size": 8, "num_channels": 3, "global_size": 64, "local_size": 24,
                "solarize": True},
}


def dataset_defaults(cfg: TrainConfig) -> TrainConfig:
    """cfg with its dataset's DATASET_DEFAULTS applied to the fields still at TrainConfig's default (a value
    changed on the command line wins)."""
    from common.config import apply_overrides

    base, mine = to_flat_dict(TrainConfig()), to_flat_dict(cfg)
    todo = {k: v for k, v in DATASET_DEFAULTS.get("" if cfg.data_dir else cfg.dataset, {}).items()
            if mine[k] == base[k]}
    return apply_overrides(cfg, todo) if todo else cfg


# ---------------------------------------------------------------------------------------------------
# Centering: the teacher's targets
# ---------------------------------------------------------------------------------------------------

def softmax_center(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """DINO's target: softmax((t - c) / temp) over the K prototypes. (N, K) -> (N, K)."""
    return F.softmax((teacher_logits - center) / temp, dim=-1)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float, dist_info=None) -> None:
    """c <- m c + (1 - m) mean_n t_n, the mean over the whole (global) batch: the centre is the same on every
    rank. In place."""
    total = teacher_logits.float().sum(0, keepdim=True)
    count = torch.tensor(float(len(teacher_logits)), device=teacher_logits.device)  # on the logits' device: NCCL
    if dist_info is not None and dist_info.enabled:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    if count > 0:  # a step where no image drew a mask has no patch to average (the centre stays)
        center.mul_(momentum).add_(total / count, alpha=1 - momentum)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iters: int = 3, dist_info=None) -> torch.Tensor:
    """SwAV's equipartition (Caron et al. 2020, alg. 1; DINOv2's ``sinkhorn_knopp_teacher``): Q = exp(t / temp),
    then alternately scale the rows (prototypes) to sum 1/K and the columns (samples) to sum 1/N, so every
    prototype gets an equal share of the batch. Returns (N, K) targets whose rows sum to 1. Under torchrun the
    sums run over the global batch."""
    Q = torch.exp(teacher_logits.float() / temp).t()  # (K, N)
    K = Q.shape[0]
    N = torch.tensor(float(Q.shape[1]), device=Q.device)
    enabled = dist_info is not None and dist_info.enabled
    if enabled:
        torch.distributed.all_reduce(N)
    total = Q.sum()
    if enabled:
        torch.distributed.all_reduce(total)
    Q /= total
    for _ in range(n_iters):
        rows = Q.sum(1, keepdim=True)  # each prototype's share
        if enabled:
            torch.distributed.all_reduce(rows)
        Q /= rows * K
        Q /= Q.sum(0, keepdim=True) * N  # each sample's (local: a column lives on one rank)
    return (Q * N).t()


# ---------------------------------------------------------------------------------------------------
# The three losses
# ---------------------------------------------------------------------------------------------------

def dino_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    r"""Cross-entropy between every teacher global view and every *other* student view, averaged over the pairs
    and the images. student_logits (V, B, K) with the 2 global views first; teacher_probs (2, B, K).

    $$\mathcal{L}_{DINO} = -\frac{1}{|P| B} \sum_{(t, s) \in P} \sum_{b=1}^{B}
    \sum_k p^{(t)}_{b,k} \log \mathrm{softmax}\left(z^{(s)}_b / \tau_s\right)_k,
    \quad P = \{(t, s) : t \in \text{global views}, s \neq t\}$$"""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)  # (V, B, K)
    # ce[i, j] = mean_b -sum_k P_t(i) log P_s(j)                             (2, V)
    ce = -torch.einsum("ibk,jbk->ij", teacher_probs, log_p) / student_logits.shape[1]
    same_view = torch.eye(teacher_probs.shape[0], student_logits.shape[0], dtype=torch.bool, device=ce.device)
    return ce[~same_view].mean()


def ibot_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor, student_temp: float
              ) -> torch.Tensor:
    """Cross-entropy at the masked patches: student_logits and teacher_probs (M, K) for the M masked patches of
    masks (n, N) in row order. Each image's patches are averaged (an image with 5 masked patches counts as much
    as one with 20), then summed over the images and divided by all n views, masked or not (the reference's
    normalisation, so the loss does not depend on how many images drew a mask)."""
    ce = -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)  # (M,)
    weight = (1.0 / masks.sum(1).clamp(min=1)).unsqueeze(1).expand_as(masks)[masks]  # (M,)
    return (ce * weight).sum() / masks.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Kozachenko-Leonenko entropy estimate, up to constants: -mean_i log ||z_i - z_nn(i)|| of the normalised
    features z (B, C). Large when two images land on the same point, so minimising it spreads the batch over the
    sphere (DINOv2 sec. 4, ``KoLeoLoss``; nn.PairwiseDistance's eps inside the norm, as the reference).

    $$\mathcal{L}_{KoLeo} = -\frac{1}{n} \sum_{i=1}^{n} \log \min_{j \neq i} \lVert z_i - z_j \rVert$$"""
    z = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sim = z @ z.t()
        sim.fill_diagonal_(-2.0)  # never one's own neighbour
        nn_idx = sim.argmax(1)
    dist = (z - z[nn_idx] + eps).norm(dim=-1)
    return -torch.log(dist + eps).mean()


# ---------------------------------------------------------------------------------------------------
# Schedules (functions of the step: a resumed run computes the same values)
# ---------------------------------------------------------------------------------------------------

def cosine(start: float, end: float, step: int, total: int) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


def teacher_temp_at(cfg: TrainConfig, step: int) -> float:
    warm = int(cfg.teacher_temp_warmup * cfg.max_iters)
    if step >= warm:
        return cfg.teacher_temp
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / warm


# ---------------------------------------------------------------------------------------------------
# The pair
# ---------------------------------------------------------------------------------------------------

class DinoPair(nn.Module):
    """Everything a checkpoint holds: student, teacher, and the two centres."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        # no iBOT head when iBOT is off: an unused head would stall DDP, whose reducer waits for every gradient
        self.student = DinoStudent(cfg.model, cfg.head, cfg.separate_ibot_head and cfg.ibot_weight > 0)
        self.teacher = copy.deepcopy(self.student)  # same architecture, same start (DINO sec. 3.1)
        self.teacher.requires_grad_(False)
        self.register_buffer("dino_center", torch.zeros(1, cfg.head.num_prototypes))
        self.register_buffer("ibot_center", torch.zeros(1, cfg.head.num_prototypes))

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """theta_t <- m theta_t + (1 - m) theta_s for every weight (backbone and heads)."""
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


def student_forward(student: DinoStudent, globals_: torch.Tensor, masks: torch.Tensor | None,
                    locals_: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One call through the (DDP-wrapped) student, so DDP sees one forward per backward."""
    return student(globals_, masks, locals_)


@torch.no_grad()
def collapse_monitors(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float, centering: str) -> dict:
    """Of the teacher's targets on a set of images (N, K):
    - teacher_entropy: mean per-image entropy in nats (0 = each image one prototype; ln K = uniform targets)
    - kl_to_uniform: ln K - H(mean target), how unevenly the prototypes are used across images (0 = evenly;
      ln K = every image the same prototype: the collapse centering prevents)
    - prototypes_used: share of the K prototypes that are some image's most likely one."""
    K = teacher_logits.shape[-1]
    if centering == "sinkhorn_knopp":
        p = sinkhorn_knopp(teacher_logits, temp)
    else:
        p = softmax_center(teacher_logits.float(), center, temp)
    h = -(p * p.clamp_min(1e-12).log()).sum(-1).mean().item()
    marginal = p.mean(0)
    kl = math.log(K) + (marginal * marginal.clamp_min(1e-12).log()).sum().item()
    used = p.argmax(-1).unique().numel() / K
    return {"teacher_entropy": h, "kl_to_uniform": kl, "prototypes_used": used, "ln_k": math.log(K)}


def evaluate(pair: DinoPair, train, test, mean, std, cfg: TrainConfig, step: int, device) -> dict:
    """k-NN of the teacher's backbone on the held-out split, and the collapse monitors on its images."""
    size = cfg.model.image_size
    teacher = pair.teacher
    res = evaluate_backbone(teacher.backbone, train, test, mean, std, size)
    cls = extract_features(teacher.backbone, test.images, mean, std, size)["cls"].to(device)
    with torch.no_grad():
        logits = teacher.dino_head(cls.to(next(teacher.parameters()).dtype))
    mon = collapse_monitors(logits, pair.dino_center, teacher_temp_at(cfg, step), cfg.centering)
    res.update(mon)
    knn = f"k-NN {100 * res['knn_top1_k20']:.1f} % | " if "knn_top1_k20" in res else ""
    res["line"] = (f"{knn}teacher entropy {mon['teacher_entropy']:.2f} of ln K {mon['ln_k']:.2f} | KL to uniform "
                   f"{mon['kl_to_uniform']:.2f} | prototypes used {100 * mon['prototypes_used']:.1f} %")
    return res


def decay_groups(model: nn.Module) -> list[dict]:
    """AdamW groups: weight decay (scheduled) on the layers' matrices; none on gains, biases, LayerScale, tokens,
    positions, nor on the prototypes (they are normalised before use: decay would change their step size only).
    Departure: the patch embedding's matrix is not decayed either (the reference decays it); every figure in the
    README was measured this way, so it stays until they are measured again."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not name.startswith("backbone.embeddings.") and "prototypes" not in name
             else no_decay).append(p)
    return [{"params": decay, "weight_decay": 0.0, "decay": True}, {"params": no_decay, "weight_decay": 0.0}]


def plot_monitors(metrics: list[dict], png: Path) -> Path | None:
    """The collapse monitors against the step (README's picture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in metrics if "teacher_entropy" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8), dpi=100)
    axes[0].plot(steps, [r["teacher_entropy"] for r in rows], "o-", label="teacher entropy")
    axes[0].axhline(rows[-1]["ln_k"], color="grey", ls="--", label="ln K (uniform)")
    axes[0].axhline(0, color="grey", ls=":", label="0 (one prototype)")
    axes[0].set_title("teacher entropy (nats)")
    axes[0].legend(fontsize=7)
    axes[1].plot(steps, [r["kl_to_uniform"] for r in rows], "o-")
    axes[1].set_title("KL(mean target || uniform)")
    axes[2].plot(steps, [100 * r["prototypes_used"] for r in rows], "o-", label="prototypes used %")
    if "knn_top1_k20" in rows[0]:
        axes[2].plot(steps, [100 * r["knn_top1_k20"] for r in rows], "s-", label="k-NN top-1 %")
    axes[2].set_title("prototypes used, k-NN (%)")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def main(cfg: TrainConfig) -> dict:
    dist_info = init_distributed(pick_device(cfg.device).type)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    cfg = dataset_defaults(cfg)
    if cfg.centering not in ("centering", "sinkhorn_knopp"):
        raise UserError(f"--centering {cfg.centering}: expected centering or sinkhorn_knopp")
    if not 0 <= cfg.mask_probability <= 1 or not 0 <= cfg.mask_ratio_min <= cfg.mask_ratio_max <= 1:
        raise UserError(f"--mask-probability {cfg.mask_probability}, --mask-ratio-min {cfg.mask_ratio_min}, "
                        f"--mask-ratio-max {cfg.mask_ratio_max}: expected values in [0, 1] with min <= max")
    if cfg.batch_size % dist_info.world_size:
        raise UserError(f"--batch-size {cfg.batch_size}: expected a multiple of the {dist_info.world_size} processes")
    for name in ("global_size", "local_size"):
        if getattr(cfg.crops, name) % cfg.model.patch_size:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg.crops, name)}: expected a multiple of "
                            f"--patch-size {cfg.model.patch_size}")
    if cfg.crops.global_size != cfg.model.image_size:
        raise UserError(f"--global-size {cfg.crops.global_size}: expected --image-size "
                        f"{cfg.model.image_size} (the position table is learned at the global crop's size)")
    out = Path(cfg.out_dir)
    name = cfg.data_dir or cfg.dataset
    run_name = cfg.run_name or f"dino_{Path(name).name.replace('-', '_')}_cpu"
    data_size = 64 if cfg.dataset == "textile" and not cfg.data_dir else cfg.model.image_size
    train, test = load_data(cfg.dataset, cfg.data_dir, data_size, cfg.model.num_channels)
    if train.images.shape[1] != cfg.model.num_channels:
        raise UserError(f"--num-channels {cfg.model.num_channels}: {name} has {train.images.shape[1]}-channel "
                        f"images; pass --num-channels {train.images.shape[1]}")
    if len(train) < cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size}: {name} has only {len(train)} training images; expected "
                        f"at least one batch (lower --batch-size)")
    mean, std = pixel_stats(train.images)
    transforms = view_transforms(cfg.crops, mean, std)
    ev_train, ev_test = (train, test) if not cfg.eval_images else (subset(train, cfg.eval_images),
                                                                   subset(test, cfg.eval_images))
    pair = DinoPair(cfg).to(device)
    if dist_info.is_main:
        print(f"data: {name}, {len(train)} train / {len(test)} held-out images {tuple(train.images.shape[1:])} | "
              f"backbone {pair.student.backbone.num_parameters() / 1e6:.2f} M | K {cfg.head.num_prototypes} | "
              f"views 2 x {cfg.crops.global_size} px + {cfg.crops.n_local} x {cfg.crops.local_size} px | "
              f"{device} {dtype}", flush=True)
    net = wrap(pair.student, dist_info, "ddp", ())
    optimizer = torch.optim.AdamW(decay_groups(pair.student), lr=cfg.lr, betas=(0.9, 0.999))
    ckpt_root = out / "checkpoints"
    resume_from = resume_point(ckpt_root, cfg.resume, dist_info.is_main)
    scheduler, start, logger = resume_or_start(pair, optimizer, cfg, out, resume_from, device, cfg.min_lr_ratio,
                                               is_main=dist_info.is_main)
    first = None
    if start == 0 and dist_info.is_main:
        first = evaluate(pair, ev_train, ev_test, mean, std, cfg, 0, device)
        logger.log({"step": 0, **{k: v for k, v in first.items() if k != "line"}})
        logger.write(f"step 0 | {first['line']}")
    local_bs = cfg.batch_size // dist_info.world_size
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    freeze = steps_per_epoch if cfg.freeze_last_layer_iters < 0 else cfg.freeze_last_layer_iters
    grid = cfg.model.image_size // cfg.model.patch_size
    use_ibot = cfg.ibot_weight > 0
    pair.teacher.eval()  # no drop path in the teacher
    t_train = time.perf_counter()
    for step in range(start, cfg.max_iters):
        epoch, pos = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        batch = order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size].tolist()
        own = slice(dist_info.rank * local_bs, (dist_info.rank + 1) * local_bs)  # this rank's images
        # 1) views: image b's crops depend on (seed, step, b) only, whichever rank holds it
        seeds = [(cfg.seed * 1_000_003 + step) * 4096 + b for b in range(cfg.batch_size)][own]
        globals_, locals_ = multi_crop(train.images[batch[own]], transforms, cfg.crops.n_local, seeds)
        G, B = globals_.shape[:2]
        globals_ = globals_.flatten(0, 1).to(device)  # (2 B, ch, g, g): view 0 of every image, then view 1
        locals_ = locals_.flatten(0, 1).to(device) if locals_ is not None else None
        # 2) iBOT's masks, drawn for the global batch and sliced, so they too do not depend on the rank count
        masks = None
        if use_ibot:
            rng = random.Random(cfg.seed * 7919 + step)
            m = batch_masks(G * cfg.batch_size, grid, grid, rng, (cfg.mask_ratio_min, cfg.mask_ratio_max),
                            cfg.mask_probability).view(G, cfg.batch_size, -1)
            masks = m[:, own].flatten(0, 1).to(device)  # (2 B, N)
        t_temp = teacher_temp_at(cfg, step)
        # 3) the teacher: unmasked global views -> targets
        with torch.no_grad(), autocast(device, dtype):
            t_out = pair.teacher(globals_, masks, None, mask_input=False)
        t_dino = t_out["dino"].float()
        if cfg.centering == "sinkhorn_knopp":
            t_probs = sinkhorn_knopp(t_dino, t_temp, dist_info=dist_info)
            t_ibot = sinkhorn_knopp(t_out["ibot"].float(), t_temp, dist_info=dist_info) if use_ibot else None
        else:
            t_probs = softmax_center(t_dino, pair.dino_center, t_temp)
            t_ibot = softmax_center(t_out["ibot"].float(), pair.ibot_center, t_temp) if use_ibot else None
        # 4) the student: masked global views and the local views
        with autocast(device, dtype):
            s_out = student_forward(net, globals_, masks, locals_)
        s_dino = s_out["dino"].view(G, B, -1)
        if locals_ is not None:
            s_dino = torch.cat([s_dino, s_out["local_dino"].view(-1, B, s_dino.shape[-1])])
        losses = {"dino_loss": dino_loss(s_dino, t_probs.view(G, B, -1), cfg.student_temp)}
        if use_ibot:
            losses["ibot_loss"] = (ibot_loss(s_out["ibot"], t_ibot, masks, cfg.student_temp) if masks.any()
                                   else s_out["ibot"].sum() * 0)
        if cfg.koleo_weight > 0:
            losses["koleo_loss"] = sum(koleo_loss(c) for c in s_out["cls"].view(G, B, -1))
        loss = (cfg.dino_weight * losses["dino_loss"] + cfg.ibot_weight * losses.get("ibot_loss", 0)
                + cfg.koleo_weight * losses.get("koleo_loss", 0))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
        loss.backward()
        # 5) the step: prototypes frozen for the first epoch, weight decay on its schedule, then the EMA
        if step < freeze:
            for head in (pair.student.dino_head, pair.student.ibot_head):
                if head is not None and head.prototypes.grad is not None:
                    head.prototypes.grad.zero_()  # zero, not None: AdamW then keeps a state for them (resume)
        clip_grad(pair.student.parameters(), cfg.grad_clip)
        wd = cosine(cfg.weight_decay, cfg.weight_decay_end, step, cfg.max_iters)
        for group in optimizer.param_groups:
            if group.get("decay"):
                group["weight_decay"] = wd
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        momentum = cosine(cfg.momentum_teacher, 1.0, step, cfg.max_iters)
        pair.update_teacher(momentum)
        if cfg.centering == "centering":  # after the loss, as the reference: this step's targets used the old c
            update_center(pair.dino_center, t_dino, cfg.center_momentum, dist_info)
            if use_ibot:
                update_center(pair.ibot_center, t_out["ibot"].float(), cfg.center_momentum, dist_info)
        done = step + 1
        parts = {k: all_reduce_mean(v.item(), dist_info) for k, v in losses.items()}
        batch_entropy = -(t_probs * t_probs.clamp_min(1e-12).log()).sum(-1).mean().item()
        lgrid = cfg.crops.local_size // cfg.model.patch_size  # tokens through the student, all ranks (the log's tok/s)
        tokens = dist_info.world_size * (len(globals_) * (1 + grid * grid)
                                         + (len(locals_) * (1 + lgrid * lgrid) if locals_ is not None else 0))
        logger.step(done, all_reduce_mean(loss.item(), dist_info), scheduler.get_last_lr()[0], tokens,
                    **parts, teacher_temp=t_temp, momentum=momentum, weight_decay=wd,
                    batch_teacher_entropy=batch_entropy)
        if dist_info.is_main and (done % cfg.eval_every == 0 or done == cfg.max_iters):
            ev = evaluate(pair, ev_train, ev_test, mean, std, cfg, done, device)
            logger.log({"step": done, **{k: v for k, v in ev.items() if k != "line"}})
            logger.write(f"step {done}/{cfg.max_iters} | {ev['line']}")
        if done % cfg.save_every == 0 or done == cfg.max_iters:
            save_checkpoint(ckpt_root, done, pair, to_flat_dict(cfg), optimizer, scheduler,
                            keep=cfg.keep_checkpoints, is_main=dist_info.is_main)
    wall = time.perf_counter() - t_train
    result: dict = {"pair": pair}
    if dist_info.is_main:
        final = evaluate(pair, ev_train, ev_test, mean, std, cfg, cfg.max_iters, device)
        final_dir = out / "final"
        # the teacher's backbone (what DINO evaluates) as a transformers Dinov2 directory, with the data's stats
        config = {**cfg.model.to_hf_dict(), "pixel_mean": mean, "pixel_std": std, "data_image_size": data_size}
        save_pretrained(pair.teacher.backbone, config, final_dir)
        baselines = baseline_knn(ev_train, ev_test, mean, std, cfg) if labelled(train, test) else {}
        summary = {"steps": cfg.max_iters, "train_wall_s": wall, "s_per_step": wall / max(1, cfg.max_iters - start),
                   "dataset": name, "backbone_params": pair.student.backbone.num_parameters(),
                   "initial": first and {k: v for k, v in first.items() if k != "line"},
                   "final": {k: v for k, v in final.items() if k != "line"}, "baselines": baselines}
        atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2) + "\n")
        cmd = command_line("dinov2.train_dino")
        records = [make_record("dinov2", run_name, k, final[k], "random_init", baselines.get("random_init", {}).get(k),
                               wall, cmd) for k in final if k.startswith("knn_")]
        records += [make_record("dinov2", run_name, k, final[k], "none", None, wall, cmd)
                    for k in ("teacher_entropy", "prototypes_used")]
        atomic_write_text(out / "results.json", json.dumps(records, indent=2) + "\n")
        logger.write(f"done: {cfg.max_iters} steps in {wall:.0f} s | {final['line']} | {final_dir}")
        if baselines:
            logger.write("k-NN (k = 20) held-out: " + " | ".join(
                f"{k} {100 * v['knn_top1_k20']:.1f} %" for k, v in {**baselines, "ours": final}.items()))
        result.update(summary=summary, final_dir=final_dir)
    logger.close()
    if dist_info.is_main:
        from common.log import read_metrics
        plot_monitors(read_metrics(out / "metrics.jsonl"), out / "monitors.png")
    cleanup()
    return result


def subset(images: ImageSet, n: int) -> ImageSet:
    """n evenly spaced images of a split (all of them when n >= its size)."""
    idx = evenly_spaced(len(images), n)
    return ImageSet(images.images[idx], images.labels[idx], images.classes)


def baseline_knn(train, test, mean, std, cfg: TrainConfig) -> dict[str, dict[str, float]]:
    """The two floors, by the same k-NN: raw pixels, and the same architecture with random weights."""
    n = len(train.classes)
    raw = knn_accuracy(pixel_features(train.images), train.labels, pixel_features(test.images), test.labels, n)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        rand = Dinov2Model(cfg.model)
    return {"raw_pixels": {f"knn_top1_k{k}": v for k, v in raw.items()},
            "random_init": evaluate_backbone(rand, train, test, mean, std, cfg.model.image_size)}


if __name__ == "__main__":
    run_main(main, TrainConfig, presets=PRESETS)
