"""Memory tricks of training, measured: gradient checkpointing, mixed precision with loss scaling, and
8-bit optimizer states.

    python -m appendix.memory                    # all three tables

1) Gradient checkpointing (Chen et al. 2016, arXiv:1604.06174). Backward needs every activation the
   forward made; a stack of L blocks keeps all of them. Checkpointing keeps only each block's input and
   recomputes the block's insides during backward: activation memory drops from L x (one block's) to
   L x (one input) + one block's, for about one extra forward (~1/3 more compute).
2) Mixed precision (Micikevicius et al. 2018, arXiv:1710.03740). Autocast runs matmuls in 16 bits and
   keeps reductions (softmax, norms, the loss) in 32. fp16 has 5 exponent bits: gradients below 2^-24
   (~6e-8) become 0. Loss scaling multiplies the loss by S (2^16) so the gradients are S times larger in
   fp16, divides them by S before the step, and lowers S when it overflows (skipping that step).
   bf16 has fp32's 8 exponent bits, so it needs no scaling.
3) Optimizer states. Adam keeps two fp32 moments per parameter (8 bytes); 8-bit Adam (Dettmers et al.
   2022, arXiv:2110.02861) stores them block-wise quantised to 1 byte each plus one fp32 absmax per block
   of 256. Paged optimizers (QLoRA) put those states in CUDA unified memory that the driver pages to CPU
   RAM when the GPU runs out - a GPU-only feature, explained in the README, not run here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common.bench import peak_memory_bytes, time_fn
from common.cli import run_main
from common.results import command_line, make_record
from common.runtime import set_threads

from .dataset import shakespeare_text
from .positions import Block, PositionsConfig, TinyLM, per_position_loss


class BlockStack(nn.Module):
    """L pre-norm transformer blocks; ``checkpointing`` wraps each in torch.utils.checkpoint."""

    def __init__(self, n_layer: int, dim: int, n_head: int, checkpointing: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, n_head) for _ in range(n_layer))
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpointing and self.training:
                # keep only x; the block's insides are recomputed when backward reaches it
                x = checkpoint(block, x, None, use_reentrant=False)
            else:
                x = block(x, None)
        return x


# ---------------------------------------------------------------------------------------------------
# loss scaling written out; tests compare it with torch.amp.GradScaler
# ---------------------------------------------------------------------------------------------------

class DynamicLossScaler:
    """Multiply the loss by ``scale``; before the step divide the gradients by it; on inf/NaN skip the
    step and halve the scale; after ``growth_interval`` clean steps in a row double it."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale_value = init_scale
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.clean_steps = 0
        self.found_inf = False

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        inv = torch.tensor(1.0 / self.scale_value, dtype=torch.float32)
        self.found_inf = False
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(inv)
                    self.found_inf |= not torch.isfinite(p.grad).all().item()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale and step unless a gradient overflowed; returns whether the step was taken."""
        self.unscale_(optimizer)
        if not self.found_inf:
            optimizer.step()
        return not self.found_inf

    def update(self) -> None:
        if self.found_inf:
            self.scale_value *= self.backoff_factor
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.scale_value *= self.growth_factor
                self.clean_steps = 0


@dataclass
class MemoryConfig:
    """The checkpointing, mixed-precision and optimizer-state measurements."""

    n_layer: int = 8  # blocks in the checkpointing stack
    dim: int = 256  # width
    n_head: int = 4  # heads
    seq_len: int = 512  # tokens per sequence
    batch_size: int = 8  # sequences per step
    repeats: int = 3  # best of this many step timings, spread reported
    memory_runs: int = 3  # fresh processes per checkpointing setting (median peak reported, with the range)
    threads: int = 1  # 1: comparable on a shared machine
    optim_steps: int = 400  # char-LM steps for the 32-bit vs 8-bit Adam comparison
    out_dir: str = "runs/appendix/memory"  # memory.json (every figure) and results.json
    worker: str = ""  # internal: "on" / "off" measures one checkpointing setting in a fresh process


def _peak_rss_mib() -> float:
    return peak_memory_bytes("cpu") / 2**20


def checkpoint_worker(cfg: MemoryConfig) -> dict:
    """In a fresh process: memory one training step adds on top of weights and inputs, and step time."""
    torch.manual_seed(0)
    model = BlockStack(cfg.n_layer, cfg.dim, cfg.n_head, checkpointing=cfg.worker == "on")
    small = torch.randn(1, 16, cfg.dim)
    model(small).square().mean().backward()  # warm-up at a tiny size: kernels, allocator, .grad buffers
    x = torch.randn(cfg.batch_size, cfg.seq_len, cfg.dim)
    base = _peak_rss_mib()

    def step():
        model(x).square().mean().backward()

    step()
    added = _peak_rss_mib() - base
    best, spread = time_fn(step, repeats=cfg.repeats, warmup=0)
    return {"checkpointing": cfg.worker == "on", "peak_added_mib": added, "step_s": best, "spread_s": spread}


def measure_checkpointing(cfg: MemoryConfig) -> list[dict]:
    """``memory_runs`` fresh processes per setting, alternating off/on: the allocator's peak moves by tens
    of MiB from run to run, so the median is reported with the range; the time is the best of all runs."""
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(cfg.memory_runs):
        for setting in ("off", "on"):
            env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}
            args = [sys.executable, "-m", "appendix.memory", "--worker", setting, "--threads", str(cfg.threads)]
            for f in ("n_layer", "dim", "n_head", "seq_len", "batch_size", "repeats"):
                args += [f"--{f.replace('_', '-')}", str(getattr(cfg, f))]
            proc = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
            runs[setting].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = []
    for setting, got in runs.items():
        peaks = sorted(r["peak_added_mib"] for r in got)
        bests = [r["step_s"] for r in got]
        rows.append({"checkpointing": setting == "on", "peak_added_mib": peaks[len(peaks) // 2],
                     "peak_min_mib": peaks[0], "peak_max_mib": peaks[-1], "step_s": min(bests),
                     "spread_s": max(max(bests) - min(bests), max(r["spread_s"] for r in got))})
    # what the blocks' inputs alone take (all that checkpointing keeps): L x B x T x C fp32
    inputs_mib = cfg.n_layer * cfg.batch_size * cfg.seq_len * cfg.dim * 4 / 2**20
    for r in rows:
        r["block_inputs_mib"] = inputs_mib
    return rows


def autocast_dtypes() -> dict[str, str]:
    """Which dtype each kind of module produces inside CPU bf16 autocast (read with forward hooks)."""
    block, seen = Block(64, 4), {}

    def record(module, inputs, output):  # returns None, so the output passes through unchanged
        seen.setdefault(type(module).__name__, str(output.dtype))

    for name, m in block.named_modules():
        if name:
            m.register_forward_hook(record)
    x = torch.randn(2, 8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x, None)
        loss = F.cross_entropy(y.flatten(0, 1), torch.zeros(16, dtype=torch.long))
    seen["cross_entropy (the loss)"] = str(loss.dtype)
    return seen


def underflow_rows(grads: dict[str, torch.Tensor]) -> list[dict]:
    """For real fp32 gradients (flattened, exact zeros dropped): the share that a 16-bit copy flushes to 0,
    keeps only as an fp16 subnormal (below 2^-14: fewer significant bits), or overflows, with and without
    a 2^16 loss scale."""
    rows = []
    for when, g in grads.items():
        g = g[g != 0]
        for scale in (1.0, 2.0**16):
            g16 = (g * scale).half()
            rows.append({"gradients": when, "format": f"fp16, loss scale {scale:g}",
                         "zero": (g16 == 0).float().mean().item(),
                         "subnormal": ((g16 != 0) & (g16.abs() < 2**-14)).float().mean().item(),
                         "inf": torch.isinf(g16).float().mean().item()})
        rows.append({"gradients": when, "format": "bf16, no scaling", "zero": (g.bfloat16() == 0).float().mean().item(),
                     "subnormal": float("nan"), "inf": torch.isinf(g.bfloat16()).float().mean().item()})
    return rows


def bf16_step_ratio(cfg: MemoryConfig) -> dict:
    """One training step of the block stack in fp32 vs under bf16 autocast on this CPU: time and loss."""
    torch.manual_seed(0)
    model = BlockStack(4, cfg.dim, cfg.n_head)
    x = torch.randn(4, 256, cfg.dim)

    def step(dtype):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(x).square().mean()
        loss.backward()
        return loss.item()

    losses = {d: step(d) for d in ("fp32", "bf16")}
    t32, s32 = time_fn(lambda: step("fp32"), repeats=cfg.repeats)
    t16, s16 = time_fn(lambda: step("bf16"), repeats=cfg.repeats)
    return {"fp32_step_s": t32, "fp32_spread_s": s32, "bf16_step_s": t16, "bf16_spread_s": s16,
            "loss_fp32": losses["fp32"], "loss_bf16": losses["bf16"]}


def optimizer_rows(cfg: MemoryConfig) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The tiny char LM trained with torch's Adam and with bitsandbytes' 8-bit Adam, same seed and batches:
    state bytes per parameter and the final validation loss (on every non-overlapping 64-character window
    of the valid split). Also returns the fp32 run's gradients at its first and last step (for the
    underflow table)."""
    import bitsandbytes as bnb

    pcfg = PositionsConfig()
    text = shakespeare_text(pcfg.n_chars)
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = torch.tensor([stoi[c] for c in text])
    split = int(len(ids) * 0.9)

    def batch(src, seed):
        g = torch.Generator().manual_seed(seed)
        s = torch.randint(len(src) - 65, (32,), generator=g).tolist()
        return torch.stack([src[i: i + 64] for i in s]), torch.stack([src[i + 1: i + 65] for i in s])

    rows, grads = [], {}
    for name, make in (("torch.optim.Adam (fp32 states)", lambda p: torch.optim.Adam(p, lr=3e-3)),
                       ("bitsandbytes Adam8bit", lambda p: bnb.optim.Adam8bit(p, lr=3e-3, min_8bit_size=4096))):
        torch.manual_seed(0)
        model = TinyLM(len(stoi), pcfg, "rope", 64)
        opt = make(model.parameters())
        t0 = time.perf_counter()
        for step in range(cfg.optim_steps):
            x, y = batch(ids[:split], step)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not grads or (len(grads) == 1 and step == cfg.optim_steps - 1):  # the fp32 run's first and last
                grads[f"step {step + 1}"] = torch.cat([p.grad.flatten() for p in model.parameters()])
            opt.step()
        wall = time.perf_counter() - t0
        # every non-overlapping 64-character window of the valid split (1,718 at the default), no generator
        per_pos, n_windows, _ = per_position_loss(model.eval(), ids[split:], 64, 32)
        vl = per_pos.mean().item()
        n = sum(p.numel() for p in model.parameters())
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if torch.is_tensor(t) and t.numel() > 1)
        big = [p for p in model.parameters() if p.numel() >= 4096]
        big_state = sum(t.numel() * t.element_size() for p in big for t in opt.state[p].values()
                        if torch.is_tensor(t) and t.numel() > 1)
        rows.append({"optimizer": name, "params": n, "state_bytes_per_param": state / n,
                     "state_bytes_per_param_8bit_tensors": big_state / sum(p.numel() for p in big),
                     "valid_loss": vl, "valid_windows": n_windows, "train_s": wall})
    return rows, grads


