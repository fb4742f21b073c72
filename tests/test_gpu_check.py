"""make gpu-check: the job table, the figures it reads off metrics.jsonl, the report, and its dry mode on the
CPU (every job's real command for 2 steps, every chain, every kernel check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import gpu_check
from common.gpu_check import GIB, JOBS, Job, job_chains, job_command, last_error_line, summarize_metrics

RUN_FIRST = 3  # a long file: collected early (tests/conftest.py; the larger, the earlier)
ROOT = Path(__file__).resolve().parent.parent


def test_throughput_skips_the_warm_up_record_and_memory_is_the_highest_peak():
    records = [{"step": 0, "valid_loss": 9.0},
               {"step": 5, "loss": 9, "tok_per_s": 10.0, "mem_bytes": 1 * GIB, "mem_reserved_bytes": 2 * GIB},
               {"step": 10, "loss": 8, "tok_per_s": 100.0, "mem_bytes": 3 * GIB, "mem_reserved_bytes": 4 * GIB},
               {"step": 15, "loss": 7, "tok_per_s": 300.0, "mem_bytes": 2 * GIB, "mem_reserved_bytes": 3 * GIB},
               {"step": 20, "loss": 6, "tok_per_s": 200.0, "mem_bytes": 2 * GIB, "mem_reserved_bytes": 3 * GIB}]
    s = summarize_metrics(records)
    assert s["tok_per_s"] == 200.0  # median of 100, 300, 200: the first record's 10 is the warm-up
    assert s["peak_allocated_gib"] == 3.0 and s["peak_reserved_gib"] == 4.0
    assert s["logged_steps"] == [5, 10, 15, 20] and s["final_train_loss"] == 6
    one = summarize_metrics(records[:2])
    assert one["tok_per_s"] == 10.0 and "peak_reserved_gib" in one
    assert "peak_reserved_gib" not in summarize_metrics([{"step": 1, "tok_per_s": 1.0, "mem_bytes": 5}])
    assert summarize_metrics([{"step": 0, "valid_loss": 1.0}]) == {}


def test_commands_fill_the_placeholders_per_device():
    job = next(j for j in JOBS if j.name == "gpt_pretrain")
    out = Path("/x")
    gpu, cpu = job_command(job, "cuda", 30, out), job_command(job, "cpu", 2, out)
    assert gpu[gpu.index("--preset") + 1] == "gpu4gb" and gpu[gpu.index("--max-iters") + 1] == "30"
    assert gpu[gpu.index("--device") + 1] == "cuda" and gpu[gpu.index("--out-dir") + 1] == "/x/gpt_pretrain"
    assert gpu[gpu.index("--log-every") + 1] == "5" and cpu[cpu.index("--log-every") + 1] == "1"
    assert "--batch-size" in cpu and "--batch-size" not in gpu  # the dry mode's tiny batch only on the CPU
    assert not any("{" in a for a in gpu + cpu)
    lora = job_command(next(j for j in JOBS if j.name == "gpt_qlora"), "cuda", 30, out)
    assert "--preset" not in lora and lora[lora.index("--init-from") + 1] == "/x/gpt_pretrain/final"
    prep = job_command(next(j for j in JOBS if not j.measure), "cpu", 2, out)
    assert "--max-iters" not in prep


def test_every_chapter_with_a_gpu4gb_preset_has_a_job():
    presets = {p.parent.name + "." + p.stem for p in ROOT.glob("*/train_*.py") if "gpu4gb" in p.read_text()}
    assert presets and presets <= {j.module for j in JOBS if j.preset}


def test_chains_put_each_job_after_what_it_needs():
    chains = job_chains(JOBS)
    for chain in chains:
        seen = set()
        for job in chain:
            assert set(job.needs) <= seen or not job.needs, (job.name, seen)
            seen.add(job.name)
    assert sorted(j.name for c in chains for j in c) == sorted(j.name for j in JOBS)
    assert len(chains) >= 4  # gpt, bert, t5, translate run independently


def test_last_error_line_prefers_the_error_line():
    assert last_error_line("x\nerror: data.jsonl:3: bad\nTraceback?\n") == "error: data.jsonl:3: bad"
    assert last_error_line("Traceback (most recent call last):\n  ...\nRuntimeError: boom\n\n") == "RuntimeError: boom"
    assert last_error_line("") == "(no output)"


def test_a_failed_job_fails_the_check_and_skips_what_reads_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "JOBS", [Job("first", "no_such_module_here", measure=False),
                                            Job("second", "no_such_module_either", needs=["first"])])
    monkeypatch.setattr(gpu_check, "KERNEL_CHECKS", {"broken": ("raises", lambda device: 1 / 0)})
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    first, second = report["jobs"]
    assert first["status"] == "failed" and "no_such_module_here" in first["error"]
    assert second["skipped"] == "needs first"
    assert report["kernels"][0]["status"] == "failed" and "ZeroDivisionError" in report["kernels"][0]["error"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "errors:" in table and "- first:" in table and "- broken:" in table


def test_unknown_job_and_missing_cuda_are_one_line(tmp_path, capsys):
    assert gpu_check.main(["--only", "nope", "--device", "cpu", "--out", str(tmp_path)]) == 1
    assert "error: --only nope: not a job or check" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert gpu_check.main(["--device", "cuda", "--out", str(tmp_path)]) == 1
        assert "torch sees no CUDA device" in capsys.readouterr().err


def test_the_dry_mode_runs_every_job_and_check(tmp_path):
    """The whole check as CI can run it: every job's real command for 2 steps on the CPU (the CUDA-only one
    skipped), every chain, every kernel check; one JSON, one table."""
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "common.gpu_check", "--device", "cpu", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    by_name = {r["job"]: r for r in report["jobs"]}
    assert set(by_name) == {j.name for j in JOBS}
    for job in JOBS:
        row = by_name[job.name]
        if job.cuda_only:
            assert row["skipped"] == "CUDA only"
            continue
        assert row["status"] == "ok", row
        if job.measure:
            assert row["logged_steps"] == [1, 2] and row["tok_per_s"] > 0 and row["peak_allocated_gib"] > 0
            assert not (tmp_path / job.name / "results.json").exists()  # a 2-step run is no result
            assert (tmp_path / job.name / "final").is_dir()
    assert {k["check"] for k in report["kernels"]} == set(gpu_check.KERNEL_CHECKS)
    assert all(k["status"] == "ok" for k in report["kernels"]), report["kernels"]
    assert "all jobs and checks ok" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.parametrize("name", list(gpu_check.KERNEL_CHECKS))
def test_kernel_checks_catch_a_wrong_kernel(name, monkeypatch):
    """Each check compares against plain torch: a library call that returned garbage must fail it."""
    import bitsandbytes as bnb
    import torch

    if "linear4bit" in name:
        real = bnb.nn.Linear4bit.forward
        monkeypatch.setattr(bnb.nn.Linear4bit, "forward", lambda self, x: real(self, x) * 1.1)
    elif "linear8bit" in name:
        real = bnb.nn.Linear8bitLt.forward
        monkeypatch.setattr(bnb.nn.Linear8bitLt, "forward", lambda self, x: real(self, x) * 1.1)
    elif name == "deepseek_fp8_triton":  # the kernels run in a subprocess: what a wrong GEMM would print there
        import subprocess

        report = ("act_quant_values 0\nact_quant_scales 0\nweight_quant_values 0\nweight_quant_scales 0\n"
                  "weight_dequant 0\nfp8_gemm_relative 0.08\ndevice cpu\n")
        monkeypatch.setattr(gpu_check.subprocess, "run",
                            lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, report, ""))
    else:
        real = bnb.optim.Adam8bit.step
        monkeypatch.setattr(bnb.optim.Adam8bit, "step", lambda self, *a, **k: None)  # a step that does nothing
    _, fn = gpu_check.KERNEL_CHECKS[name]
    assert not fn(torch.device("cpu"))["ok"]
