"""The one prepared check for a lent GPU: does every chapter's ``--preset gpu4gb`` fit a 4 GB card, how fast
does it train in bf16, and do the CUDA paths of the quantized layers and kernels run?

    make gpu-check                                   # = python -m common.gpu_check (auto: cuda if there is one)
    python -m common.gpu_check --device cpu          # dry mode: 2 steps per job at batch 1-2 (CI runs this)
    python -m common.gpu_check --only gpt_pretrain bert_mlm --steps 50

Each *job* is a chapter's real training command, run as a user would (a subprocess of ``python -m ...``)
with ``--preset gpu4gb`` and ``--max-iters`` a few dozen steps. On CUDA the child process is capped at
``--memory-cap-gib`` (3.5 GiB by default: a "4 GB" card shows ~3.7 GiB, and the CUDA context and the
libraries take a few hundred MB of it before the first tensor) with
``torch.cuda.set_per_process_memory_fraction``, so a preset that needs more fails with an out-of-memory
error here, as it would on the card, instead of passing on a 141 GB H200. The peak memory (allocated and
reserved by torch's caching allocator) and the throughput come from the job's own ``metrics.jsonl``: the
median of the log records after the first (the first holds the warm-up: cuBLAS heuristics, the allocator
growing, ``torch.compile``'s compilation).

Some jobs start from another's output (LoRA from the pretrained GPT, the address parser from the MLM): the
chain is the chapter's own. Jobs that only prepare (a tokenizer) are run but not measured.

Then the *kernel checks* call, once each on the device, the library and project kernels the chapters use
off the CPU: bitsandbytes' 4-bit NF4 and 8-bit linear layers (the QLoRA base) and its 8-bit Adam, each
against the same arithmetic written in plain torch. Chapters that bring triton kernels register theirs in
``KERNEL_CHECKS`` (the GPT job with ``--compile`` already runs the triton code that torch.compile writes).

Everything goes to ``--out`` (runs/gpu_check): ``gpu_check.json`` (every figure, the machine, the versions)
and ``gpu_check.md`` (the table the READMEs quote). The exit status is 1 if a job or check failed or a
preset went over the cap.

The dry mode (``--device cpu``) runs the same commands for 2 steps each, with the smallest batch and data
the flags allow, so that CI proves every command line, every chain and every check still works; its
memory and speed figures mean nothing. There each chain's jobs are forked, one after the other, from one
interpreter that imported the chain's modules (``zygote``), which spares a torch import per job. On the GPU
it needs the chapters' data in ``$TUTORIALS_CACHE`` (``make data`` on a machine with the internet, then copy
the cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

GIB = 2**30
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Job:
    """One command. ``args`` apply in both modes, ``dry`` only on the CPU (tiny batch, data and evaluation;
    given after ``args``, a flag in both takes its dry value), ``gpu``
    only on CUDA. ``{out}`` is the check's folder, ``{steps}`` the steps. ``measure=False``: a preparation
    (no preset, no step budget). ``needs``: jobs whose output this one reads (skipped if one failed)."""

    name: str
    module: str
    args: list[str] = field(default_factory=list)
    dry: list[str] = field(default_factory=list)
    gpu: list[str] = field(default_factory=list)
    measure: bool = True
    preset: bool = True  # add --preset gpu4gb (a fine-tune that takes its size from a checkpoint has none)
    needs: list[str] = field(default_factory=list)
    cuda_only: bool = False
    what: str = ""  # the table's description


# Shared by every measured job: the step budget, no evaluation or checkpoint in between, its own folder.
COMMON = ["--device", "{device}", "--max-iters", "{steps}", "--log-every", "{log_every}",
          "--eval-every", "100000", "--save-every", "100000", "--out-dir", "{out}/{name}"]

JOBS: list[Job] = [
    Job("gpt_tokenizer", "gpt_minimind.train_tokenizer", measure=False,
        args=["--max-documents", "1000", "--out-dir", "{out}/gpt_tokenizer"]),
    Job("gpt_pretrain", "gpt_minimind.train_pretrain", needs=["gpt_tokenizer"],
        what="GPT pretraining, minimind-small (26 M), batch 32 x 512 x 2 accumulated",
        args=["--tokenizer-dir", "{out}/gpt_tokenizer", "--eval-blocks", "8"],
        dry=["--batch-size", "1", "--grad-accum", "1", "--max-documents", "300", "--samples", "--eval-blocks", "2"],
        gpu=["--max-documents", "3000"]),
    Job("gpt_pretrain_compile", "gpt_minimind.train_pretrain", needs=["gpt_tokenizer"], cuda_only=True,
        what="the same with --compile (torch.compile writes triton kernels)",
        args=["--tokenizer-dir", "{out}/gpt_tokenizer", "--eval-blocks", "8", "--compile", "--max-documents", "3000"]),
    Job("gpt_qlora", "gpt_minimind.train_lora", needs=["gpt_pretrain"],
        what="QLoRA on the pretrained GPT: bitsandbytes NF4 base + LoRA r=16",
        preset=False, args=["--init-from", "{out}/gpt_pretrain/final", "--quantize-bits", "4"],
        dry=["--batch-size", "1", "--eval-examples", "2"]),
    Job("gpt_lora_int8", "gpt_minimind.train_lora", needs=["gpt_pretrain"],
        what="LoRA on an LLM.int8() base (bitsandbytes Linear8bitLt)",
        preset=False, args=["--init-from", "{out}/gpt_pretrain/final", "--quantize-bits", "8"],
        dry=["--batch-size", "1", "--eval-examples", "2"]),
    Job("bert_mlm", "bert_address_cls.train_mlm",
        what="BERT masked-LM, BERT-base widths at 6 layers, batch 64 x 128",
        args=["--tokenizer-dir", "{out}/bert_tokenizer", "--eval-batches", "2"],
        dry=["--batch-size", "2", "--text-file", "{out}/tiny_text.jsonl", "--n-addresses", "50", "--eval-batches", "1"],
        gpu=["--n-addresses", "2000"]),
    Job("bert_cls", "bert_address_cls.train_cls", needs=["bert_mlm"],
        what="the address parser fine-tuned from that MLM, batch 64 x 64",
        args=["--init-from", "{out}/bert_mlm/final", "--no-baseline"],
        dry=["--batch-size", "2", "--n-train", "32", "--n-valid", "8", "--n-test", "8", "--district-drills", "0"],
        gpu=["--n-train", "5000", "--n-test", "1000"]),
    Job("t5_pretrain", "t5_summarization.train_pretrain",
        what="T5 span corruption, 6+6 layers of width 512, batch 64 x 256",
        args=["--tokenizer-dir", "{out}/t5_tokenizer", "--eval-batches", "2"],
        dry=["--batch-size", "2", "--max-documents", "1000", "--eval-batches", "1"],
        gpu=["--max-documents", "3000"]),
    Job("t5_summarize", "t5_summarization.train_summarize", needs=["t5_pretrain"],
        what="T5 headline fine-tuning from that checkpoint, batch 32 x 512, beam-4 scoring",
        args=["--init-from", "{out}/t5_pretrain/final", "--tokenizer", "{out}/t5_tokenizer/spiece.model",
              "--eval-batches", "4"],
        dry=["--batch-size", "2", "--max-train-pairs", "16", "--eval-limit", "2", "--eval-batches", "1"],
        gpu=["--eval-limit", "50"]),
    Job("clip", "clip.train_clip",
        what="CLIP, two 8-layer towers of width 512, 64-px pictures in 8-px patches, batch 128",
        args=["--tokenizer-dir", "{out}/clip_tokenizer"],
        dry=["--batch-size", "2", "--data-file", "{out}/tiny_pairs/train.csv", "--valid-file",
             "{out}/tiny_pairs/valid.csv"]),
    Job("clip_export", "clip.export_hf", measure=False, needs=["clip"],
        args=["--ckpt", "{out}/clip/final", "--out", "{out}/clip_hf"]),
    Job("llava_stage1", "llava.train_stage1", needs=["clip_export"],
        what="LLaVA stage 1 (projector) on that CLIP and SmolLM2-135M, batch 32",
        args=["--vision", "{out}/clip_hf", "--eval-examples", "256"],
        dry=["--batch-size", "2", "--data-file", "{out}/tiny_pairs/conv.jsonl", "--valid-file",
             "{out}/tiny_pairs/conv.jsonl", "--eval-examples", "2"]),
    Job("llava_stage2", "llava.train_stage2", needs=["llava_stage1"],
        what="LLaVA stage 2, LoRA r=16 on SmolLM2-135M, batch 4 pictures (about 39 questions, packed)",
        args=["--vision", "{out}/clip_hf", "--init-from", "{out}/llava_stage1/final", "--eval-examples", "256"],
        dry=["--batch-size", "2", "--data-file", "{out}/tiny_pairs/conv.jsonl", "--valid-file",
             "{out}/tiny_pairs/conv.jsonl", "--eval-examples", "2"]),
    Job("dinov2", "dinov2.train_dino",
        what="DINOv2 (DINO + iBOT + KoLeo), ViT-S width at 12 layers on 28 px animal-mnist, batch 256, 2 + 8 crops",
        dry=["--batch-size", "2", "--n-local", "2", "--eval-images", "16"]),
    Job("hiera_mae", "hiera_mae.train_mae",
        what="Hiera MAE, width 96 with depths 1-2-7, on 32 px animal-mnist, batch 256",
        args=["--eval-images", "512"], dry=["--batch-size", "2", "--eval-images", "16"]),
    Job("hiera_mae_finetune", "hiera_mae.train_finetune", needs=["hiera_mae"],
        what="Hiera fine-tuning from that MAE's encoder, batch 256",
        args=["--init", "{out}/hiera_mae/final"],
        dry=["--batch-size", "2", "--labels-per-class", "1", "--eval-images", "64"]),
    Job("deepseek_v3", "deepseek_v3.train",
        what="DeepSeek-V3 small (57 M, 29 M active): width 512, 6 layers (5 MoE, 16 experts, top 4), batch 16 x 512",
        args=["--tokenizer-dir", "{out}/ds_tokenizer", "--eval-batches", "2"],
        dry=["--batch-size", "2", "--data-file", "{out}/tiny_text.jsonl", "--tokenizer-vocab", "300",
             "--max-position-embeddings", "32", "--original-max-position-embeddings", "32", "--eval-batches", "1"],
        gpu=["--max-documents", "3000"]),
    Job("deepseek_fp8_speed", "deepseek_v3.bench", measure=False, cuda_only=True,
        what="deepseek_v3's triton FP8 GEMM against torch._scaled_mm and bf16: TFLOP/s and error",
        args=["--ckpt", "", "--fp8", "--device", "cuda", "--out", "{out}/deepseek_fp8_speed/bench.json"]),
    Job("translate", "transformer_basics.train_translate",
        what="the 2017 Transformer, 6+6 layers of width 512, batch 64 pairs",
        args=["--eval-batches", "4"], dry=["--batch-size", "2", "--eval-batches", "1"]),
]


def job_chains(jobs: list[Job]) -> list[list[Job]]:
    """The jobs grouped so that every job runs after the ones it needs: a chain per independent root."""
    chain_of: dict[str, int] = {}
    chains: list[list[Job]] = []
    for job in jobs:
        i = chain_of[job.needs[0]] if job.needs else len(chains)
        if i == len(chains):
            chains.append([])
        chains[i].append(job)
        chain_of[job.name] = i
    return chains


def job_command(job: Job, device: str, steps: int, out: Path) -> list[str]:
    """The job's flags for this device, placeholders filled."""
    args = (COMMON + (["--preset", "gpu4gb"] if job.preset else [])) if job.measure else []
    args += job.args + (job.gpu if device.startswith("cuda") else job.dry)
    log_every = max(1, steps // 6)
    return [a.format(out=out, steps=steps, log_every=log_every, name=job.name, device=device) for a in args]


# ---------------------------------------------------------------------------------------------------
# One job: a child process capped at the memory of a small card
# ---------------------------------------------------------------------------------------------------

def child() -> None:
    """Entry of the child process: ``python -c 'from common.gpu_check import child; child()' MODULE CAP ARGS``.
    Caps torch's CUDA allocator at CAP bytes (0: no cap), then runs MODULE as ``python -m`` would."""
    import runpy

    module, cap = sys.argv[1], int(sys.argv[2])
    if cap:
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    sys.argv = [module] + sys.argv[3:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def zygote() -> None:
    """The dry mode's runner for one chain: ``python -c 'from common.gpu_check import zygote; zygote()' MODULE...``.
    It imports the chain's modules once (no torch op runs, so no thread pool exists to break a fork), then for
    each request line on stdin (JSON: module, argv, log) forks a child that runs the module as ``python -m``
    would, stdout and stderr in the log file, and answers ``{"pid"}`` at the start and ``{"code"}`` at the end.
    A fork costs milliseconds; a fresh interpreter spends seconds of CPU importing torch and transformers."""
    from common.forkrun import preload, run_child

    preload(sys.argv[1:])
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: the job, as `python -m module argv...`, stdout and stderr in one log
            run_child([request["module"], *request["argv"]], request["log"])
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


class Zygote:
    """The parent's side of ``zygote``: one per chain in the dry mode, its jobs run one after the other."""

    def __init__(self, modules: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-c", "from common.gpu_check import zygote; zygote()",
                                      *modules], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, module: str, argv: list[str], log: Path, timeout_s: float) -> tuple[int, bool]:
        """(exit code, timed out) of one job."""
        self.proc.stdin.write(json.dumps({"module": module, "argv": argv, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            return -1, False  # the runner itself died (its error is on our stderr)
        pid = json.loads(line)["pid"]
        fired = threading.Event()

        def kill() -> None:
            fired.set()
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        line = self.proc.stdout.readline()
        timer.cancel()
        return (json.loads(line)["code"] if line else -1), fired.is_set()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput: the median of the training log records after the first (the first holds the warm-up;
    with a single record, that one). Memory: the largest peak any record saw (allocated, and reserved on
    CUDA: the caching allocator's high-water mark, what the card must hold)."""
    steps = [r for r in records if "tok_per_s" in r]
    if not steps:
        return {}
    timed = steps[1:] or steps
    out = {"logged_steps": [r["step"] for r in steps], "tok_per_s": statistics.median(r["tok_per_s"] for r in timed),
           "peak_allocated_gib": max(r.get("mem_bytes", 0) for r in steps) / GIB,
           "final_train_loss": steps[-1].get("loss")}
    reserved = [r["mem_reserved_bytes"] for r in steps if "mem_reserved_bytes" in r]
    if reserved:
        out["peak_reserved_gib"] = max(reserved) / GIB
    return out


def last_error_line(text: str) -> str:
    """The line a failed child left for the user: its ``error:`` line, else the traceback's last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln
    return lines[-1] if lines else "(no output)"


def job_env(threads: int) -> dict[str, str]:
    return {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1",
            **({"OMP_NUM_THREADS": str(threads)} if threads else {})}


def run_job(job: Job, device: str, steps: int, out: Path, cap_bytes: int, timeout_s: float,
            threads: int = 0, runner: Zygote | None = None) -> dict[str, Any]:
    """One job: a fresh child process (on CUDA: with the memory cap), or a fork of the chain's ``runner``."""
    args = job_command(job, device, steps, out)
    shown = f"python -m {job.module} " + " ".join(args)
    job_dir = out / job.name
    job_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if runner is not None:
        output = job_dir / "output.txt"
        rc, timed_out = runner.run(job.module, args, output, timeout_s)
        text = output.read_text(errors="replace") if output.exists() else ""
        text += f"\ntimed out after {timeout_s:.0f} s" if timed_out else ""
        output.unlink(missing_ok=True)
    else:
        cmd = [sys.executable, "-c", "from common.gpu_check import child; child()", job.module,
               str(cap_bytes if job.measure else 0), *args]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=job_env(threads), capture_output=True, text=True,
                                  timeout=timeout_s)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            rc, text = -1, f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {timeout_s:.0f} s"
    wall = time.perf_counter() - t0
    (job_dir / "gpu_check.log").write_text(shown + "\n\n" + text)
    row: dict[str, Any] = {"job": job.name, "module": job.module, "what": job.what, "command": shown,
                           "wall_s": round(wall, 1), "exit_code": rc}
    if rc != 0:
        oom = "OutOfMemoryError" in text or "CUDA out of memory" in text
        row["status"] = "over the memory cap" if oom else "failed"
        row["error"] = last_error_line(text)
        return row
    row["status"] = "ok"
    if job.measure:
        row.update(summarize_metrics(read_metrics(job_dir / "metrics.jsonl")))
        if "tok_per_s" not in row:
            row["status"], row["error"] = "failed", "no training log records in metrics.jsonl"
        # a few steps are no result: keep them out of `make results` (common/results.py gathers results.json)
        (job_dir / "results.json").unlink(missing_ok=True)
    return row


# ---------------------------------------------------------------------------------------------------
# Kernel checks: each CUDA path once, against the same arithmetic in plain torch
# ---------------------------------------------------------------------------------------------------

def _max_rel_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def check_bnb_linear4bit(device) -> dict[str, Any]:
    """bitsandbytes' NF4 layer (the QLoRA base: blocks of 64, one absmax each) against x @ dequantized W^T."""
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    dense = torch.nn.Linear(512, 1024, bias=False)
    layer = bnb.nn.Linear4bit(512, 1024, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer = layer.to(device)
    x = torch.randn(16, 512, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    want = x @ w.t()
    quant_err = _max_rel_err(w.float().cpu(), dense.weight.detach())  # what 4 bits cost (not a kernel error)
    err = _max_rel_err(got, want)
    return {"max_rel_err": err, "tolerance": 2e-2, "ok": err < 2e-2, "weight_quantization_rel_err": quant_err}


def check_bnb_linear8bit(device) -> dict[str, Any]:
    """bitsandbytes' LLM.int8() layer (threshold 6: outlier columns in 16 bits) against x @ W^T: the 8-bit
    weight and the row-wise 8-bit activations bound the error at a few per cent of the output's scale."""
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    dense = torch.nn.Linear(512, 1024, bias=False)
    layer = bnb.nn.Linear8bitLt(512, 1024, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to(device)
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    x = torch.randn(16, 512, device=device, dtype=dtype)
    with torch.no_grad():
        got, want = layer(x), x.float() @ dense.weight.to(device).t()
    err = _max_rel_err(got, want)
    return {"max_rel_err": err, "tolerance": 5e-2, "ok": err < 5e-2}


def check_bnb_adam8bit(device) -> dict[str, Any]:
    """bitsandbytes' 8-bit Adam (block-wise quantized states) against torch's Adam: 50 steps on the same
    least-squares problem, parameters compared."""
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    a, b = torch.randn(256, 128, device=device), torch.randn(256, 64, device=device)
    start = torch.randn(128, 64, device=device) * 0.1
    initial = ((a @ start - b) ** 2).mean().item()
    finals = []
    for make in (lambda p: torch.optim.Adam(p, lr=1e-2), lambda p: bnb.optim.Adam8bit(p, lr=1e-2, min_8bit_size=4096)):
        w = torch.nn.Parameter(start.clone())
        opt = make([w])
        for _ in range(50):
            loss = ((a @ w - b) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        finals.append((w.detach().clone(), loss.item()))
    (w32, l32), (w8, l8) = finals
    # the 50 updates against torch's, as a norm of the difference relative to how far torch's Adam went
    err = float((w8 - w32).norm() / (w32 - start).norm())
    return {"rel_err_of_update": err, "tolerance": 5e-2, "ok": err < 5e-2 and l32 < 0.9 * initial,
            "loss_start": initial, "loss_adam32": l32, "loss_adam8bit": l8}


def check_deepseek_fp8_triton(device) -> dict[str, Any]:
    """deepseek_v3's triton kernels (act_quant 1x128, weight_quant / weight_dequant 128x128, the FP8 GEMM) against
    its plain-torch reference (deepseek_v3/fp8.py). A subprocess: on the CPU triton needs TRITON_INTERPRET=1 set
    before it is imported."""
    on_cuda = str(device).startswith("cuda")
    env = {**os.environ, **({} if on_cuda else {"TRITON_INTERPRET": "1"})}
    proc = subprocess.run([sys.executable, "-m", "deepseek_v3.kernels"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(last_error_line(proc.stdout + proc.stderr))
    values = {ln.split()[0]: float(ln.split()[1]) for ln in proc.stdout.splitlines()
              if ln.strip() and not ln.startswith("device")}
    # fp8 values may differ by one rounding step where the GPU's division rounds differently: a tiny share
    ok = (values["act_quant_values"] < 1e-3 and values["weight_quant_values"] < 1e-3
          and max(values["act_quant_scales"], values["weight_quant_scales"], values["weight_dequant"]) < 1e-5
          and values["fp8_gemm_relative"] < 1e-3)
    return {"max_rel_err": values["fp8_gemm_relative"], "tolerance": 1e-3, "ok": ok, **values}


# name -> (what, function(device) -> dict with "ok"); chapters with triton kernels add theirs here
KERNEL_CHECKS: dict[str, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    "bnb_linear4bit_nf4": ("bitsandbytes Linear4bit (NF4, bf16 compute) vs x @ dequantized W", check_bnb_linear4bit),
    "bnb_linear8bit": ("bitsandbytes Linear8bitLt (LLM.int8(), threshold 6) vs x @ W", check_bnb_linear8bit),
    "bnb_adam8bit": ("bitsandbytes Adam8bit vs torch Adam, 50 steps of least squares", check_bnb_adam8bit),
    "deepseek_fp8_triton": ("deepseek_v3's triton FP8 kernels (block-wise quantisation, FP8 GEMM) vs plain torch",
                            check_deepseek_fp8_triton),
}


def run_kernel_checks(device, names: list[str] | None) -> list[dict[str, Any]]:
    rows = []
    for name, (what, fn) in KERNEL_CHECKS.items():
        if names and name not in names:
            continue
        t0 = time.perf_counter()
        try:
            row = {"check": name, "what": what, **fn(device)}
            row["status"] = "ok" if row.pop("ok") else "wrong result"
        except Exception as err:  # a missing CUDA build of a library is a result to report, not a crash
            row = {"check": name, "what": what, "status": "failed", "error": f"{type(err).__name__}: {err}"}
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------

def machine_info(device: str) -> dict[str, Any]:
    import torch

    info = {"date": date.today().isoformat(), "device": device, "python": platform.python_version(),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1), cuda=torch.version.cuda,
                    bf16_supported=torch.cuda.is_bf16_supported())
    for lib in ("bitsandbytes", "triton", "transformers"):
        try:
            info[lib] = __import__(lib).__version__
        except Exception:  # noqa: BLE001 - not installed or no build for this machine: say so
            info[lib] = "not available"
    return info


def format_table(report: dict[str, Any]) -> str:
    m, cap = report["machine"], report["memory_cap_gib"]
    where = m.get("gpu", f"CPU ({m['cpu']}, dry mode: the figures mean nothing)")
    head = f"gpu-check {m['date']} on {where}, torch {m['torch']}, {report['steps']} steps per job"
    lines = [head + (f", memory cap {cap} GiB" if cap else ""), "",
             "| job | status | peak reserved GiB | peak allocated GiB | tokens/s | wall s |",
             "|---|---|---|---|---|---|"]
    for r in report["jobs"]:
        if r.get("skipped"):
            lines.append(f"| {r['job']} | skipped: {r['skipped']} | | | | |")
            continue
        res = r.get("peak_reserved_gib")
        lines.append(f"| {r['job']} | {r['status']} | {'' if res is None else f'{res:.2f}'} | "
                     f"{r.get('peak_allocated_gib', 0):.2f} | {r.get('tok_per_s', 0):,.0f} | {r['wall_s']:.0f} |"
                     if "tok_per_s" in r else f"| {r['job']} | {r['status']} | | | | {r['wall_s']:.0f} |")
    lines += ["", "| kernel check | status | relative error (tolerance) |", "|---|---|---|"]
    for r in report["kernels"]:
        err = r.get("max_rel_err", r.get("rel_err_of_update"))
        lines.append(f"| {r['check']} | {r['status']} | "
                     + (f"{err:.2e} ({r['tolerance']:.0e})" if err is not None else r.get("error", "")) + " |")
    failed = [r for r in report["jobs"] + report["kernels"] if r.get("status") not in ("ok", None)]
    lines += ["", "errors:" if failed else "all jobs and checks ok"]
    lines += [f"- {r.get('job', r.get('check'))}: {r.get('error', r['status'])}" for r in failed]
    return "\n".join(lines) + "\n"


def write_tiny_pairs(folder: Path, n: int = 12) -> None:
    """The dry mode's stand-in for an image-caption set: n small pictures of a coloured square, captioned
    with its colour, as train.csv and valid.csv (filepath,title)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    colors = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 220)}
    rows = []
    for i in range(n):
        name = list(colors)[i % len(colors)]
        im = Image.new("RGB", (64, 64), (245, 240, 235))
        im.paste(colors[name], (8 + 3 * i, 8 + 2 * i, 30 + 3 * i, 30 + 2 * i))
        im.save(folder / f"{i}.png")
        rows.append(f"{i}.png,a {name} square")
    (folder / "train.csv").write_text("filepath,title\n" + "\n".join(rows[: n * 2 // 3]) + "\n")
    (folder / "valid.csv").write_text("filepath,title\n" + "\n".join(rows[n * 2 // 3:]) + "\n")
    # the same pictures as LLaVA conversations (llava's dry runs)
    conv = [json.dumps({"image": r.split(",")[0], "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the square?"},
        {"from": "gpt", "value": r.split(",")[1].split()[1]}]}) for r in rows]
    (folder / "conv.jsonl").write_text("\n".join(conv) + "\n")


def write_tiny_text(path: Path) -> None:
    """The dry mode's stand-in for a big corpus: the Chinese README, one document per non-empty line."""
    lines = [ln.strip() for ln in (ROOT / "README_zh.md").read_text(encoding="utf-8").splitlines() if ln.strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": ln}, ensure_ascii=False) + "\n" for ln in lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available, else the CPU dry mode), cuda, cpu")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per job (0: 30 on CUDA, 2 on the CPU)")
    p.add_argument("--memory-cap-gib", type=float, default=3.5,
                   help="CUDA allocator cap per job: what a 4 GB card leaves after the CUDA context (0: none)")
    p.add_argument("--only", nargs="*", default=[], help="these jobs (and kernel checks) only; needed jobs run too")
    p.add_argument("--workers", type=int, default=0,
                   help="independent chains of jobs at once (0: 1 on CUDA, where each is measured alone; 2 on the CPU)")
    p.add_argument("--timeout-s", type=float, default=600, help="per job")
    p.add_argument("--out", default="runs/gpu_check", help="the jobs' folders, gpu_check.json, gpu_check.md")
    args = p.parse_args(argv)
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    cuda = device.startswith("cuda")
    steps = args.steps or (30 if cuda else 2)
    if steps < 1:
        print(f"error: --steps must be >= 1, got {steps}", file=sys.stderr)
        return 1
    unknown = sorted(set(args.only) - {j.name for j in JOBS} - set(KERNEL_CHECKS))
    if unknown:
        known = [j.name for j in JOBS] + list(KERNEL_CHECKS)
        print(f"error: --only {' '.join(unknown)}: not a job or check ({', '.join(known)})", file=sys.stderr)
        return 1
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not cuda:
        write_tiny_text(out / "tiny_text.jsonl")
        write_tiny_pairs(out / "tiny_pairs")
    cap = int(args.memory_cap_gib * GIB) if cuda else 0

    wanted = set(args.only)
    for job in reversed(JOBS):  # what the wanted jobs read comes along
        if job.name in wanted:
            wanted.update(job.needs)
    jobs = [j for j in JOBS if not args.only or j.name in wanted]
    rows: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    # On the GPU one job at a time (each must have the device to itself to be measured); in the dry mode
    # the independent chains (a job and what reads its output) share the CPU, one thread each.
    workers = args.workers or (1 if cuda else 2)
    threads = 0 if workers == 1 else max(1, (os.cpu_count() or 2) // workers)
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            print(line, flush=True)

    def run_chain(chain: list[Job]) -> None:
        # the dry mode forks each job from one interpreter that imported the chain's modules (POSIX); on the
        # GPU every job is a fresh process, its allocator capped
        fork = not cuda and hasattr(os, "fork")
        runner = Zygote([j.module for j in chain if not j.cuda_only], job_env(threads)) if fork else None
        try:
            run_jobs(chain, runner)
        finally:
            if runner is not None:
                runner.close()

    def run_jobs(chain: list[Job], runner: Zygote | None) -> None:
        for job in chain:
            if job.cuda_only and not cuda:
                rows[job.name] = {"job": job.name, "what": job.what, "skipped": "CUDA only"}
                continue
            if any(rows.get(n, {}).get("status") != "ok" for n in job.needs):
                rows[job.name] = {"job": job.name, "what": job.what, "skipped": f"needs {', '.join(job.needs)}"}
                continue
            say(f"{job.name}: {job.what or job.module} ...")
            r = rows[job.name] = run_job(job, device, steps, out, cap, args.timeout_s, threads, runner)
            if cap and r.get("peak_reserved_gib", 0) > args.memory_cap_gib:
                r["status"], r["error"] = "over the memory cap", f"reserved {r['peak_reserved_gib']:.2f} GiB"
            say(f"{job.name}: {r['status']} in {r['wall_s']:.0f} s" + (f": {r['error']}" if "error" in r else "")
                + (f" | {r['tok_per_s']:,.0f} tok/s, peak {r.get('peak_reserved_gib', r['peak_allocated_gib']):.2f}"
                   " GiB" if "tok_per_s" in r else ""))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run_chain, job_chains(jobs)))
    rows = {j.name: rows[j.name] for j in jobs}  # the table in JOBS' order
    kernel_names = [n for n in args.only if n in KERNEL_CHECKS] if args.only else None
    kernels = [] if args.only and not kernel_names else run_kernel_checks(torch.device(device), kernel_names)
    report = {"machine": machine_info(device), "steps": steps, "memory_cap_gib": args.memory_cap_gib if cap else 0,
              "wall_s": round(time.perf_counter() - t_start, 1), "jobs": list(rows.values()), "kernels": kernels,
              "jobs_defined": [asdict(j) for j in JOBS], "triton_kernels": [n for n in KERNEL_CHECKS if "triton" in n]}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    table = format_table(report)
    (out / "gpu_check.md").write_text(table)
    print("\n" + table + f"written: {out / 'gpu_check.json'}, {out / 'gpu_check.md'} | {report['wall_s']:.0f} s in all")
    bad = [r for r in report["jobs"] + kernels if r.get("status") not in ("ok", None)]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
