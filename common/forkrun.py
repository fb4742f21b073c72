"""Run ``python -m MODULE ARGS`` commands without paying torch's import for each: a parent imports the modules
once (no torch op, so no thread pool exists yet to break a fork), then forks one child per command. The child
runs the module as ``__main__`` with ``sys.argv`` set, as ``python -m`` would, and exits with the status
Python would give (``SystemExit``'s code; an uncaught exception prints its traceback and exits 1). A fresh
interpreter spends seconds of CPU importing torch and transformers; a fork costs milliseconds. POSIX only.

Used by ``common.gpu_check`` (its CPU dry mode) and ``tests/fork_runner.py`` (the bad-input catalogue).
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys
import traceback
import warnings


def preload(modules: list[str]) -> None:
    """Import the modules the children will run; one that fails to import fails again, visibly, in its child."""
    # runpy's note that the module is in sys.modules already: imported on purpose (other warnings still show)
    warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
    for module in sorted(set(modules)):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - the child meets the same error and reports it as a user would
            pass


def run_child(args: list[str], out: str, err: str | None = None) -> None:
    """In the forked child: stdout to ``out``, stderr to ``err`` (the same file when None), run ``args[0]`` as
    ``python -m`` with ``args[1:]``, exit with its status. Never returns."""
    for fd, path in ((1, out), (2, err)):
        if path is None:
            os.dup2(1, 2)
            continue
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    code = 0
    try:
        sys.argv = list(args)
        runpy.run_module(args[0], run_name="__main__", alter_sys=True)
    except SystemExit as e:  # what the interpreter does with it
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - an uncaught exception: the traceback, status 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
