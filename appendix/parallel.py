"""Parallel training with 2 CPU processes (gloo): data parallel (DDP), fully sharded data parallel (FSDP2)
and a Megatron-style tensor-parallel MLP, each checked against one process doing the same work.

    python -m appendix.parallel                  # launches torchrun --nproc_per_node 2 itself, then compares

    DDP   every rank holds the whole model, computes gradients on its share of the global batch, and
          all-reduces (averages) them before the step: the same update as one process on the whole batch.
    FSDP  every rank holds 1/N of each parameter, gradient and optimizer state (ZeRO-3, Rajbhandari et al.
          2020); a layer's full weights are all-gathered just before it runs and freed after; gradients are
          reduce-scattered. Same maths as DDP, 1/N of the memory for the model states.
    TP    one layer split across ranks (Megatron-LM, Shoeybi et al. 2019, sec. 3): the first linear by
          output columns (each rank computes half of the hidden units, no communication), the second by
          input rows (each rank gets a partial sum; one all-reduce adds them). Forward: one all-reduce per
          MLP; backward: one for the input gradient.
    PP    (explained in the README) layers split into stages, micro-batches flow through them; the bubble
          of an N-stage GPipe schedule with M micro-batches is (N - 1) / (M + N - 1) of the time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common.cli import run_main
from common.distributed import cleanup, init_distributed, wrap

from .positions import Block


@dataclass
class ParallelConfig:
    """A 2-block model trained a few steps three ways; a tensor-parallel MLP checked once."""

    dim: int = 64  # model width
    n_layer: int = 2  # blocks
    max_iters: int = 5  # optimizer steps
    global_batch: int = 8  # sequences per step, split evenly across the ranks
    seq_len: int = 16  # tokens per sequence
    lr: float = 0.1  # SGD with momentum 0.9 (see train() for why not Adam here)
    out_dir: str = ""  # where the ranks write their results (default: a temporary folder)
    worker: bool = False  # internal: set by the torchrun launch

    RENAMED: ClassVar[dict[str, str]] = {"steps": "max_iters"}  # old flag -> field, kept for one release


def make_model(cfg: ParallelConfig) -> nn.Module:
    torch.manual_seed(0)  # every rank and the single process start from the same weights
    return nn.Sequential(*[Block(cfg.dim, 4) for _ in range(cfg.n_layer)])


class Wrapped(nn.Module):
    """Blocks take (x, rope); Sequential passes one argument, so adapt."""

    def __init__(self, cfg: ParallelConfig):
        super().__init__()
        self.blocks = make_model(cfg)

    def forward(self, x):
        for b in self.blocks:
            x = b(x, None)
        return x


def global_batch(cfg: ParallelConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(cfg.global_batch, cfg.seq_len, cfg.dim, generator=g)
    return x, torch.randn(cfg.global_batch, cfg.seq_len, cfg.dim, generator=g)


def train(model: nn.Module, cfg: ParallelConfig, rank: int = 0, world: int = 1) -> list[float]:
    """Mean-squared-error regression; each rank takes rows rank::world of the global batch, so the mean of
    the ranks' mean losses is the global mean loss, and the averaged gradient is the global gradient."""
    # SGD: its update is linear in the gradient, so float-rounding differences between the 2-rank and the
    # 1-process gradients stay rounding-sized. Adam divides by sqrt(v): on a parameter whose gradient is ~0,
    # a rounding-level difference can flip the update's sign and move the weight by a whole learning rate.
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    losses = []
    for step in range(cfg.max_iters):
        x, y = global_batch(cfg, step)
        x, y = x[rank::world], y[rank::world]
        loss = F.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces, FSDP reduce-scatters, inside backward
        opt.step()
        losses.append(loss.item())
    return losses


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights on every rank: FSDP2's parameters are DTensors; gather them."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    return out


# ---------------------------------------------------------------------------------------------------
# tensor parallelism: Megatron's f and g, then the two sharded linears
# ---------------------------------------------------------------------------------------------------

class CopyToTensorParallel(torch.autograd.Function):
    """Megatron's f: identity forward; all-reduce of the input gradient backward (each rank's half of
    the layer contributed a part of dL/dx)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class ReduceFromTensorParallel(torch.autograd.Function):
    """Megatron's g: all-reduce (sum of partial products) forward; identity backward."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


class TensorParallelMLP(nn.Module):
    """y = W2 gelu(W1 x + b1) + b2 with W1 split by output rows (column-parallel) and W2 by input columns
    (row-parallel) over ``world`` ranks; ``from_full`` takes this rank's slices of an unsharded MLP."""

    def __init__(self, full: nn.Sequential, rank: int, world: int):
        super().__init__()
        fc1, fc2 = full[0], full[2]
        shard = fc1.out_features // world
        rows = slice(rank * shard, (rank + 1) * shard)
        self.fc1 = nn.Linear(fc1.in_features, shard)  # this rank's hidden units
        self.fc2 = nn.Linear(shard, fc2.out_features)  # their share of the second matmul
        with torch.no_grad():
            self.fc1.weight.copy_(fc1.weight[rows])
            self.fc1.bias.copy_(fc1.bias[rows])
            self.fc2.weight.copy_(fc2.weight[:, rows])
            self.fc2.bias.copy_(fc2.bias / world)  # added once in total after the all-reduce
        self.rows = rows

    def forward(self, x):
        x = CopyToTensorParallel.apply(x)
        h = F.gelu(self.fc1(x))  # (B, T, hidden / world): no communication
        return ReduceFromTensorParallel.apply(self.fc2(h))  # partial sums added across ranks


