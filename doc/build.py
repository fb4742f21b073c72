"""Build the project's website: every chapter's README beside its annotated source.

    python -m doc.build            # or: make docs -> site/ (open site/index.html, or python -m http.server -d site)
    python -m doc.build --serve    # build, then serve on http://127.0.0.1:8000

Two steps. First a pre-step of ours writes a Markdown tree into ``build/site_src/``:

- each chapter's README (``index`` of the chapter), its ``.py`` files as *annotated pages* in reading order
  (model -> dataset -> train_* in pipeline order -> infer -> the rest), then the chapter's measured results,
  read from ``doc/results.json`` (never retyped), and its pictures;
- an annotated page puts the prose of a file (module docstring, function and class docstrings, full-line comment
  blocks) in one column and the code it precedes in the other, with line numbers that are anchors (``#L42``);
  the prose is Markdown, and ``$...$`` / ``$$...$$`` in it become MathML here, so equations render with no
  script and no CDN;
- the syllabus, with every ``file.py:Symbol`` and ``tests/x.py::test`` turned into a link to its line (a symbol
  that no longer exists stops the build), and a page of every result;
- README links to ``.py`` files point at their annotated pages, and backticked ``file.py:Symbol`` pointers
  become links to the line.

Then mkdocs with the Material theme renders it into ``site/`` in strict mode: a broken link or anchor is an
error, not a warning. Everything comes from installed packages (no Google Fonts, no MathJax from a CDN; the
search index is Material's own), so the site builds and reads offline.
"""

from __future__ import annotations

import argparse
import ast
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tokenize
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSS = Path(__file__).resolve().parent / "site.css"


class BuildError(Exception):
    """Something the site would show wrong (a pointer to code that is gone, an equation that does not parse)."""


# --------------------------------------------------------------------------------------------------------------
# Definitions and their lines (also what tests/test_layout.py checks the docs' code pointers against)

AMBIGUOUS = -1  # definitions(): a bare member name that several classes define (write Class.name)


@functools.cache
def definitions(path: Path) -> dict[str, int]:
    """Names a file defines -> the line of the definition: top-level functions, classes and assignments, and
    the methods and fields of its classes as 'Class.name' (with ``self.x = ...`` in ``__init__``) and as a bare
    'name' where no top-level name has it and one class only defines it (several: AMBIGUOUS). Imported names
    do not count: a pointer must name the home of a symbol."""
    top: dict[str, int] = {}
    members: dict[str, dict[str, int]] = defaultdict(dict)  # bare name -> {class: line}
    qualified: dict[str, int] = {}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            top.setdefault(node.name, node.lineno)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    top.setdefault(t.id, node.lineno)
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            member = getattr(item, "name", None) or getattr(getattr(item, "target", None), "id", None)
            if member:
                qualified.setdefault(f"{node.name}.{member}", item.lineno)
                members[member].setdefault(node.name, item.lineno)
            if isinstance(item, ast.FunctionDef) and item.name == "__init__":  # self.x = ... attributes
                for n in ast.walk(item):
                    for t in getattr(n, "targets", []):
                        if isinstance(t, ast.Attribute) and getattr(t.value, "id", "") == "self":
                            qualified.setdefault(f"{node.name}.{t.attr}", n.lineno)
                            members[t.attr].setdefault(node.name, n.lineno)
    found = dict(qualified)
    for name, where in members.items():
        found[name] = next(iter(where.values())) if len(where) == 1 else AMBIGUOUS
    found.update(top)
    return found


@dataclass
class Pointer:
    """A backticked span of a Markdown table row that names code: `file.py:a, b (note)`, `file.py`, or a bare
    `Symbol` after a file in the same cell (more symbols of that file); or tests: `tests/x.py::t1, ::t2`, or a
    bare `::t3` / `test_t4` after a test file in the same cell."""
    row: int                 # line index in the Markdown text
    start: int               # the span, backticks included: line[start:end]
    end: int
    file: Path
    symbols: list[str]       # definitions of ``file`` (for tests: test functions); [] for a bare file
    is_test: bool = False


