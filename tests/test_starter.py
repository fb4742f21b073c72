"""common.starter: every chapter, copied out into a temporary folder, works there as a project of its own.

For each chapter the starter is written into a temporary folder; then, in subprocesses whose working directory is
that folder, with it first on PYTHONPATH and the repository made unimportable (a sitecustomize drops the editable
install's finder; the subprocess checks that every other chapter fails to import and that `common` is the copy):
  1. every script of the copied chapter (a module with `if __name__ == "__main__"`) that has a command line
     renders --help (the data fetchers too: common.config.parse_no_flags answers --help before any work). A
     script without options is imported.
  2. the chapter's main training script runs a few steps as `python -m` would run it (runpy, sys.argv), with
     the tiny settings its tests use (SMOKE below), and writes its metrics;
  3. the copied tests: all of them run for transformer_basics (the fastest, ~10 s); for the other chapters
     pytest collects them (imports every copied test file and what it imports, and builds every
     parametrisation) without running them. The copied tests are the repository's own tests, which the suite
     runs anyway: what copying can break is imports and paths, which collection catches, and running them
     again would add ~100 s to the suite. The smoke run of step 2 trains in the copy instead.
  All three run in one interpreter, so torch, transformers and the chapter are imported once per chapter.
It also checks that the derived pyproject.toml lists a distribution for every third-party import of the copied
files (walked here with ast, module and function level), that pip reads it, the starter's errors (DEST not empty,
not a chapter), and the rules that deselect a copied test needing the rest of the repository.
"""

import ast
import functools
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import starter

RUN_FIRST = 2  # a long file: collected early (tests/conftest.py; the larger, the earlier)
ROOT = Path(__file__).resolve().parents[1]
RUN_ALL_TESTS = {"transformer_basics"}

