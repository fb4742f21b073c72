"""The one error path (common/cli.py), typed JSONL records, flag ranges, and resume checks (common/checkpoint.py):
each expected failure is one line that names the file and line or the flag."""

import json
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

from common import checkpoint, cli, config, data
from common.errors import UserError


# --- the entry-point wrapper --------------------------------------------------------------------------------
@dataclass
class Cfg:
    batch_size: int = 4  # per step
    dropout_p: float = 0.1  # a probability (<= 1)
    scale: float = 1.0  # any positive number (> 0)
    out: str = "x"  # where


def _fail(cfg: Cfg):
    raise UserError(f"data.jsonl:7: field 'text' is null, expected a string (batch {cfg.batch_size})")


def test_an_expected_error_is_one_line_and_exit_1(capsys):
    with pytest.raises(SystemExit) as e:
        cli.run_main(_fail, Cfg, argv=[])
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: data.jsonl:7: field 'text' is null, expected a string (batch 4)\n"
    with pytest.raises(UserError):  # --debug: the traceback (the exception itself)
        cli.run_main(_fail, Cfg, argv=["--debug"])


def test_files_nan_and_the_scripts_own_system_exit_become_one_line(capsys, monkeypatch):
    monkeypatch.delenv("TUTORIALS_DEBUG", raising=False)
    for err, line in ((FileNotFoundError(2, "No such file or directory", "runs/x/final"),
                       "error: runs/x/final: No such file or directory\n"),
                      (FloatingPointError("loss is nan at step 3; lower --lr"),
                       "error: loss is nan at step 3; lower --lr\n"),
                      (SystemExit("--vocab-size 99: the student must share\nthe teacher's tokens"),
                       "error: --vocab-size 99: the student must share the teacher's tokens\n")):
        with pytest.raises(SystemExit) as e, cli.user_errors(debug=False):
            raise err
        assert e.value.code == 1 and capsys.readouterr().err == line
    with pytest.raises(KeyError), cli.user_errors(debug=False):  # a bug keeps its traceback
        raise KeyError("unexpected")
    monkeypatch.setenv("TUTORIALS_DEBUG", "1")
    assert cli.debug_requested([])


def test_flag_ranges_from_comments_and_defaults_name_the_flag():
    assert config.field_ranges(Cfg) == {"batch_size": (">=", 1), "dropout_p": ("<=", 1), "scale": (">", 0)}
    assert config.parse_config(Cfg, ["--batch-size", "2"]).batch_size == 2
    for argv, msg in ((["--batch-size", "0"], "--batch-size 0: expected >= 1"),
                      (["--dropout-p", "1.5"], "--dropout-p 1.5: expected <= 1"),
                      (["--scale", "-2"], "--scale -2.0: expected > 0")):
        with pytest.raises(UserError, match=msg):
            config.parse_config(Cfg, argv)
    with pytest.raises(UserError, match=r"--batch-size -1 \(the value of --preset bad\): expected >= 1"):
        config.parse_config(Cfg, ["--preset", "bad"], presets={"bad": {"batch_size": -1}})


def test_a_real_script_prints_one_line_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "appendix.rnn", "--batch-size", "0"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --batch-size 0: expected >= 1" and "Traceback" not in proc.stderr


# --- data readers ---------------------------------------------------------------------------------------------
def test_jsonl_records_are_typed_and_real_line_numbers_are_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n\n\n{"text": 12345}\n')
    with pytest.raises(UserError, match=r"d.jsonl:4: field 'text' is an integer, expected a string"):
        list(data.iter_jsonl(path, {"text": str}))
    path.write_bytes(b'{"text": null}\n')
    with pytest.raises(UserError, match=r"d.jsonl:1: field 'text' is null, expected a string"):
        list(data.iter_jsonl(path, {"text": str}))
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')  # latin-1, not UTF-8
    with pytest.raises(UserError, match=r"d.jsonl:2: not UTF-8 text \(byte 14 of the line"):
        list(data.iter_jsonl(path, {"text": str}))
    path.write_bytes(b'\n{"a": 1}\n\n{"a": 2}\n')
    assert list(data.iter_jsonl(path, ["a"], with_lineno=True)) == [(2, {"a": 1}), (4, {"a": 2})]
    text = tmp_path / "t.txt"
    text.write_bytes(b"one\ntwo\nthr\xffee\n")
    with pytest.raises(UserError, match=r"t.txt:3: not UTF-8 text \(byte 4 of the line\)"):
        data.read_text_file(text)