IDENT = r"[A-Za-z_]\w*(?:\.\w+)*"


def table_cells(line: str) -> list[tuple[int, int]]:
    """(start, end) of each cell of a Markdown table row; a '|' inside a code span does not split."""
    bounds, inside, start = [], False, 0
    for i, ch in enumerate(line):
        if ch == "`":
            inside = not inside
        elif ch == "|" and not inside:
            bounds.append((start, i))
            start = i + 1
    bounds.append((start, len(line)))
    return bounds


def _symbols(rest: str) -> list[str]:
    """'a, b (note, more), C.d' -> ['a', 'b', 'C.d']: notes in parentheses dropped, one symbol per item."""
    while re.search(r"\([^()]*\)", rest):
        rest = re.sub(r"\([^()]*\)", "", rest)
    return [m.group(0) for piece in rest.split(",") if (m := re.match(IDENT, piece.strip()))]


def code_pointers(text: str, base: Path):
    """Every Pointer in the table rows of ``text``. Paths with a '/' are relative to ``base``; in
    doc/syllabus.md a bare file name belongs to the chapter of its "## X: chapter" section."""
    section, fenced = base, False
    for i, line in enumerate(text.splitlines()):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced:
            continue  # a table inside a code block is an example, not a pointer
        if line.startswith("## "):
            heading = re.match(r"^## \w+: (\w+)", line)
            section = ROOT / heading.group(1) if heading and (ROOT / heading.group(1)).is_dir() else base
        if not line.startswith("|"):
            continue
        for cs, ce in table_cells(line):
            current, current_test = None, None
            for m in re.finditer(r"`([^`]+)`", line[cs:ce]):
                token, start, end = m.group(1).strip(), cs + m.start(), cs + m.end()
                is_test = re.match(r"((?:\.\./)*tests/\w+\.py)?::\w+", token)
                tests = list(re.finditer(r"((?:\.\./)*tests/\w+\.py)?::(\w+)", token)) if is_test else []
                if tests or (current_test and re.fullmatch(r"test_\w+", token)):
                    names = []
                    for t in tests or [re.match(r"()(\w+)", token)]:
                        current_test = _resolve(t.group(1), base, base) if t.group(1) else current_test
                        if current_test is None:
                            break
                        names.append(t.group(2))
                    if current_test is not None and names:
                        yield Pointer(i, start, end, current_test, names, is_test=True)
                    continue
                f = re.fullmatch(r"((?:\.\./)*[\w/]+\.py)(?::(.*))?", token, re.S)
                if f:
                    current = _resolve(f.group(1), base, section)
                    yield Pointer(i, start, end, current, _symbols(f.group(2) or ""))
                elif current is not None and re.fullmatch(IDENT, token):
                    yield Pointer(i, start, end, current, [token])


def _resolve(path: str, base: Path, section: Path) -> Path:
    """A pointer's file: a bare name in the section's chapter, a path from ``base`` (the README's folder), else
    from the repository root."""
    if "/" not in path:
        return section / path
    here = (base / path).resolve()
    return here if here.is_file() else (ROOT / path).resolve()


def unresolved(pointer: Pointer) -> list[str]:
    """The parts of a pointer that name nothing: a missing file, or symbols (test functions) it does not define."""
    name = pointer.file.relative_to(ROOT).as_posix() if ROOT in pointer.file.parents else str(pointer.file)
    if not pointer.file.is_file():
        return [f"{name} (no such file)"]
    sep = "::" if pointer.is_test else ":"
    lines = definitions(pointer.file)
    return [f"{name}{sep}{s}" + (" (several classes define it: write Class.name)" if lines.get(s) == AMBIGUOUS
                                 else "") for s in pointer.symbols if lines.get(s, AMBIGUOUS) == AMBIGUOUS]