# each chapter's main training script with the tiny settings of its tests; a tuple is the first of its spellings
# that the script's --help lists (flags get renamed; the old name stays a hidden alias for a while)
SMOKE = {
    "transformer_basics": ("transformer_basics.train_translate", [
        "--data-file", "{digits}", ("--d-model",), "32", ("--n-heads",), "4", ("--n-encoder-layers",), "2",
        ("--n-decoder-layers",), "2", "--src-vocab-size", "60", "--batch-size", "16", "--schedule", "cosine",
        "--lr", "3e-3", ("--warmup-iters", "--warmup-steps"), "2", ("--max-iters", "--max-steps"), "4",
        "--eval-every", "2", "--save-every", "2", "--log-every", "2", "--threads", "1"]),
    "gpt_minimind": ("gpt_minimind.train_pretrain", [
        "--text-file", "{text}", "--tokenizer", "char", ("--hidden-size", "--dim"), "32",
        ("--num-hidden-layers", "--n-layer"), "2", ("--num-attention-heads", "--n-head"), "4",
        ("--num-key-value-heads", "--n-kv-head"), "2", ("--max-position-embeddings", "--block-size"), "32",
        "--batch-size", "8", "--lr", "3e-3", "--warmup-iters", "2", "--max-iters", "4", "--eval-every", "2",
        "--save-every", "2", "--log-every", "2", "--eval-blocks", "16", "--threads", "1"]),
    "bert_address_cls": ("bert_address_cls.train_mlm", [
        ("--hidden-size", "--dim"), "32", ("--num-hidden-layers", "--n-layer"), "2",
        ("--num-attention-heads", "--n-head"), "2", ("--intermediate-size", "--ffn-dim"), "64",
        "--vocab-size", "3000", "--text-file", "{addresses}", "--n-addresses", "300", "--batch-size", "16",
        "--max-iters", "4", "--warmup-iters", "1", "--eval-every", "2", "--save-every", "2",
        "--eval-batches", "2", "--log-every", "2", "--threads", "1"]),
    "t5_summarization": ("t5_summarization.train_pretrain", [
        "--d-model", "32", "--d-kv", "8", "--num-heads", "4", "--d-ff", "64", "--num-layers", "2",
        "--num-decoder-layers", "2", "--vocab-size", "2600", "--max-documents", "300", "--seq-len", "48",
        "--batch-size", "8", "--max-iters", "4", "--warmup-iters", "1", "--eval-every", "2", "--eval-batches",
        "2", "--save-every", "2", "--log-every", "2", "--threads", "1"]),
    "clip": ("clip.train_clip", [
        "--vision-hidden-size", "32", "--vision-num-hidden-layers", "1", "--vision-num-attention-heads", "2",
        "--vision-intermediate-size", "64", "--text-hidden-size", "32", "--text-num-hidden-layers", "1",
        "--text-num-attention-heads", "2", "--text-intermediate-size", "64", "--projection-dim", "16",
        "--batch-size", "16", "--max-iters", "4", "--warmup-iters", "1", "--eval-every", "2", "--save-every", "2",
        "--log-every", "2", "--threads", "1"]),
    "llava": ("llava.train_stage1", [
        "--vision", "{llava_vision}", "--llm", "{llava_llm}", "--data-file", "{llava_conv}", "--valid-file",
        "{llava_conv}", "--batch-size", "4", "--max-iters", "4", "--warmup-iters", "1", "--eval-every", "2",
        "--save-every", "2", "--log-every", "2", "--eval-examples", "4", "--threads", "1"]),
    "dinov2": ("dinov2.train_dino", [
        "--hidden-size", "32", "--num-hidden-layers", "2", "--num-attention-heads", "2", "--hidden-dim", "32",
        "--bottleneck-dim", "16", "--num-prototypes", "64", "--n-local", "2", "--batch-size", "8", "--max-iters", "4",
        "--warmup-iters", "1", "--eval-every", "2", "--save-every", "2", "--log-every", "2", "--threads", "1"]),
    "hiera_mae": ("hiera_mae.train_mae", [
        "--embed-dim", "16", "--depths", "1", "1", "2", "--num-heads", "1", "2", "2", "--decoder-hidden-size", "16",
        "--decoder-depth", "1", "--batch-size", "8", "--max-iters", "4", "--warmup-iters", "1", "--eval-every", "2",
        "--eval-images", "16", "--save-every", "2", "--log-every", "2", "--threads", "1"]),
    "deepseek_v3": ("deepseek_v3.train", [
        "--data-file", "{text_jsonl}", "--tokenizer-vocab", "300", "--hidden-size", "32", "--intermediate-size", "64",
        "--moe-intermediate-size", "16", "--num-hidden-layers", "2", "--num-attention-heads", "2", "--q-lora-rank",
        "16", "--kv-lora-rank", "16", "--qk-nope-head-dim", "8", "--qk-rope-head-dim", "8", "--v-head-dim", "8",
        "--n-routed-experts", "8", "--max-position-embeddings", "32", "--batch-size", "8", "--max-iters", "4",
        "--warmup-iters", "1", "--eval-every", "2", "--eval-batches", "2", "--save-every", "2", "--log-every", "2",
        "--threads", "1"]),
    "compression": ("compression.train_subject", [
        "--text-file", "{text}", "--tokenizer-vocab", "300", "--hidden-size", "32", "--intermediate-size", "64",
        "--num-hidden-layers", "1", "--num-attention-heads", "2", "--num-key-value-heads", "1",
        "--max-position-embeddings", "32", "--batch-size", "8", "--max-iters", "4", "--warmup-iters", "1",
        "--eval-every", "2", "--eval-windows", "2", "--save-every", "2", "--log-every", "2", "--threads", "1"]),
    "appendix": ("appendix.rnn", [
        "--n-chars", "60000", "--hidden-size", "32", "--embed-dim", "16", "--seq-len", "32", "--batch-size", "8",
        "--max-iters", "4", "--warmup-iters", "1", "--eval-every", "2", "--eval-batches", "2", "--log-every", "2",
        "--save-every", "2", "--sample-chars", "20", "--no-parity", "--threads", "1"]),
}

# sitecustomize runs after site-packages' .pth files: it takes the editable install of the repository back out
SITECUSTOMIZE = """
import os, sys
_repo = {repo!r}
def _into_repo(finder):
    mapping = getattr(sys.modules.get(getattr(finder, "__module__", ""), None), "MAPPING", None) or {{}}
    return any(os.path.abspath(str(p)) == _repo or os.path.abspath(str(p)).startswith(_repo + os.sep)
               for p in mapping.values())
sys.meta_path[:] = [f for f in sys.meta_path if not _into_repo(f)]
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _repo]
"""

