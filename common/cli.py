"""One error path for every script: what the user can fix is one line, what nobody expected is a traceback.

    if __name__ == "__main__":
        run_main(main, TrainConfig, presets=PRESETS)  # instead of main(parse_config(TrainConfig, ...))

An *expected* error is one the user can act on: bad data (a malformed line, an empty file), a bad flag, a
missing or corrupt file, a checkpoint that does not match the flags, a loss that became NaN. The code
raises ``UserError`` (or one of the standard errors listed in ``EXPECTED``) with a message that names the
file and line or the flag, what was expected and what to do; ``run_main`` prints it as

    error: data/pretrain.jsonl:7: "text" is int, expected a string

on stderr and exits with status 1. ``--debug`` (any script) or ``TUTORIALS_DEBUG=1`` shows the traceback
instead. Every other exception is a bug in the tutorial (or in a library) and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from .config import parse_config
from .errors import UserError

__all__ = ["DEBUG_FLAG", "EXPECTED", "UserError", "debug_requested", "message", "run_main", "user_errors"]


# what the standard library raises for a user's mistake, with the file in the message
EXPECTED = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            FloatingPointError)
DEBUG_FLAG = "--debug"


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get("TUTORIALS_DEBUG", "") not in ("", "0")


def message(err: BaseException) -> str:
    """The one line for an expected error: an OSError names its file, the rest carry their own message."""
    if isinstance(err, OSError) and err.filename is not None and not isinstance(err, UserError):
        return f"{err.filename}: {err.strerror or err}"
    text = str(err).strip() or type(err).__name__
    return " ".join(text.splitlines())


@contextlib.contextmanager
def user_errors(debug: bool | None = None) -> Iterator[None]:
    """Inside: an expected error (or ``SystemExit("message")``) -> ``error: message`` on stderr, exit 1."""
    debug = debug_requested() if debug is None else debug
    try:
        yield
    except EXPECTED as err:
        if debug:
            raise
        print(f"error: {message(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    except SystemExit as err:  # the scripts' own `raise SystemExit("...")`: the same one line, the same status
        if debug or err.code is None or isinstance(err.code, int):
            raise
        print(f"error: {message(Exception(err.code))}", file=sys.stderr)
        raise SystemExit(1) from None


def run_main(main: Callable[[Any], Any], config_cls: type, presets: Mapping[str, Mapping[str, Any]] | None = None,
        argv: Sequence[str] | None = None) -> Any:
    """Parse the flags into ``config_cls`` and call ``main`` with it, inside ``user_errors``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    with user_errors(debug):
        return main(parse_config(config_cls, argv, presets=presets))
