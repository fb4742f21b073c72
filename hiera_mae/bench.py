"""Benchmark: our Hiera against transformers' at the same config and the same weights, forward + backward.

    python -m hiera_mae.bench                       # the cpu preset, batch 128 x 32 px, 1 thread
    python -m hiera_mae.bench --embed-dim 96 --depths 1 2 7 --num-heads 1 2 4 --device cuda

Two workloads: the classifier on whole images (``HieraModel`` + pooler) and the MAE step (``HieraForPreTraining``
with the same fixed noise, so both drop the same units). Before timing, each pair is checked to agree on the same
batch. The contenders alternate round by round and each round's ratio is taken; the median is the figure, with
the lowest and highest beside it. The arithmetic is the same (the outputs agree to the last bit); what differs is
the bookkeeping: our query pooling takes ``amax`` where transformers takes ``max(...).values`` (which also finds
the indices), our MAE encoder gathers the kept units where transformers indexes with a boolean mask, and our
decoder places them with a gather and ``torch.where`` instead of a masked assignment. (With
``F.scaled_dot_product_attention`` instead of the written-out attention ours was slower on a CPU: windows of 16
tokens are too short for the fused kernel.)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.bench import paired_ratio, time_rounds
from common.cli import run_main
from common.results import command_line, make_record
from common.runtime import pick_device, set_threads

from .model import HieraConfig, HieraForPreTraining, HieraModel


@dataclass
class BenchConfig:
    model: HieraConfig = field(default_factory=HieraConfig)
    batch_size: int = 128  # images per step (train_mae.py's and train_finetune.py's batch)
    threads: int = 1  # CPU threads; 1 makes runs on a shared machine comparable
    repeats: int = 7  # timed rounds
    device: str = "auto"
    out: str = "runs/hiera_mae/bench/bench.json"


def hf_config(cfg: HieraConfig):
    import transformers

    d = cfg.to_hf_dict()
    keys = set(transformers.HieraConfig().to_dict()) & set(d)
    return transformers.HieraConfig(**{k: d[k] for k in keys if k not in ("architectures", "model_type")})


def main(cfg: BenchConfig) -> dict:
    import transformers

    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    m = cfg.model
    torch.manual_seed(0)
    x = torch.randn(cfg.batch_size, m.num_channels, *m.image_size, device=device)
    noise = torch.rand(cfg.batch_size, math.prod(m.mask_spatial_shape), device=device)
    ours_enc = HieraModel(m).to(device)
    hf_enc = transformers.HieraModel(hf_config(m)).to(device)
    hf_enc.load_state_dict(ours_enc.state_dict(), strict=True)
    ours_mae = HieraForPreTraining(m).to(device)
    hf_mae = transformers.HieraForPreTraining(hf_config(m)).to(device)
    hf_mae.load_state_dict(ours_mae.state_dict(), strict=True)
    with torch.no_grad():
        d_enc = (ours_enc(x)["pooler_output"] - hf_enc(x).pooler_output).abs().max().item()
        d_mae = abs(ours_mae(x, noise=noise)["loss"].item() - hf_mae(x, noise=noise).loss.item())
    if max(d_enc, d_mae) > 1e-4:
        raise RuntimeError(f"the two models disagree ({d_enc:.1e}, {d_mae:.1e}) before timing; unfair comparison")

    def step(model, call):
        def run():
            model.zero_grad(set_to_none=True)
            call(model).backward()
        return run

    workloads = {
        "classifier": {"ours": step(ours_enc, lambda mod: mod(x)["pooler_output"].sum()),
                       "transformers": step(hf_enc, lambda mod: mod(x).pooler_output.sum())},
        "mae": {"ours": step(ours_mae, lambda mod: mod(x, noise=noise)["loss"]),
                "transformers": step(hf_mae, lambda mod: mod(x, noise=noise).loss)},
    }
    result: dict = {"max_abs_diff": {"classifier": d_enc, "mae": d_mae}}
    print(f"Hiera forward + backward, {ours_enc.num_parameters() / 1e6:.2f} M encoder, batch {cfg.batch_size} x "
          f"{'x'.join(map(str, m.image_size))}, {cfg.threads} thread(s), {device}; outputs agree within "
          f"{max(d_enc, d_mae):.1e}")
    print("| workload | transformers best s / step | ours best s / step | ours vs transformers (median, low-high) |")
    print("|---|---|---|---|")
    records = []
    for name, fns in workloads.items():
        times = time_rounds(fns, repeats=cfg.repeats, warmup=2, device=device)
        median, low, high = paired_ratio(times["transformers"], times["ours"])
        best = {k: min(v) for k, v in times.items()}
        print(f"| {name} | {best['transformers']:.3f} | {best['ours']:.3f} | {median:.2f}x ({low:.2f}-{high:.2f}) |")
        result[name] = {"best_s": best, "ratio_median": median, "ratio_low": low, "ratio_high": high,
                        "times": times}
        records.append(make_record("hiera_mae", f"bench_{name}_cpu_preset_{device.type}", "speed_vs_transformers",
                                   median, "transformers_hiera", 1.0, sum(sum(v) for v in times.values()),
                                   command_line("hiera_mae.bench")))
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    (out.parent / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_main(main, BenchConfig)