# --------------------------------------------------------------------------------------------------------------
# An annotated page: prose beside the code it explains

@dataclass
class Section:
    prose: str = ""                                  # Markdown
    lines: list[int] = field(default_factory=list)   # 1-based source lines shown in the code column


SKIP_COMMENT = re.compile(r"^#\s*(noqa|type:|fmt:|ruff:|pragma|!)|^#!|^#\s*[-=#*~]{3,}\s*$")


def annotate(source: str) -> list[Section]:
    """Split a Python file into sections, pycco's way. A section starts at a full-line comment block (its text
    is the prose), at a class or function with a docstring (the docstring is the prose; its lines leave the
    code column) and at every other top-level class or function (no prose: it keeps the code aligned). The
    module docstring is the first section's prose. A start that comes before any code of the open section
    adds its prose to that section instead (a comment right above a documented function is one section)."""
    tree = ast.parse(source)
    starts: dict[int, list[str]] = defaultdict(list)
    hidden: set[int] = set()

    def docstring_lines(node) -> range | None:
        body = getattr(node, "body", None)
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            return range(body[0].lineno, body[0].end_lineno + 1)
        return None

    module_doc = docstring_lines(tree)
    if module_doc:
        hidden.update(module_doc)
        starts[1].append(ast.get_docstring(tree) or "")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            doc = docstring_lines(node)
            if doc and doc.start == node.lineno:  # def f(): """doc""" on one line stays code
                doc = None
            if doc:
                hidden.update(doc)
                starts[first].append(ast.get_docstring(node) or "")
            elif node in tree.body:
                starts[first].append("")

    block: list[str] = []  # full-line comments, found with tokenize (a '#' inside a string is no comment)
    lines = source.splitlines()
    trailing: set[int] = set()  # rows ending in a comment after code, and the full-line comments continuing it
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        row, text = tok.start[0], tok.string
        if lines[row - 1][:tok.start[1]].strip() or row - 1 in trailing:
            trailing.add(row)  # the second line of `x = 1  # a note that\n# goes on` is code, not prose
            continue
        hidden.add(row)
        if SKIP_COMMENT.match(text):
            continue
        if block and block[-1][0] == row - 1:
            block.append((row, text))
        else:
            block = [(row, text)]
            starts[row].append("")  # filled below, when the block is complete
        starts[block[0][0]][-1] = "\n".join(re.sub(r"^#\s?([-=#*~]{3,}\s*)?", "", t).rstrip(" -=#*~")
                                            for _, t in block)

    sections = [Section()]
    for row in range(1, len(lines) + 1):
        for prose in starts.get(row, []):
            current = sections[-1]
            if any(lines[r - 1].strip() for r in current.lines):
                sections.append(Section(prose=prose))
            elif prose:
                current.prose = (current.prose + "\n\n" + prose).strip()
        if row not in hidden:
            sections[-1].lines.append(row)
    for s in sections:  # trim blank lines at both ends of each code column
        while s.lines and not lines[s.lines[0] - 1].strip():
            s.lines.pop(0)
        while s.lines and not lines[s.lines[-1] - 1].strip():
            s.lines.pop()
    return [s for s in sections if s.prose or s.lines]


MATH = re.compile(r"\$\$(.+?)\$\$|(?<![\w$\\])\$(?=\S)([^$\n]+?)(?<=\S)\$(?![\w$])", re.S)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)


def latex_to_mathml(latex: str, display: bool) -> str:
    from latex2mathml.converter import convert

    try:
        out = convert(latex.strip(), display="block" if display else "inline")
    except Exception as e:  # noqa: BLE001 - any parse failure is the same error for the reader
        raise BuildError(f"the equation ${latex}$ does not parse ({type(e).__name__}: {e})") from e
    unknown = re.findall(r">(\\[A-Za-z]+)<", out)  # the converter keeps a command it does not know as text
    if unknown:
        raise BuildError(f"the equation ${latex}$ uses {', '.join(unknown)}, which MathML cannot show")
    return out


