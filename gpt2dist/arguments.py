"""The command line of every gpt2dist command (everything but train.py, which Hydra parses): one parser
class, and the argument types the commands share.

A bad argument is like any other bad input (`gpt2dist.errors`): one `error:` line naming the option, and
exit status 2; no usage block. Counts are `positive` (a window count, a sequence length: 0 would measure
or prepare nothing) or `non_negative` (few-shot examples); shares are `fraction`s in [0, 1), never NaN.
"""

import argparse
import math
import sys

from gpt2dist.errors import say


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one `error:` line (`python -m gpt2dist.compress prune-mlp: argument
    --sequences: 0 is not a positive integer`) and exit status 2. Subcommands are Parsers too."""

    def __init__(self, prog: str | None = None, description: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(prog=prog, description=description, **kwargs)

    def error(self, message: str):
        say(f"{self.prog}: {message}")
        sys.exit(2)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive(text: str) -> int:
    """An integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative(text: str) -> int:
    """An integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not an integer >= 0")
    return value


def positive_number(text: str) -> float:
    """A finite number > 0."""
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def fraction(text: str) -> float:
    """A share in [0, 1) (NaN and infinity are not)."""
    value = _number(text)
    if not 0 <= value < 1:  # False for NaN
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value
