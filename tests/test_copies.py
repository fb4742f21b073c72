"""Deliberate copies stay copies (the idea of transformers' utils/check_copies.py).

A chapter keeps a small piece that another chapter also has, so that each reads on its own; the line

    # Copied from gpt_minimind/dataset.py::load_inews
    # Copied from gpt_minimind/bench.py::shakespeare_text with shakespeare->verse, n_chars->size

directly above a def or class says where it comes from. The test below fails when the copy differs from
its source (after the `with old->new` replacements: whole words, applied to the source in order), naming
both places and the first line that differs. Copies that are not lessons do not get a marker: they live once in
common/. The data packages' hash pins are such a case, and a test here keeps each pinned once.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.repo  # compares files across the repository: not in a copied-out chapter

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"# Copied from (?P<path>[\w./-]+\.py)::(?P<name>[\w.]+)"
                    r"(?: with (?P<with>\w+->\w*(?:, \w+->\w*)*))?")
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def project_files() -> list[Path]:
    """The .py files of every package at the top of the repository (chapters, appendix, common)."""
    packages = [d for d in ROOT.iterdir() if (d / "__init__.py").is_file() and d.name != "tests"]
    return sorted(p for d in packages for p in d.rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def markers() -> list[tuple[Path, int, str]]:
    """(file, 1-based line number, the marker line stripped) of every '# Copied from' line."""
    return [(p, i, line.strip()) for p in project_files()
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1)
            if line.strip().lower().startswith("# copied from")]  # (a mis-cased one is reported, not skipped)


def first_line(node: ast.AST) -> int:
    """A def's first line, its decorators included."""
    return min([node.lineno] + [d.lineno for d in node.decorator_list])


def def_named(tree: ast.Module, dotted: str) -> ast.AST | None:
    """The def or class `Name` (or `Class.method`) in a module."""
    node, body = None, tree.body
    for part in dotted.split("."):
        node = next((n for n in body if isinstance(n, DEFS) and n.name == part), None)
        if node is None:
            return None
        body = node.body
    return node


def def_at(tree: ast.Module, line: int) -> ast.AST | None:
    """The def or class that starts on `line`."""
    return next((n for n in ast.walk(tree) if isinstance(n, DEFS) and first_line(n) == line), None)


def source_of(path: Path, node: ast.AST) -> list[str]:
    """The def's lines as written (comments and blank lines included), dedented."""
    lines = path.read_text(encoding="utf-8").splitlines()[first_line(node) - 1:node.end_lineno]
    return textwrap.dedent("\n".join(lines)).splitlines()


def resolve(path: Path, line: int, text: str):
    """-> (copy node, source file, source name, source node, replacements), or a string saying what is wrong."""
    m = MARKER.fullmatch(text)
    if m is None:
        return f"{rel(path)}:{line}: malformed marker {text!r}; write '# Copied from <dir>/<file>.py::<Name>' " \
               f"optionally followed by ' with old->new, old2->new2'"
    copy = def_at(ast.parse(path.read_text(encoding="utf-8")), line + 1)
    if copy is None:
        return f"{rel(path)}:{line}: the marker is not directly above a def or class"
    src_path = ROOT / m["path"]
    if not src_path.is_file():
        return f"{rel(path)}:{line}: the source file {m['path']} does not exist"
    src = def_named(ast.parse(src_path.read_text(encoding="utf-8")), m["name"])
    if src is None:
        return f"{rel(path)}:{line}: {m['path']} has no def or class {m['name']}"
    replacements = [tuple(pair.split("->", 1)) for pair in m["with"].split(", ")] if m["with"] else []
    return copy, src_path, m["name"], src, replacements


MARKERS = markers()


def test_every_marker_resolves():
    assert MARKERS, "no '# Copied from' marker found: the copy check below would check nothing"
    problems = [r for r in (resolve(*m) for m in MARKERS) if isinstance(r, str)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path, line, text", MARKERS, ids=[f"{rel(p)}:{i}" for p, i, _ in MARKERS])
def test_marked_copy_equals_its_source(path, line, text):
    resolved = resolve(path, line, text)
    if isinstance(resolved, str):
        pytest.fail(resolved)
    copy, src_path, name, src, replacements = resolved
    expected = source_of(src_path, src)
    for old, new in replacements:
        expected = [re.sub(rf"\b{re.escape(old)}\b", new, s) for s in expected]
    got = source_of(path, copy)
    if got == expected:
        return
    i = next((k for k, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    want = expected[i] if i < len(expected) else "<the source ends here>"
    have = got[i] if i < len(got) else "<the copy ends here>"
    pytest.fail(f"{rel(path)}:{first_line(copy)} is marked as a copy of {rel(src_path)}::{name} but has drifted; "
                f"first difference:\n  {rel(src_path)}:{first_line(src) + i}: {want.strip()}\n"
                f"  {rel(path)}:{first_line(copy) + i}: {have.strip()}\n"
                f"Change both together (or drop the marker if the copy is meant to differ now).")


def test_each_data_package_is_pinned_once():
    """A Package(name, version, file, sha256) pin is written once; one that several chapters read lives in
    common/data.py and the chapters import it."""
    places: dict[str, list[str]] = {}
    for path in project_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Package"
                    and len(node.args) >= 3 and isinstance(node.args[2], ast.Constant)):
                places.setdefault(node.args[2].value, []).append(f"{rel(path)}:{node.lineno}")
    assert places, "no Package pin found: the check would check nothing"
    twice = {f: p for f, p in places.items() if len(p) > 1}
    assert not twice, f"pinned more than once (move the pin to common/data.py and import it): {twice}"


def test_the_copy_check_sees_a_drift_and_a_bad_marker(tmp_path, monkeypatch):
    """The checks above can fail: a drifted copy, a marker that names nothing, a mis-cased marker."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "__init__.py").write_text("")
    (tmp_path / "a" / "src.py").write_text("def f(x):\n    return x + 1\n")
    (tmp_path / "a" / "copy.py").write_text("# Copied from a/src.py::f with x->y\ndef f(y):\n    return y + 2\n"
                                            "\n\n# Copied from a/src.py::g\ndef g():\n    pass\n"
                                            "\n\n# copied from a/src.py::f\ndef h(x):\n    return x + 1\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    found = markers()
    assert [line for _, line, _ in found] == [1, 6, 11]
    with pytest.raises(pytest.fail.Exception, match=r"a/copy.py:2 is marked as a copy of a/src.py::f but has drifted"):
        test_marked_copy_equals_its_source(*found[0])
    problems = [resolve(*m) for m in found[1:]]
    assert "a/src.py has no def or class g" in problems[0] and "malformed marker" in problems[1]
