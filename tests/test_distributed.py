"""Two CPU processes under torchrun (gloo): data-parallel training keeps the ranks' weights equal."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_two_ranks(out: Path, data_file: Path, strategy: str, worker: str = "dist_worker.py") -> tuple[dict, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(ROOT / "tests" / worker), str(out), str(data_file), strategy]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (out / "final" / "model.safetensors").exists()
    return r0, r1


def assert_same_final_weights(a: Path, b: Path) -> None:
    """The two runs' saved final/model.safetensors hold the same tensors, up to float summation order.
    Attention key biases are skipped: q·b_k is the same for every key, so softmax cancels it and their
    true gradient is 0; what they get is rounding noise, which Adam scales up to lr-sized random steps."""
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        if name.endswith("k_proj.bias"):
            continue
        torch.testing.assert_close(wb[name], wa[name], atol=1e-5, rtol=0, msg=name)


def test_ddp_and_fsdp_two_ranks_agree(tmp_path, digits_file):
    ddp0, ddp1 = run_two_ranks(tmp_path / "ddp", digits_file, "ddp")
    assert ddp0["sha256"] == ddp1["sha256"], "DDP ranks drifted apart"
    assert ddp0["losses"] == ddp1["losses"]  # the logged loss is the all-reduced mean
    assert len(ddp0["losses"]) == 6 and ddp0["losses"][-1] < ddp0["losses"][0]
    fsdp0, fsdp1 = run_two_ranks(tmp_path / "fsdp", digits_file, "fsdp")
    assert fsdp0["sha256"] == fsdp1["sha256"]
    # sharded training computes the same updates as replicated training, up to float summation order
    assert fsdp0["losses"] == pytest.approx(ddp0["losses"], rel=1e-4)
    assert_same_final_weights(tmp_path / "ddp", tmp_path / "fsdp")


def test_gpt_pretraining_ddp_and_fsdp_two_ranks_agree(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    ddp0, ddp1 = run_two_ranks(tmp_path / "ddp", text, "ddp", "dist_worker_gpt.py")
    assert ddp0["sha256"] == ddp1["sha256"] and ddp0["losses"] == ddp1["losses"]
    assert len(ddp0["losses"]) == 6 and ddp0["losses"][-1] < ddp0["losses"][0]
    # FSDP with the head and the loss in chunks (LinearCrossEntropy, the tied head read straight from the
    # root module): the same updates as DDP with whole logits
    fsdp0, fsdp1 = run_two_ranks(tmp_path / "fsdp", text, "fsdp:8", "dist_worker_gpt.py")
    assert fsdp0["sha256"] == fsdp1["sha256"]
    assert fsdp0["losses"] == pytest.approx(ddp0["losses"], rel=1e-4)
    assert_same_final_weights(tmp_path / "ddp", tmp_path / "fsdp")
