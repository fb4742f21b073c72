"""Run many ``python -m MODULE ARGS`` commands as a user would, without paying torch's import for each.

    python tests/fork_runner.py CASES.json OUT_DIR WORKERS

CASES.json is a list of argument lists (``[module, *flags]``). This interpreter imports every module once, without
running anything (no torch op, so no thread pool exists yet), then forks one child per command: the child runs the
module as ``__main__`` with ``sys.argv`` set, its stdout and stderr going to OUT_DIR/i.out and OUT_DIR/i.err, and
exits as Python would (``SystemExit``'s code; an uncaught exception prints its traceback and exits 1).
OUT_DIR/codes.json gets the exit status of each command, OUT_DIR/times.json its wall seconds. A fresh ``python -m``
costs ~2.5 s of CPU in imports alone; a fork costs milliseconds. POSIX only (os.fork); the forking is
common/forkrun.py.
"""

from __future__ import annotations

import json
import os
import sys
import time

from common.forkrun import preload, run_child


def main() -> None:
    cases_file, out_dir, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(cases_file) as f:
        cases = json.load(f)
    preload([args[0] for args in cases])
    codes: dict[int, int] = {}
    times: dict[int, float] = {}
    running: dict[int, tuple[int, float]] = {}  # pid -> (case, start time)
    todo = list(enumerate(cases))
    while todo or running:
        while todo and len(running) < workers:
            i, args = todo.pop(0)
            pid = os.fork()
            if pid == 0:
                run_child(args, os.path.join(out_dir, f"{i}.out"), os.path.join(out_dir, f"{i}.err"))
            running[pid] = (i, time.perf_counter())
        pid, status = os.wait()
        i, t0 = running.pop(pid)
        codes[i], times[i] = os.waitstatus_to_exitcode(status), time.perf_counter() - t0
    with open(os.path.join(out_dir, "codes.json"), "w") as f:
        json.dump({str(i): c for i, c in sorted(codes.items())}, f)
    with open(os.path.join(out_dir, "times.json"), "w") as f:
        json.dump({str(i): round(t, 2) for i, t in sorted(times.items())}, f)


if __name__ == "__main__":
    main()
