"""The shape every chapter shares, checked: imports run one way (no cycles, no script imports a script,
chapters import only common, model.py never imports its engine), and every chapter is registered in the
places a reader and `make` look (README table, syllabus, Makefile, package discovery, a data entry point)."""

import ast
import re
from pathlib import Path

import pytest

from common.starter import chapters as starter_chapters
from doc.build import code_pointers, unresolved

pytestmark = pytest.mark.repo  # the whole repository's shape: a chapter copied out by common.starter skips it

ROOT = Path(__file__).resolve().parents[1]
# command-line stages: other modules may not import them (shared pieces live in library modules)
SCRIPT = re.compile(r"^(train_\w+|infer|bench|sweep|eval|evaluate|peft_zoo|figures)$")


def chapters() -> list[str]:
    return starter_chapters(ROOT)  # the chapter folders, as common.starter finds them


def project_imports(path: Path) -> set[str]:
    """Dotted names of project modules that ``path`` imports, at any depth (function-level imports too)."""
    package = path.parent.name
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y (one level: inside the package)
                base = package + ("." + node.module if node.module else "")
                found |= {base + "." + a.name for a in node.names} if not node.module else {base}
            elif node.module:
                found.add(node.module)
                found |= {node.module + "." + a.name for a in node.names}
    modules = {f"{p.parent.name}.{p.stem}" for p in ROOT.glob("*/*.py")}
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    return {f"{p.parent.name}.{p.stem}": project_imports(p) - {f"{p.parent.name}.{p.stem}"}
            for name in chapters() + ["common"] for p in (ROOT / name).glob("*.py")}


def test_chapters_are_found():
    assert {"transformer_basics", "gpt_minimind", "bert_address_cls", "t5_summarization", "appendix"} <= set(chapters())


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n] if n in path else [m, n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_imports_run_one_way():
    bad = []
    for module, imports in sorted(graph().items()):
        package, name = module.split(".")
        for imported in sorted(imports):
            other_package, other = imported.split(".")
            if other_package != "common" and SCRIPT.match(other):
                bad.append(f"{module} imports the script {imported}")
            if package == "common" and other_package != "common":
                bad.append(f"{module}: common imports a chapter ({imported})")
            if package != "common" and other_package not in ("common", package):
                bad.append(f"{module}: chapters import only common, not {imported}")
            if name == "model" and other == "engine":
                bad.append(f"{module} imports {imported}: the engine builds on the reference, never the reverse")
    assert not bad, "\n".join(bad)


def test_the_layout_checks_can_fail(tmp_path, monkeypatch):
    """The checks above fail on a script import, a cycle, a cross-chapter import and model -> engine."""
    files = {"chap/train_x.py": "", "chap/helper.py": "def f():\n    from .train_x import main\n",
             "chap/a.py": "from . import b\n", "chap/b.py": "from .a import thing\n",
             "chap/model.py": "from .engine import fast\n", "chap/engine.py": "from .model import Model\n",
             "other/__init__.py": "", "other/util.py": "from chap.a import thing\n", "chap/__init__.py": ""}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert project_imports(tmp_path / "chap" / "helper.py") == {"chap.train_x"}
    with pytest.raises(AssertionError) as one_way:
        test_imports_run_one_way()
    for problem in ("chap.helper imports the script chap.train_x", "chap.model imports chap.engine",
                    "other.util: chapters import only common, not chap.a"):
        assert problem in str(one_way.value)
    with pytest.raises(AssertionError, match="import cycle: .*chap.a -> chap.b -> chap.a|chap.b -> chap.a -> chap.b"):
        test_no_import_cycles()


@pytest.mark.parametrize("chapter", chapters())
def test_every_chapter_is_registered(chapter):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.search(rf"^\|.*\b{chapter}/", readme, re.M), f"README.md: no table row links {chapter}/"
    syllabus = (ROOT / "doc" / "syllabus.md").read_text(encoding="utf-8")
    assert re.search(rf"^##.*\b{chapter}\b", syllabus, re.M), f"doc/syllabus.md: no section for {chapter}"
    assert (ROOT / chapter / "README.md").is_file(), f"{chapter}/README.md is missing"
    dataset = ROOT / chapter / "dataset.py"
    assert dataset.is_file() and '__name__ == "__main__"' in dataset.read_text(encoding="utf-8"), \
        f"{chapter}/dataset.py must fetch the chapter's data when run (make data runs it)"
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    listed = re.search(r"^CHAPTERS\s*:?=\s*(.*)$", makefile, re.M)
    assert listed and chapter in listed.group(1).split(), f"Makefile: {chapter} is not in CHAPTERS"
    from setuptools import find_packages

    assert chapter in find_packages(str(ROOT), exclude=_excluded()), f"pyproject.toml does not package {chapter}"


def _excluded() -> list[str]:
    """The package-discovery excludes of pyproject.toml (discovery is by pattern, not a hand-kept list)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"\[tool\.setuptools\.packages\.find\](.*?)(\n\[|\Z)", text, re.S).group(1)
    assert "include" not in block, "pyproject.toml lists packages by hand; discover them (exclude = [...])"
    return re.findall(r'"([^"]+)"', re.search(r"exclude\s*=\s*\[(.*?)\]", block, re.S).group(1))


@pytest.mark.parametrize("markdown", ["doc/syllabus.md"] + [f"{c}/README.md" for c in chapters()])
def test_code_pointers_in_the_docs_resolve(markdown):
    """Every `file.py:Symbol` the syllabus and the chapter READMEs cite names a definition in that file."""
    path = ROOT / markdown
    base = ROOT if markdown.startswith("doc/") else path.parent
    missing = []
    for pointer in code_pointers(path.read_text(encoding="utf-8"), base):
        if pointer.symbols:
            missing += unresolved(pointer)
    assert not missing, f"{markdown} points at code that is not there:\n" + "\n".join(sorted(set(missing)))