def prose_html(text: str, where: str = "") -> str:
    """Docstring or comment prose -> HTML: Markdown with math. Docstrings are written to be read as plain text
    too, so characters Markdown would take as markup outside code spans (``*``, ``_``, ``<``, a leading ``>``)
    are escaped first; backticked code and ``$math$`` stay as written."""
    import markdown

    maths: list[str] = []

    def keep_math(m: re.Match) -> str:
        display = m.group(1) is not None
        try:
            maths.append(latex_to_mathml(m.group(1) if display else m.group(2), display))
        except BuildError as e:
            raise BuildError(f"{where}: {e}" if where else str(e)) from None
        return f"MATHPLACEHOLDER{len(maths) - 1}X"

    spans: list[str] = []

    def keep_span(m: re.Match) -> str:
        spans.append(m.group(0))
        return f"CODEPLACEHOLDER{len(spans) - 1}X"

    text = _escape_prose(MATH.sub(keep_math, CODE_SPAN.sub(keep_span, text)))
    text = re.sub(r"CODEPLACEHOLDER(\d+)X", lambda m: spans[int(m.group(1))], text)
    rendered = markdown.markdown(text, extensions=["fenced_code", "tables", "sane_lists"])
    return re.sub(r"MATHPLACEHOLDER(\d+)X", lambda m: maths[int(m.group(1))], rendered)


def _escape_prose(text: str) -> str:
    # a list or an indented block (a table, a command) written right under its sentence, as plain-text
    # docstrings do, still becomes a list or a block
    text = re.sub(r"(?m)^((?!(?:[-*]|\d+\.)[ \t])\S.*\n)((?:[-*]|1\.)[ \t])", r"\1\n\2", text)
    text = re.sub(r"(?m)^((?![ \t]*(?:[-*]|\d+\.)[ \t])\S.*\n)((?: {4}|\t)\S)", r"\1\n\2", text)
    # ... and a line back at the margin after a list item ends the list (continuations are indented)
    text = re.sub(r"(?m)^((?:[-*]|\d+\.)[ \t].*\n)((?![-*] |\d+\. )\S)", r"\1\n\2", text)
    return "\n".join(line if re.match(r"( {4}|\t)", line) else _escape_line(line)  # a code block: as written
                     for line in text.split("\n"))


def _escape_line(line: str) -> str:
    line = line.replace("\\", "\\\\").replace("*", "\\*").replace("_", "\\_").replace("<", "&lt;")
    line = re.sub(r"^(\s*)\\\* ", r"\1* ", line)  # a bullet stays a bullet
    return re.sub(r"^(\s*)>", r"\1\\>", line)


def highlighted_lines(source: str) -> list[str]:
    """One HTML string per source line (pygments closes its spans at every line end)."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer

    out = highlight(source, PythonLexer(stripnl=False, ensurenl=True), HtmlFormatter(nowrap=True))
    lines = out.split("\n")
    return lines[:len(source.splitlines())]


def annotated_page(path: Path) -> str:
    """The Markdown (mostly HTML) of one annotated file."""
    source = path.read_text(encoding="utf-8")
    rel = path.relative_to(ROOT).as_posix()
    title = rel
    code = highlighted_lines(source)
    parts = [f"---\ntitle: {title}\nhide:\n  - toc\n---\n", f"# `{rel}`\n",
             f'<p class="annotated-meta">{len(code)} lines · <a href="{path.name}">the file as it is</a></p>\n',
             '<div class="annotated">']
    for i, s in enumerate(annotate(source)):
        prose = prose_html(s.prose, where=rel) if s.prose else ""
        rows, previous = [], None
        for n in s.lines:
            if previous is not None and n != previous + 1:
                rows.append('<span class="gap"></span>')
            rows.append(f'<span class="line" id="L{n}"><a class="ln" href="#L{n}">{n}</a>{code[n - 1]}</span>')
            previous = n
        code_html = "\n".join(rows)
        parts.append(f'<section class="annotated-section" id="section-{i}">'
                     f'<div class="annotated-prose">{prose}</div>'
                     f'<div class="annotated-code highlight"><pre><code>{code_html}</code></pre></div></section>')
    parts.append("</div>\n")
    # no blank line may split the raw HTML block, or Markdown would take the rest as text
    return parts[0] + parts[1] + parts[2] + "\n" + "".join(parts[3:])


# --------------------------------------------------------------------------------------------------------------
# The site's Markdown tree

def page_of(py: Path) -> str:
    """Where a .py file's annotated page lives in the site, relative to the site root."""
    rel = py.relative_to(ROOT)
    return (rel.parent / f"{rel.stem}_py.md").as_posix()