# --- resume ---------------------------------------------------------------------------------------------------
def _model(width: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 2))


@dataclass
class TrainCfg:
    width: int = 4  # model width
    lr: float = 0.1
    warmup_iters: int = 1
    max_iters: int = 10
    log_every: int = 1
    extra: dict = field(default_factory=dict)


def _save(root, step, width=4):
    m = _model(width)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    m(torch.ones(1, width)).sum().backward()
    opt.step()  # so the optimizer has state to save
    with torch.no_grad():
        m[0].weight.fill_(step)  # each checkpoint's weights say which step it is
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    checkpoint.save_checkpoint(root, step, m, {"width": width}, opt, sched, keep=3)


def test_resume_names_the_flag_that_differs_from_the_checkpoint(tmp_path):
    _save(tmp_path / "ck", 2, width=4)
    m = _model(8)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    with pytest.raises(UserError, match=r"0.bias is \(4,\) there, \(8,\) here.*--width 8 \(the checkpoint: 4\)"):
        checkpoint.resume_or_start(m, opt, TrainCfg(width=8), tmp_path / "run", tmp_path / "ck" / "step_000002",
                                   "cpu")
    m = _model(4)  # a flag that leaves the shapes alone (the learning rate) may change on resume
    _, start, _ = checkpoint.resume_or_start(m, torch.optim.AdamW(m.parameters(), lr=0.1), TrainCfg(lr=0.5),
                                             tmp_path / "run", tmp_path / "ck" / "step_000002", "cpu")
    assert start == 2


@pytest.mark.parametrize("damage", ["model.safetensors", "trainer_state.pt"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path, damage, capsys):
    for step in (1, 2):
        _save(tmp_path / "ck", step)
    newest = tmp_path / "ck" / "step_000002" / damage
    newest.write_bytes(newest.read_bytes()[: len(newest.read_bytes()) // 2])  # cut short, as by a crash
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    _, start, _ = checkpoint.resume_or_start(m, opt, TrainCfg(), tmp_path / "run",
                                             checkpoint.latest_checkpoint(tmp_path / "ck"), "cpu")
    assert start == 1 and m[0].weight[0, 0].item() == 1.0
    err = capsys.readouterr().err
    assert "step_000002 cannot be read" in err and "trying the next older one" in err


def test_only_damaged_checkpoints_is_one_clear_error(tmp_path):
    _save(tmp_path / "ck", 1)
    (tmp_path / "ck" / "step_000001" / "model.safetensors").write_bytes(b"not a safetensors file")
    m = _model()
    with pytest.raises(UserError, match="no checkpoint in .* can be read"):
        checkpoint.resume_or_start(m, torch.optim.AdamW(m.parameters(), lr=0.1), TrainCfg(), tmp_path / "run",
                                   tmp_path / "ck" / "step_000001", "cpu")


def test_a_damaged_weights_file_at_ckpt_names_the_file(tmp_path):
    checkpoint.save_pretrained(_model(), {"width": 4}, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match=r"model.safetensors: not a readable safetensors file"):
        checkpoint.load_pretrained(_model(), tmp_path)
    checkpoint.save_pretrained(_model(8), {"width": 8}, tmp_path)
    with pytest.raises(UserError, match=r"0.weight \(8, 8\) in the file, \(4, 4\) in the model"):
        checkpoint.load_pretrained(_model(4), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"width": 8}