def tensor_parallel_check(cfg: ParallelConfig, rank: int, world: int) -> dict:
    """Sharded vs unsharded on the same input: outputs, input gradients, weight-gradient slices."""
    torch.manual_seed(0)
    full = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim))
    x = torch.randn(2, 5, cfg.dim)
    x_full, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_full = full(x_full)
    y_full.square().sum().backward()
    tp = TensorParallelMLP(full, rank, world)
    y_tp = tp(x_tp)
    y_tp.square().sum().backward()
    return {"output": (y_tp - y_full).abs().max().item(),
            "input_grad": (x_tp.grad - x_full.grad).abs().max().item(),
            "fc1_grad_slice": (tp.fc1.weight.grad - full[0].weight.grad[tp.rows]).abs().max().item(),
            "fc2_grad_slice": (tp.fc2.weight.grad - full[2].weight.grad[:, tp.rows]).abs().max().item()}


def worker(cfg: ParallelConfig) -> None:
    """Run under torchrun: DDP training, FSDP training, the tensor-parallel check; rank 0 writes."""
    info = init_distributed("cpu")
    out = Path(cfg.out_dir)
    results = {}
    for strategy in ("ddp", "fsdp"):
        model = wrap(Wrapped(cfg), info, strategy, layer_cls=(Block,))
        losses = train(model, cfg, info.rank, info.world_size)
        state = full_state(model.module if strategy == "ddp" else model)
        results[strategy] = {"losses": losses}
        if info.is_main:
            from safetensors.torch import save_file

            save_file(state, str(out / f"{strategy}.safetensors"))
    results["tp"] = tensor_parallel_check(cfg, info.rank, info.world_size)
    (out / f"rank{info.rank}.json").write_text(json.dumps(results) + "\n")
    cleanup()


def compare(cfg: ParallelConfig) -> dict:
    """Launch the two ranks, train one process on the whole batch, and measure the differences."""
    from safetensors.torch import load_file

    out = Path(cfg.out_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "appendix.parallel", "--worker", "--out-dir", str(out)]
    for f in ("dim", "n_layer", "max_iters", "global_batch", "seq_len", "lr"):
        cmd += [f"--{f.replace('_', '-')}", str(getattr(cfg, f))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed:\n{proc.stderr[-3000:]}")
    single = Wrapped(cfg)
    single_losses = train(single, cfg)
    ref = full_state(single)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    report = {"single_losses": single_losses}
    for strategy in ("ddp", "fsdp"):
        got = load_file(str(out / f"{strategy}.safetensors"))
        mean_losses = [(a + b) / 2 for a, b in zip(ranks[0][strategy]["losses"], ranks[1][strategy]["losses"])]
        report[strategy] = {"weights_max_diff": max((got[k] - ref[k]).abs().max().item() for k in ref),
                            "loss_max_diff": max(abs(a - b) for a, b in zip(mean_losses, single_losses))}
    report["tp"] = {k: max(r["tp"][k] for r in ranks) for k in ranks[0]["tp"]}
    return report


def gpipe_bubble(stages: int, micro_batches: int) -> float:
    """Idle share of a GPipe schedule: (N - 1) / (M + N - 1) (Huang et al. 2019, sec. 2.2)."""
    return (stages - 1) / (micro_batches + stages - 1)


def main(cfg: ParallelConfig) -> dict:
    if cfg.worker:
        worker(cfg)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg.out_dir = cfg.out_dir or tmp
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        report = compare(cfg)
    print(f"2 processes (gloo) vs 1 process on the same global batch of {cfg.global_batch}, {cfg.max_iters} SGD steps:")
    print("| strategy | final weights, max abs diff | per-step loss, max abs diff |\n|---|---|---|")
    for s in ("ddp", "fsdp"):
        print(f"| {s.upper()} | {report[s]['weights_max_diff']:.1e} | {report[s]['loss_max_diff']:.1e} |")
    print("\ntensor-parallel MLP (2 ranks) vs unsharded, max abs diff: " +
          ", ".join(f"{k} {v:.1e}" for k, v in report["tp"].items()))
    print("\nGPipe bubble (idle share) for N stages and M micro-batches: " +
          ", ".join(f"N={n} M={m}: {gpipe_bubble(n, m):.0%}" for n, m in ((2, 1), (2, 8), (4, 4), (4, 16))))
    return report


if __name__ == "__main__":
    run_main(main, ParallelConfig)
