"""The one error type gpt2dist reports to its users, and the one way it is reported.

Every error that a user's input can cause (a config value, a file from elsewhere, an output that may
not be written, a checkpoint that does not fit) is a `Gpt2distError`: its message names the file
(and key) or the setting, and says what to do. A command ends on one with a single `error:` line on
stderr and exit status 2 (or the error's own `exit_status`); anything else is a bug in gpt2dist, and
keeps its traceback.

The specific types (`ConfigError`, `CorpusError`, `WeightsError`, ...) subclass it, so that code can
still catch the one it expects; `BadFile` is the readers' error for a file that does not hold what its
format promises.
"""

import contextlib
import os
import sys
from pathlib import Path


class Gpt2distError(Exception):
    """An error in what the user gave (the message says which and why); exit status 2 by default."""

    exit_status = 2
    said = False  # its line is already out (see `tell`)


class BadFile(Gpt2distError, ValueError):
    """A file from elsewhere (a manifest, a config.json, a JSON Lines row, ...) that does not hold what its
    format promises. `path` is the file (with `:LINE` where a line is meant), `key` the field at fault."""

    def __init__(self, path: str | Path, message: str, key: str | None = None):
        self.path, self.key = str(path), key
        super().__init__(f"{path}: {key + ': ' if key else ''}{message}")


def say(message: str) -> None:
    """One `error:` line on stderr in a single write, so that the lines of several ranks sharing a
    terminal or pipe never interleave mid-line."""
    line = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())  # one line, always
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), f"error: {line}\n".encode(errors="replace"))
    except (AttributeError, OSError, ValueError):  # a stderr without a file (captured in-process)
        sys.stderr.write(f"error: {line}\n")


def tell(e: BaseException) -> None:
    """Say an error's line, unless it was said already: a rank that must be heard before the others exit (under
    torchrun the first rank to exit ends the rest) says its error first and marks it `said`."""
    if not getattr(e, "said", False):
        say(str(e))


@contextlib.contextmanager
def one_line(*expected: type[BaseException]):
    """Around a command's work: a `Gpt2distError` (or one of the `expected` types, such as OSError for a
    file that cannot be read) ends the program with one `error:` line and its exit status."""
    try:
        yield
    except (Gpt2distError, *expected) as e:
        tell(e)
        sys.exit(getattr(e, "exit_status", 2))


def report(e: BaseException) -> int:
    """Say the error in one line; returns the exit status a command's `main` ends with."""
    tell(e)
    return getattr(e, "exit_status", 2)
