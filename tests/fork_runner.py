"""Run many ``python -m MODULE ARGS`` commands as a user would, without paying torch's import for each.

    python tests/fork_runner.py CASES.json OUT_DIR WORKERS

CASES.json is a list of argument lists (``[module, *flags]``). This interpreter imports every module once,
without running anything (no torch op, so no thread pool exists yet), then forks one child per command: the
child runs the module as ``__main__`` with ``sys.argv`` set, its stdout and stderr going to OUT_DIR/i.out and
OUT_DIR/i.err, and exits as Python would (``SystemExit``'s code; an uncaught exception prints its traceback
and exits 1). OUT_DIR/codes.json gets the exit status of each command. A fresh ``python -m`` costs ~2.5 s of
CPU in imports alone; a fork costs milliseconds. POSIX only (os.fork).
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import traceback
import warnings


def run_child(args: list[str], out: str, err: str) -> None:
    """In the forked child: point fds 1 and 2 at the files, run the module, exit with its status."""
    for fd, path in ((1, out), (2, err)):
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


def main() -> None:
    cases_file, out_dir, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    warnings.simplefilter("ignore")  # runpy's "found in sys.modules" note: the module is imported on purpose
    with open(cases_file) as f:
        cases = json.load(f)
    for module in sorted({args[0] for args in cases}):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - the child meets the same error and reports it as a user would
            pass
    codes: dict[int, int] = {}
    running: dict[int, int] = {}  # pid -> case
    todo = list(enumerate(cases))
    while todo or running:
        while todo and len(running) < workers:
            i, args = todo.pop(0)
            pid = os.fork()
            if pid == 0:
                run_child(args, os.path.join(out_dir, f"{i}.out"), os.path.join(out_dir, f"{i}.err"))
            running[pid] = i
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    with open(os.path.join(out_dir, "codes.json"), "w") as f:
        json.dump({str(i): c for i, c in sorted(codes.items())}, f)


if __name__ == "__main__":
    main()