# run in the starter: the isolation checks, then every script's --help (or an import), results as JSON to argv[1]
HELP_DRIVER = """
import contextlib, importlib, importlib.util, io, json, re, runpy, sys, warnings
warnings.simplefilter("ignore")
out_file, dest, others, with_cli, without_cli, then = sys.argv[1], sys.argv[2], *(json.loads(a) for a in sys.argv[3:])
import common
res = {"common": common.__file__, "importable_others": [m for m in others if importlib.util.find_spec(m)],
       "help": {}, "imported": []}


def run_module(module, argv):
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as e:
        return e.code
    except Exception as e:
        return repr(e)


for module in with_cli:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = run_module(module, ["--help"])
    res["help"][module] = {"code": code, "text": out.getvalue()}
for module in without_cli:
    importlib.import_module(module)
    res["imported"].append(module)
# the smoke run: the main script with the flags that its --help lists (a list is the choice among renamed spellings)
module, argv = then["module"], []
text = res["help"].get(module, {}).get("text", "")
for a in then["argv"]:
    if isinstance(a, list):
        found = [f for f in a if re.search(r"(^|\\s)" + re.escape(f) + r"[\\s,]", text)]
        a = found[0] if found else a[0]
    argv.append(a)
if "--tokenizer-dir" in text:
    argv += ["--tokenizer-dir", then["tokenizer_dir"]]
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = run_module(module, argv + ["--out-dir", then["out_dir"]])
res["smoke"] = {"code": code, "argv": argv, "tail": (out.getvalue() + err.getvalue())[-3000:]}
# the copied tests, in the same interpreter (torch and the chapter are imported once)
import pytest
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = pytest.main(["-p", "no:cacheprovider", *then["pytest"]])
res["pytest"] = {"code": int(code), "tail": out.getvalue()[-3000:]}
with open(out_file, "w") as f:
    json.dump(res, f)
"""

def third_party_imports(path: Path, local: set[str]) -> set[str]:
    """Top-level names of the absolute imports of a file, anywhere in it, less the stdlib and ``local``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.partition(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in local and n != "__future__"}


@functools.cache
def distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def requirement_names(pyproject: Path) -> tuple[set[str], set[str]]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: read it the way the starter writes it
        text = pyproject.read_text(encoding="utf-8")
        runtime = [s for s, _ in starter._toml_array(text, "dependencies")]
        dev = [s for s, _ in starter._toml_array(text, "dev")]
    else:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
        runtime, dev = project["dependencies"], project["optional-dependencies"]["dev"]
    return {starter.canonical(s) for s in runtime}, {starter.canonical(s) for s in dev}


def pick_flags(argv: list, help_text: str) -> list[str]:
    out = []
    for a in argv:
        if isinstance(a, tuple):
            found = [f for f in a if re.search(rf"(^|\s){re.escape(f)}[\s,]", help_text)]
            assert found, f"none of {a} in --help"
            a = found[0]
        out.append(a)
    return out


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"{time.perf_counter() - t:5.1f} s  {' '.join(cmd[1:4])}")  # shown with -s, and on a failure
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def smoke_data(tmp: Path) -> dict[str, str]:
    """The small data files the smoke runs read (as the chapters' tests make them)."""
    rng = random.Random(0)
    digits_zh = "零一二三四五六七八九"
    words_en = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    digits = tmp / "digits.jsonl"
    with digits.open("w", encoding="utf-8") as f:
        for _ in range(300):
            ds = [rng.randrange(10) for _ in range(rng.randint(2, 6))]
            pair = {"en": " ".join(words_en[d] for d in ds) + " .", "zh": "".join(digits_zh[d] for d in ds) + "。"}
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    subjects, verbs, objects = ["小明", "老师", "记者", "我们"], ["今天去了", "昨天看见", "喜欢"], ["北京。", "大桥。"]
    text = tmp / "input.txt"
    text.write_text("\n".join("".join(rng.choice(subjects) + rng.choice(verbs) + rng.choice(objects)
                                      for _ in range(rng.randint(3, 8))) for _ in range(300)), encoding="utf-8")
    text_jsonl = tmp / "text.jsonl"  # the same lines as documents
    text_jsonl.write_text("".join(json.dumps({"text": ln}, ensure_ascii=False) + "\n"
                                  for ln in text.read_text(encoding="utf-8").splitlines()), encoding="utf-8")
    addresses = tmp / "addresses.jsonl"
    places = ["浙江省杭州市西湖区文三路90号", "北京市海淀区中关村大街1号", "广东省深圳市南山区科技园", "上海市浦东新区"]
    addresses.write_text("".join(json.dumps({"text": rng.choice(places) + "。" + rng.choice(places)},
                                            ensure_ascii=False) + "\n" for _ in range(200)), encoding="utf-8")
    return {"digits": str(digits), "text": str(text), "text_jsonl": str(text_jsonl), "addresses": str(addresses),
            **llava_dirs(tmp)}


def llava_dirs(tmp: Path) -> dict[str, str]:
    """A tiny CLIP tower and a tiny Llama with SmolLM2's tokenizer (random weights), and 8 conversations about
    pictures of a red or blue square, as tests/test_llava.py makes them."""
    import torch
    from PIL import Image
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from llava.loading import smollm2_dir

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=64, patch_size=16)).save_pretrained(str(tmp / "llava_clip"))
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(
        str(tmp / "llava_clip"))
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
                     ).save_pretrained(str(tmp / "llava_llm"))
    tok.save_pretrained(str(tmp / "llava_llm"))
    rows = []
    for i in range(8):
        color = ("red", "blue")[i % 2]
        Image.new("RGB", (64, 64), color).save(tmp / f"llava_{i}.png")
        rows.append(json.dumps({"image": f"llava_{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is it?"}, {"from": "gpt", "value": color}]}))
    (tmp / "llava_conv.jsonl").write_text("\n".join(rows) + "\n")
    return {"llava_vision": str(tmp / "llava_clip"), "llava_llm": str(tmp / "llava_llm"),
            "llava_conv": str(tmp / "llava_conv.jsonl")}