def main(cfg: MemoryConfig) -> dict:
    set_threads(cfg.threads)
    if cfg.worker:
        print(json.dumps(checkpoint_worker(cfg)))
        return {}
    out: dict = {}
    print(f"1) gradient checkpointing: {cfg.n_layer} blocks, width {cfg.dim}, batch {cfg.batch_size} x {cfg.seq_len} "
          f"tokens, one forward+backward, {cfg.threads} thread(s), a fresh process per setting")
    out["checkpointing"] = rows = measure_checkpointing(cfg)
    print(f"| checkpointing | memory added by the step (median of {cfg.memory_runs} processes, range) | "
          f"step time (best) | spread |\n|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['checkpointing'] else 'off'} | {r['peak_added_mib']:.0f} MiB ({r['peak_min_mib']:.0f}-"
              f"{r['peak_max_mib']:.0f}) | {r['step_s']:.2f} s | {r['spread_s']:.2f} s |")
    off, on = rows
    print(f"memory {on['peak_added_mib'] / off['peak_added_mib']:.2f}x, time {on['step_s'] / off['step_s']:.2f}x; "
          f"the {cfg.n_layer} block inputs it keeps: {on['block_inputs_mib']:.0f} MiB\n")

    print("2) mixed precision")
    out["autocast_dtypes"] = dtypes = autocast_dtypes()
    print("   inside torch.autocast('cpu', bfloat16): " +
          ", ".join(f"{k} -> {v.replace('torch.', '')}" for k, v in dtypes.items()))
    out["bf16"] = b = bf16_step_ratio(cfg)
    print(f"   one step of a 4-block stack: fp32 {b['fp32_step_s'] * 1e3:.0f} ms, "
          f"bf16 autocast {b['bf16_step_s'] * 1e3:.0f} ms "
          f"({b['bf16_step_s'] / b['fp32_step_s']:.2f}x) | loss {b['loss_fp32']:.5f} vs {b['loss_bf16']:.5f}")
    optimizers, grads = optimizer_rows(cfg)
    out["underflow"] = rows = underflow_rows(grads)
    print("| gradients of the char LM | cast to | become 0 | fp16 subnormal (fewer bits) | overflow to inf |\n"
          "|---|---|---|---|---|")
    for r in rows:
        sub = "-" if math.isnan(r["subnormal"]) else f"{r['subnormal']:.2%}"
        print(f"| {r['gradients']} | {r['format']} | {r['zero']:.2%} | {sub} | {r['inf']:.2%} |")
    print("\n3) optimizer states")
    out["optimizers"] = rows = optimizers
    print(f"| optimizer | state bytes / parameter (all) | (tensors >= 4096, the 8-bit ones) | valid loss after "
          f"{cfg.optim_steps} steps | train s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['state_bytes_per_param']:.2f} | "
              f"{r['state_bytes_per_param_8bit_tensors']:.3f} | "
              f"{r['valid_loss']:.4f} | {r['train_s']:.0f} |")
    folder = Path(cfg.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "memory.json").write_text(json.dumps(out, indent=2) + "\n")
    cmd = command_line("appendix.memory")
    run = f"grad_checkpointing_{cfg.n_layer}x{cfg.dim}_b{cfg.batch_size}x{cfg.seq_len}"
    adam, adam8 = out["optimizers"]
    records = [make_record("appendix", run, "peak_added_mib", on["peak_added_mib"], "no_checkpointing",
                           off["peak_added_mib"], 0.0, cmd),
               make_record("appendix", run, "step_s", on["step_s"], "no_checkpointing", off["step_s"], 0.0, cmd),
               make_record("appendix", "bf16_autocast_4x256_b4x256", "step_s", b["bf16_step_s"], "fp32",
                           b["fp32_step_s"], 0.0, cmd),
               make_record("appendix", f"adam8bit_tinylm_{cfg.optim_steps}_steps", "valid_loss", adam8["valid_loss"],
                           "adam_fp32", adam["valid_loss"], adam8["train_s"], cmd),
               make_record("appendix", f"adam8bit_tinylm_{cfg.optim_steps}_steps", "state_bytes_per_param",
                           adam8["state_bytes_per_param"], "adam_fp32", adam["state_bytes_per_param"], 0.0, cmd)]
    (folder / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    return out


if __name__ == "__main__":
    run_main(main, MemoryConfig)
