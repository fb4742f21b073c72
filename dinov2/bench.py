"""Benchmark the backbone: our Dinov2Model against transformers' at the same config and the same weights.

    python -m dinov2.bench                         # the cpu preset, batch 128 global crops, 1 thread
    python -m dinov2.bench --model-preset gpu4gb --device cuda

Before anything is timed the two models are checked to give the same output on the same batch (our weights
copied into theirs), so both do the same arithmetic. One step = forward + backward of a sum over the output
(no optimizer: the backbone is what differs). The contenders alternate round by round (A B, A B, ...) and each
round's ratio is taken, so a slow spell of the shared machine hits both; the median ratio is the figure, with
the lowest and highest beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from common.bench import paired_ratio, time_rounds
from common.cli import run_main
from common.errors import UserError
from common.results import command_line, make_record
from common.runtime import pick_device, set_threads

from .model import MODEL_PRESETS, Dinov2Config, Dinov2Model


@dataclass
class BenchConfig:
    model_preset: str = "cpu"  # cpu or gpu4gb (model.py, MODEL_PRESETS)
    batch_size: int = 128  # global crops per step (the cpu preset's 64 images x 2 views)
    image_size: int = 28
    threads: int = 1  # CPU threads; 1 makes runs on a shared machine comparable
    repeats: int = 7  # timed rounds
    device: str = "auto"
    out: str = "runs/dinov2/bench/bench.json"
    init_diversity: bool = False  # instead: how alike the [CLS] of 512 images are at init, per LayerScale start


def init_diversity(values=(1e-5, 0.1, 1.0), n: int = 512) -> list[dict]:
    """For each LayerScale start: the mean pairwise cosine of the randomly initialised teacher's [CLS] and of its
    DINO head's output over n held-out animal-mnist images, and the mean entropy of the centred targets
    softmax((t - mean t) / tau) at tau 0.04 and 0.07. ln K (6.93 for K = 1024) means uniform: nothing to learn."""
    import math

    import torch.nn.functional as F

    from .dataset import load_data, pixel_stats
    from .eval_knn import extract_features
    from .model import DinoHeadConfig, DinoStudent

    train, test = load_data("animal-mnist")
    mean, std = pixel_stats(train.images)
    rows = []
    for v in values:
        torch.manual_seed(0)
        net = DinoStudent(Dinov2Config(**MODEL_PRESETS["cpu"], layerscale_value=v), DinoHeadConfig())  # as train_dino
        cls = extract_features(net.backbone, test.images[:n], mean, std, 28)["cls"]
        with torch.no_grad():
            z = F.normalize(net.dino_head.mlp(cls), dim=1)
            t = net.dino_head(cls)
        c = F.normalize(cls, dim=1)
        row = {"layerscale": v, "cls_cos": (c @ c.t()).mean().item(), "head_cos": (z @ z.t()).mean().item()}
        for tau in (0.04, 0.07):
            p = F.softmax((t - t.mean(0, keepdim=True)) / tau, dim=-1)  # train_dino.py:softmax_center
            row[f"entropy_{tau}"] = -(p * p.clamp_min(1e-12).log()).sum(-1).mean().item()
        rows.append(row)
    print(f"at initialisation, {n} held-out animal-mnist images (ln K = {math.log(1024):.3f} is uniform)")
    print("| LayerScale start | mean cos of [CLS] | mean cos of head output | centred target entropy, tau 0.04 | "
          "tau 0.07 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layerscale']:g} | {r['cls_cos']:.3f} | {r['head_cos']:.3f} | {r['entropy_0.04']:.3f} | "
              f"{r['entropy_0.07']:.3f} |")
    return rows


def main(cfg: BenchConfig) -> dict:
    import transformers

    if cfg.init_diversity:
        return {"init_diversity": init_diversity()}
    if cfg.model_preset not in MODEL_PRESETS:
        raise UserError(f"--model-preset {cfg.model_preset}: expected one of {', '.join(MODEL_PRESETS)}")
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    mcfg = Dinov2Config(**MODEL_PRESETS[cfg.model_preset], image_size=cfg.image_size)
    torch.manual_seed(0)
    ours = Dinov2Model(mcfg).to(device)
    hf = transformers.Dinov2Model(transformers.Dinov2Config(**mcfg.to_hf_dict(), attn_implementation="sdpa"))
    hf.load_state_dict(ours.state_dict(), strict=True)
    hf.to(device)
    x = torch.randn(cfg.batch_size, mcfg.num_channels, cfg.image_size, cfg.image_size, device=device)
    with torch.no_grad():
        diff = (ours(x)["last_hidden_state"] - hf(pixel_values=x).last_hidden_state).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"the two backbones disagree by {diff:.2e} before timing; the comparison would be unfair")

    def step(model, call):
        def run():
            model.zero_grad(set_to_none=True)
            call(model).sum().backward()
        return run

    fns = {"ours": step(ours, lambda m: m(x)["last_hidden_state"]),
           "transformers": step(hf, lambda m: m(pixel_values=x).last_hidden_state)}
    times = time_rounds(fns, repeats=cfg.repeats, warmup=2, device=device)
    median, low, high = paired_ratio(times["transformers"], times["ours"])
    best = {k: min(v) for k, v in times.items()}
    print(f"backbone forward + backward, {cfg.model_preset} preset ({ours.num_parameters() / 1e6:.2f} M), batch "
          f"{cfg.batch_size} x {cfg.image_size} px, {cfg.threads} thread(s), {device}; outputs agree within {diff:.1e}")
    print("| implementation | best s / step | speed vs transformers (median of rounds, low-high) |")
    print("|---|---|---|")
    print(f"| transformers Dinov2Model (sdpa) | {best['transformers']:.3f} | 1.00x |")
    print(f"| ours (dinov2/model.py) | {best['ours']:.3f} | {median:.2f}x ({low:.2f}-{high:.2f}) |")
    result = {"best_s": best, "ratio_median": median, "ratio_low": low, "ratio_high": high, "max_abs_diff": diff,
              "times": times}
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    rec = [make_record("dinov2", f"bench_backbone_{cfg.model_preset}_{device.type}", "speed_vs_transformers", median,
                       "transformers_dinov2", 1.0, sum(sum(v) for v in times.values()), command_line("dinov2.bench"))]
    (out.parent / "results.json").write_text(json.dumps(rec, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_main(main, BenchConfig)