@pytest.fixture(scope="module")
def isolated(tmp_path_factory) -> Path:
    """A folder holding the sitecustomize that hides the repository, and the helper scripts."""
    d = tmp_path_factory.mktemp("isolated")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE.format(repo=str(ROOT)))
    (d / "starter_help_driver.py").write_text(HELP_DRIVER)
    return d


@pytest.mark.parametrize("chapter", starter.chapters())
def test_a_chapter_copied_out_runs_on_its_own(chapter, tmp_path, isolated):
    assert chapter in SMOKE, f"add {chapter}'s main training script and its tests' tiny flags to SMOKE"
    dest = tmp_path / "starter"
    made = starter.write_starter(chapter, dest)
    others = [c for c in starter.chapters() if c != chapter]
    assert (dest / chapter / "__init__.py").exists() and (dest / "common" / "config.py").exists()
    assert not list(dest.rglob("__pycache__"))
    assert {"pyproject.toml", "README.md", ".gitignore", "tests/conftest.py", "tests/test_common.py"} <= set(made.files)
    assert any(re.fullmatch(rf"tests/test_{chapter}(_\w+)?\.py", f) for f in made.files)
    assert {starter.chapter_of_test(f[6:], starter.chapters()) for f in made.files
            if re.fullmatch(r"tests/test_\w+\.py", f)} <= {chapter, None}  # no other chapter's tests
    assert {"runs/", ".venv/", "__pycache__/", "*.safetensors"} <= set((dest / ".gitignore").read_text().split())
    readme = (dest / "README.md").read_text()
    assert f"{chapter}/README.md" in readme and "pip install -e" in readme

    # every third-party import of the copied files has its distribution in pyproject.toml (tests: dev counts too)
    runtime, dev = requirement_names(dest / "pyproject.toml")
    local = {p.name for p in dest.iterdir() if (p / "__init__.py").exists()} | {p.stem for p in (dest / "tests").glob(
        "*.py")}
    missing = []
    for path in dest.rglob("*.py"):
        allowed = runtime | dev if path.relative_to(dest).parts[0] == "tests" else runtime
        for name in third_party_imports(path, local):
            dists = {starter.canonical(d) for d in distributions().get(name, [name])}
            if not dists & allowed:
                missing.append(f"{path.relative_to(dest)}: {name}")
    assert not missing, missing

    if importlib.util.find_spec("setuptools"):  # pip reads the pyproject.toml as `pip install -e .` would
        report = tmp_path / "pip.json"
        run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation", "--no-index",
             "-q", "--report", str(report), "-e", str(dest)], tmp_path, dict(os.environ))
        meta = json.loads(report.read_text())["install"][0]["metadata"]
        assert meta["name"] == chapter.replace("_", "-")
        assert {starter.canonical(r) for r in meta.get("requires_dist", []) if "extra ==" not in r} == runtime

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(dest), str(isolated)]), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}

    # one interpreter in the copy (torch, transformers and the chapter imported once) does three things:
    # 1. isolation, and --help of every script (an import for those without a command line)
    # 2. a few training steps of the main script, as `python -m <script> <flags>` would run it
    # 3. the copied tests: run (RUN_ALL_TESTS), else collected
    mods = starter.scripts(dest / chapter)
    assert mods, chapter
    cli = [m for m in mods if starter.has_command_line((dest / Path(*m.split("."))).with_suffix(".py"))]
    module, argv = SMOKE[chapter]
    data = smoke_data(tmp_path)
    out_dir = dest / "runs" / "smoke"
    then = {"module": module, "argv": [a.format(**data) if isinstance(a, str) else list(a) for a in argv],
            "out_dir": str(out_dir), "tokenizer_dir": str(dest / "runs" / "tokenizer"),
            "pytest": [] if chapter in RUN_ALL_TESTS else ["--collect-only"]}
    report = tmp_path / "help.json"
    run([sys.executable, str(isolated / "starter_help_driver.py"), str(report), str(dest), json.dumps(others),
         json.dumps(cli), json.dumps([m for m in mods if m not in cli]), json.dumps(then)], dest, env)
    res = json.loads(report.read_text())
    assert res["importable_others"] == [], "the repository is importable from the starter"
    assert Path(res["common"]).resolve().is_relative_to(dest.resolve())
    bad = {m: r["code"] for m, r in res["help"].items() if r["code"] != 0 or "usage:" not in r["text"]}
    assert not bad, bad
    assert module in cli, f"{module}: the smoke run's script has no command line"
    pick_flags(argv, res["help"][module]["text"])  # every smoke flag (one spelling of each) is in its --help
    assert res["smoke"]["code"] in (0, None), res["smoke"]
    assert (out_dir / "metrics.jsonl").exists(), (sorted(p.name for p in out_dir.iterdir()), res["smoke"]["tail"])
    assert res["pytest"]["code"] == 0, res["pytest"]["tail"]
    summary = [ln for ln in res["pytest"]["tail"].splitlines() if re.search(r"\d+ (passed|tests? collected)", ln)]
    assert summary and "error" not in summary[-1], res["pytest"]["tail"]