def has_page(py: Path) -> bool:
    """Whether the site has an annotated page for this file: a chapter's, common's or a test's .py, or this one."""
    return py.suffix == ".py" and py.is_file() and py.name != "__init__.py" and (
        py.resolve() == Path(__file__).resolve()
        or (py.parent.parent == ROOT and py.parent.name in chapters() + ["common", "tests"]))


@functools.cache
def chapters() -> list[str]:
    """The chapters in reading order, as the Makefile lists them."""
    m = re.search(r"^CHAPTERS\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
    return m.group(1).split()


def reading_order(chapter: str) -> list[Path]:
    """model -> data -> train_* in the order the Makefile runs them -> infer -> the rest, by name."""
    files = sorted(p for p in (ROOT / chapter).glob("*.py") if p.name != "__init__.py")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    runs = [m.group(1) for m in re.finditer(rf"-m {chapter}\.(\w+)", makefile)]

    def key(p: Path):
        name = p.stem
        if name == "model":
            return (0, 0, name)
        if name in ("tokenizer", "dataset", "data", "tasks"):
            return (1, ("tokenizer", "dataset", "data", "tasks").index(name), name)
        if name == "train" or name.startswith("train_"):
            return (2, runs.index(name) if name in runs else len(runs), name)
        if name == "infer":
            return (3, 0, name)
        return (4, 0, name)

    return sorted(files, key=key)


@functools.cache
def _records() -> list[dict]:
    return json.loads((ROOT / "doc" / "results.json").read_text(encoding="utf-8"))


def results(chapter: str | None = None) -> str:
    """Markdown tables of doc/results.json: one per run, in the order the records are stored."""
    records = _records()
    by_chapter: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_chapter[r["chapter"]][r["run"]].append(r)
    out = []
    for ch in [chapter] if chapter else list(by_chapter):
        if not chapter:
            out.append(f"## {ch}\n")
        for run, rows in by_chapter.get(ch, {}).items():
            first = rows[0]
            out.append(f"**{run}** · {first.get('date', '')} · {first.get('machine', '')} · "
                       f"`{first.get('command', '')}`\n")
            out.append("| metric | value | baseline | baseline value |\n|---|---|---|---|")
            for r in rows:
                out.append(f"| {r['metric']} | {_num(r['value'])} | {r.get('baseline') or ''} | "
                           f"{_num(r.get('baseline_value'))} |")
            out.append("")
    if not out:
        out.append("No measured results yet.\n")
    return "\n".join(out)


def _num(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
POINTER = re.compile(r"(?<!\[)`([\w/]+\.py)(?::([A-Za-z_][\w.]*))?([^`]*)`")


def rewrite_markdown(text: str, src: Path, dest_rel: str, copies: set[Path]) -> str:
    """A repository Markdown file made into a site page: links to .py files go to their annotated pages,
    links to folders go to their README, other linked repository files are copied along (``copies``), and
    backticked `file.py:Symbol` pointers outside code blocks become links to the line. ``src`` is the file in
    the repository, ``dest_rel`` its page's path in the site."""
    dest_dir = Path(dest_rel).parent
    base = ROOT if src.parent == ROOT / "doc" else src.parent
    text = link_pointers(text, base, dest_dir.as_posix(), src.relative_to(ROOT).as_posix())
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced:
            line = LINK.sub(lambda m: m.group(1) + _link(m.group(2), src, dest_dir, copies) + m.group(3), line)
            if not line.startswith("|"):  # table rows are linked above, symbol by symbol
                line = POINTER.sub(lambda m: _pointer(m, src, dest_dir) or m.group(0), line)
        out.append(line)
    return "\n".join(out) + "\n"


def _relative(target_rel: str, dest_dir: Path) -> str:
    return os.path.relpath(target_rel, dest_dir.as_posix() or ".").replace(os.sep, "/")


def _link(url: str, src: Path, dest_dir: Path, copies: set[Path]) -> str:
    if re.match(r"^[a-z]+:", url) or url.startswith("#"):
        return url
    path, _, anchor = url.partition("#")
    target = (src.parent / path).resolve()
    if not target.exists() or ROOT not in target.parents:
        return url  # left as written: mkdocs (strict) reports it
    if target.is_dir():
        if not (target / "README.md").exists():
            return url  # a folder with no README: mkdocs (strict) reports the link
        target = target / "README.md"
    rel = target.relative_to(ROOT)
    if has_page(target):
        new = page_of(target)
    elif rel.as_posix() == "README.md":
        new = "index.md"
    else:
        new = rel.as_posix()
        if target.suffix != ".md":
            copies.add(target)
    return _relative(new, dest_dir) + (f"#{anchor}" if anchor else "")


def _pointer(m: re.Match, src: Path, dest_dir: Path) -> str | None:
    file, symbol = m.group(1), m.group(2)
    target = _resolve(file, src.parent, src.parent)
    if not target.is_file():
        return None
    anchor = ""
    if symbol:
        line = definitions(target).get(symbol, AMBIGUOUS)
        if line == AMBIGUOUS:
            return None  # left as text (table pointers, the ones the docs rely on, are checked above)
        anchor = f"#L{line}"
    return f"[{m.group(0)}]({_relative(page_of(target), dest_dir)}{anchor})"


def link_pointers(text: str, base: Path = ROOT, page_dir: str = "doc", name: str = "doc/syllabus.md") -> str:
    """A Markdown file's table pointers (doc/syllabus.md's code and test columns, the chapter READMEs' tables)
    turned into links to their lines, each symbol of a span its own link; BuildError lists every pointer that no
    longer resolves."""
    lines = text.splitlines()
    missing, by_row = [], defaultdict(list)
    for p in code_pointers(text, base):
        if not p.symbols and not p.file.is_file():
            continue  # a file named in passing (`tasks.py` in a summary table) is left as text
        missing += unresolved(p)
        by_row[p.row].append(p)
    if missing:
        raise BuildError(f"{name} points at code or tests that are not there: " + ", ".join(missing))
    for row, pointers in by_row.items():
        line = lines[row]
        # from the right, so that the offsets of the spans still to replace stay valid
        for p in sorted((p for p in pointers if has_page(p.file)), key=lambda p: -p.start):
            line = line[:p.start] + _linked_span(line[p.start + 1:p.end - 1], p, page_dir) + line[p.end:]
        lines[row] = line
    return "\n".join(lines) + "\n"


def _linked_span(body: str, p: Pointer, page_dir: str) -> str:
    """`file.py:a, b (note)` -> [`file.py:a`](page#La)`, `[`b`](page#Lb)` (note)`: the text kept, each symbol
    a link to its line (a bare file: one link to its page)."""
    url = _relative(page_of(p.file), Path(page_dir))
    if not p.symbols:
        return f"[`{body}`]({url})"
    head = re.match(r"(?:\.\./)*[\w/]+\.py:(?!:)", body)
    depth, inside = 0, []  # inside[i]: body[i] is in a (note); a symbol there is not the pointer
    for ch in body:
        depth += ch == "("
        inside.append(depth > 0)
        depth -= ch == ")" and depth > 0
    pieces, pos = [], head.end() if head else 0
    for symbol in p.symbols:
        where = r"(?<![\w./])"  # a word of its own (for tests: not the file name's tests/test_x)
        at = next((m.start() for m in re.finditer(where + re.escape(symbol) + r"(?![\w])", body)
                   if m.start() >= pos and not inside[m.start()]), None)
        if at is None:  # not found as a word: leave the rest as it is
            break
        end = at + len(symbol)
        if pieces:  # the first link also covers the file name before its symbol
            at -= 2 if p.is_test and body[at - 2:at] == "::" else 0
            pieces.append(_code(body[pos:at]))
        else:
            at = 0
        pieces.append(f"[`{body[at:end]}`]({url}#L{definitions(p.file)[symbol]})")
        pos = end
    pieces.append(_code(body[pos:]))
    return "".join(pieces)


def _code(text: str) -> str:
    """A leftover piece of a code span: kept as code, or as plain text when it is only separators."""
    return f"`{text}`" if text.strip(" ,;") else text


def generate(src_dir: Path) -> list:
    """Write the site's Markdown tree into ``src_dir``; returns mkdocs's nav."""
    if src_dir.exists():
        shutil.rmtree(src_dir)
    src_dir.mkdir(parents=True)
    copies: set[Path] = set()

    def write(rel: str, text: str) -> None:
        (src_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (src_dir / rel).write_text(text, encoding="utf-8")

    annotated: list[Path] = []

    def annotate_into(py: Path) -> str:  # queued: the pages are written in parallel at the end
        annotated.append(py)
        copies.add(py)
        return page_of(py)

    def markdown_page(md: Path, dest: str, extra: str = "") -> str:
        write(dest, rewrite_markdown(md.read_text(encoding="utf-8"), md, dest, copies) + extra)
        return dest

    nav: list = [{"Home": markdown_page(ROOT / "README.md", "index.md")},
                 {"中文": markdown_page(ROOT / "README_zh.md", "README_zh.md")}]
    markdown_page(ROOT / "doc" / "syllabus.md", "doc/syllabus.md")
    write("doc/results.md", "# Measured results\n\nEvery record of `doc/results.json` (`make results` gathers "
          "them from the runs), by chapter and run.\n\n" + results())
    nav += [{"Syllabus": "doc/syllabus.md"}, {"Results": "doc/results.md"}]

    for chapter in chapters():
        files = reading_order(chapter)
        readme = ROOT / chapter / "README.md"
        listing = "\n".join(f"{i + 1}. [`{p.name}`]({p.stem}_py.md)" for i, p in enumerate(files))
        shown = set(re.findall(r"doc/([\w.-]+\.png)", readme.read_text(encoding="utf-8")))
        pictures = [p for p in sorted((ROOT / "doc").glob(f"{chapter}_*.png")) if p.name not in shown]
        extra = (f"\n\n## The code, in reading order\n\n{listing}\n\n## Recorded results\n\n"
                 f"From `doc/results.json` (written by the chapter's scripts, gathered by `make results`).\n\n"
                 f"{results(chapter)}\n")
        if pictures:
            extra += "\n## More pictures\n\n" + "\n\n".join(f"![{p.stem}](../doc/{p.name})" for p in pictures)
            copies.update(pictures)
        items: list = [{"Overview": markdown_page(readme, f"{chapter}/README.md", extra)}]
        items += [{p.name: annotate_into(p)} for p in files]
        for md in sorted((ROOT / chapter).glob("*.md")):
            if md.name != "README.md":
                items.append({md.stem.capitalize(): markdown_page(md, f"{chapter}/{md.name}")})
        nav.append({chapter: items})

    nav.append({"common (shared package)": [{p.name: annotate_into(p)} for p in sorted((ROOT / "common").glob("*.py"))
                                            if p.read_text(encoding="utf-8").strip()]})
    nav.append({"tests": [{p.name: annotate_into(p)} for p in sorted((ROOT / "tests").glob("*.py"))]})
    nav.append({"Adding a chapter": markdown_page(ROOT / "doc" / "new_chapter.md", "doc/new_chapter.md")})
    nav.append({"How this site is built": annotate_into(Path(__file__).resolve())})
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for py, page in zip(annotated, pool.map(annotated_page, annotated, chunksize=4)):
            write(page_of(py), page)
    for path in copies:
        dest = src_dir / path.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    shutil.copyfile(CSS, src_dir / "site.css")
    return nav


def mkdocs_config(src_dir: Path, site_dir: Path, nav: list | None) -> dict:
    """The mkdocs configuration: Material, no remote fonts, strict link and anchor checks, its own search."""
    config = {
        "site_name": "Transformer tutorials: the annotated source",
        "docs_dir": str(src_dir.resolve()),
        "site_dir": str(site_dir.resolve()),
        "use_directory_urls": False,  # page.html beside its file: relative links work from file:// too
        "strict": True,
        "validation": {"omitted_files": "warn", "absolute_links": "warn", "unrecognized_links": "warn",
                       "anchors": "warn", "not_found": "warn"},
        "theme": {"name": "material", "font": False, "features": ["navigation.sections", "navigation.top"]},
        # no "offline" plugin: it loads a shim from unpkg.com for search over file://; served (http.server or
        # mkdocs serve), Material's own search worker needs nothing from another host
        "plugins": ["search"],
        "extra_css": ["site.css"],
        "markdown_extensions": ["tables", "attr_list", "admonition", {"toc": {"permalink": True}},
                               "pymdownx.superfences", {"pymdownx.highlight": {"use_pygments": True}}],
    }
    if nav is not None:
        config["nav"] = nav
    return config


def mkdocs_build(src_dir: Path, site_dir: Path, nav: list | None = None) -> None:
    """Render with mkdocs in strict mode; BuildError carries mkdocs's warnings (a broken link, say)."""
    import yaml

    config_file = src_dir.parent / (src_dir.name + ".mkdocs.yml")
    config_file.write_text(yaml.safe_dump(mkdocs_config(src_dir, site_dir, nav), allow_unicode=True,
                                          sort_keys=False), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--clean", "-f", str(config_file)],
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if re.match(r"(WARNING|ERROR|Abort)", ln)]
        lines = lines or (done.stderr + done.stdout).strip().splitlines()  # mkdocs itself failed
        raise BuildError("mkdocs build failed:\n" + "\n".join(lines[-30:]))


def build(site_dir: Path = ROOT / "site", src_dir: Path = ROOT / "build" / "site_src") -> Path:
    nav = generate(src_dir)
    mkdocs_build(src_dir, site_dir, nav)
    return site_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m doc.build", description=__doc__.splitlines()[0])
    parser.add_argument("--site-dir", type=Path, default=ROOT / "site", help="where the HTML goes (default site/)")
    parser.add_argument("--serve", action="store_true", help="serve the built site on 127.0.0.1:8000 afterwards")
    args = parser.parse_args(argv)
    try:
        site = build(args.site_dir)
    except BuildError as e:
        print(f"doc.build: error: {e}", file=sys.stderr)
        return 1
    pages = sum(1 for _ in site.rglob("*.html"))
    print(f"doc.build: {pages} pages in {site} (open {site / 'index.html'}, or python -m http.server -d {site})")
    if args.serve:
        subprocess.run([sys.executable, "-m", "http.server", "-b", "127.0.0.1", "-d", str(site), "8000"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
