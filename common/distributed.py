"""Distributed training from torchrun's environment: one process per device.

    torchrun --nproc_per_node 2 -m transformer_basics.train_translate ...

Gloo on CPU, NCCL on GPU. ``wrap`` puts the model in DDP (every rank keeps a full copy and
all-reduces gradients) or FSDP2 (``fully_shard``: parameters, gradients and optimizer state are
sharded across ranks and gathered layer by layer). Only rank 0 logs and saves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str = "cpu") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, local_rank=local, world_size=world)


def cleanup() -> None:
    """Leave the process group; the barrier lets every rank finish its last collective first."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, info: DistInfo, strategy: str = "ddp",
         layer_cls: tuple[type[torch.nn.Module], ...] = (), find_unused: bool = False) -> torch.nn.Module:
    """Wrap for data parallel training. ``strategy``: ``ddp`` or ``fsdp`` (FSDP2, each module of
    type ``layer_cls`` sharded as its own unit, then the root). ``find_unused``: some parameters may get no
    gradient in a step (an MoE expert no token chose): DDP must look for them instead of waiting."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [info.local_rank] if next(model.parameters()).is_cuda else None
        return DDP(model, device_ids=device_ids, find_unused_parameters=find_unused)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for m in model.modules():
            if layer_cls and isinstance(m, layer_cls):
                fully_shard(m)
        fully_shard(model)
        return model
    raise ValueError(f"strategy must be ddp or fsdp; got {strategy!r}")


def all_reduce_mean(value: float, info: DistInfo) -> float:
    """The mean of a python float across ranks (for logging a global loss)."""
    if not info.enabled:
        return value
    device = f"cuda:{info.local_rank}" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size



def gather_with_grad(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, in rank order, differentiably: the backward sends each
    slice's gradient to the rank it came from, summed over the ranks that used it (the autograd all_gather of
    torch.distributed.nn; open_clip's gather_with_grad=True)."""
    if not info.enabled:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()))