def test_starter_refuses_a_non_empty_dest_and_an_unknown_chapter(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    for args, message in (([starter.chapters()[0], str(tmp_path / "full")], "exists and is not an empty folder"),
                          (["no_such_chapter", str(tmp_path / "new")], "is not a chapter; the chapters are: "
                                                                        + ", ".join(starter.chapters()))):
        proc = subprocess.run([sys.executable, "-m", "common.starter", *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me" and not (tmp_path / "new").exists()


def test_tests_that_need_the_repository_are_deselected_with_their_reason(tmp_path):
    path = tmp_path / "test_demo.py"
    path.write_text('''import pytest


@pytest.mark.repo
def test_whole_repo():
    pass


@pytest.mark.parametrize("x", [1, 2])
def test_copy_matches_other_chapter(x):
    from other_chapter import dataset  # noqa: F401


def test_own():
    import json  # noqa: F401


class TestGroup:
    def test_nested(self):
        import other_chapter.model  # noqa: F401
''')
    out = starter.left_out_tests(path, "tests/test_demo.py", {"other_chapter"})
    stayed = "imports other_chapter, which stayed in the repository"
    assert out == {"tests/test_demo.py::test_whole_repo": "marked repo: it checks the whole repository",
                   "tests/test_demo.py::test_copy_matches_other_chapter[": stayed,  # a prefix: every parameter
                   "tests/test_demo.py::TestGroup::test_nested": stayed}
    assert starter.chapter_of_test("test_clip_vit_model.py", ["clip", "clip_vit"]) == "clip_vit"
    assert starter.chapter_of_test("test_clip.py", ["clip", "clip_vit"]) == "clip"
    assert starter.chapter_of_test("test_common.py", ["clip"]) is None
