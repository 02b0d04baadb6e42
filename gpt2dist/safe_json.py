"""JSON from elsewhere, parsed safely: a whole document (`read_json`, `loads`) or JSON Lines, row by row
(`rows`, or `lines` and `row`). Every reader of a JSON or JSON Lines file from elsewhere goes through here,
so that none of them can end in a traceback or cost unbounded memory on what it is given.

What is refused, as a `BadFile` naming the file (`FILE:LINE` for a row): text that is not UTF-8 or not
JSON; NaN and Infinity (not JSON, though Python's json module reads them) and numbers beyond a float's
range (1e999 would read as inf); integers of more than MAX_INT_DIGITS digits; nesting deeper than Python's
JSON parser can follow (it would raise RecursionError); a JSON Lines row that is not an object. A JSON
Lines line costs at most MAX_LINE_BYTES to read, however long it is: a longer one is refused (and read
past in chunks, so that a caller may skip it and read on), and a document at most the size its reader
allows (`read_json`).

`Fields` then takes a parsed object's fields one by one, each checked for its type and range, so that every
reader of a format from elsewhere (a corpus manifest, a Hugging Face config.json, adapter_config.json,
compress.json) names the file and the key at fault the same way.
"""

import json
import math
import reprlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from gpt2dist.errors import BadFile

MAX_LINE_BYTES = 32 * 2**20  # one JSON Lines row: a document of a few million words still fits
MAX_INT_DIGITS = 100  # far beyond any count or id a JSON input holds; Python itself stops at 4300
MAX_EXACT_INT = 2**53  # the largest integer every JSON reader holds exactly: the default bound of a count
SKIP_CHUNK = 1 << 20  # how much of a too-long line is read at a time to get past it

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


def shown(value: object) -> str:
    """A value as an error message shows it: its repr, cut short (a hostile value may be huge or deep)."""
    return _short.repr(value)


def _constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is beyond a float's range")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-')):,} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def loads(text: str | bytes, where: str | Path, error: type[BadFile] = BadFile) -> object:
    """The JSON value of `text`, read from `where` (a file, or FILE:LINE); `error` (a BadFile) if it is not
    JSON or holds what this module refuses (see the module docstring)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(where, f"not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except json.JSONDecodeError as e:
        raise error(where, f"malformed JSON ({e.msg} at character {e.pos + 1})") from None
    except ValueError as e:  # from the hooks above
        raise error(where, f"malformed JSON ({e})") from None
    except RecursionError:
        raise error(where, "malformed JSON (nested too deeply)") from None


def read_json(path: str | Path, max_bytes: int, where: str | None = None, error: type[BadFile] = BadFile) -> object:
    """The JSON document in a file of at most `max_bytes` (a larger one is refused before it is read);
    errors (`error`, a BadFile) name `where` (default: the file)."""
    path, where = Path(path), where or str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(where, f"unreadable ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise error(where, f"larger than {max_bytes:,} bytes, far more than this file holds")
    return loads(data, where, error)


def lines(f: BinaryIO, path: str | Path) -> Iterator[tuple[str, bytes | BadFile]]:
    """(`path:N`, the bytes of line N) of each non-blank line of a JSON Lines stream; a line longer than
    MAX_LINE_BYTES is a BadFile instead, read past at no more cost than that."""
    number = 0
    while raw := f.readline(MAX_LINE_BYTES + 1):
        number += 1
        where = f"{path}:{number}"
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while (rest := f.readline(SKIP_CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield where, BadFile(where, f"a line longer than {MAX_LINE_BYTES >> 20} MiB (a JSON Lines row is at most "
                                        "that; split the document, or give it as a text file of its own)")
        elif raw.strip():
            yield where, raw


def row(raw: bytes | str, where: str) -> dict:
    """One JSON Lines row, read from `where` (FILE:LINE): a JSON object, or a BadFile saying why not.
    The one parser of JSON Lines rows."""
    value = loads(raw, where)
    if not isinstance(value, dict):
        raise BadFile(where, f"not a JSON object ({type(value).__name__} {shown(value)}): a row is one object")
    return value


def rows(f: BinaryIO, path: str | Path) -> Iterator[tuple[str, dict | BadFile]]:
    """(`path:N`, the row's object or the BadFile saying why it is none) of each non-blank line of a JSON
    Lines stream; yielded rather than raised, so that a caller may skip a bad row and read on."""
    for where, raw in lines(f, path):
        if isinstance(raw, BadFile):
            yield where, raw
            continue
        try:
            yield where, row(raw, where)
        except BadFile as e:
            yield where, e


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
          dict: "a JSON object", type(None): "null"}


class Fields:
    """The fields of one JSON object read from `where`, each taken checked for its type and range; errors are
    `error` (a BadFile) naming the file and the key (`key.field`, as `splits.train.shards[0].file`)."""

    def __init__(self, where: str | Path, value: object, key: str = "", error: type[BadFile] = BadFile):
        self.where, self.key, self.value, self.error = str(where), key, value, error
        if not isinstance(value, dict):
            raise error(where, f"not a JSON object ({type(value).__name__} {shown(value)})", key or None)

    def name(self, field: str) -> str:
        return f"{self.key}.{field}" if self.key else field

    def bad(self, field: str, message: str) -> BadFile:
        return self.error(self.where, message, self.name(field))

    def get(self, field: str, kind: type | tuple[type, ...], optional: bool = False):
        """The field's value, of type `kind` (a bool is no integer or number, an integer is a number); None
        if it is missing and `optional`."""
        if field not in self.value:
            if optional:
                return None
            raise self.bad(field, "missing")
        value, kinds = self.value[field], kind if isinstance(kind, tuple) else (kind,)
        accepted = (*kinds, int) if float in kinds else kinds
        if not isinstance(value, accepted) or isinstance(value, bool) and bool not in kinds:
            raise self.bad(field, f"{shown(value)} is not {' or '.join(_KINDS[k] for k in kinds)}")
        return value

    def count(self, field: str, low: int = 0, high: int = MAX_EXACT_INT, optional: bool = False) -> int | None:
        """An integer in [low, high]."""
        value = self.get(field, int, optional)
        if value is not None and not low <= value <= high:
            raise self.bad(field, f"{value:,} is not between {low:,} and {high:,}")
        return value

    def number(self, field: str, low: float, high: float, optional: bool = False, open_low: bool = False,
               open_high: bool = False) -> float | None:
        """A number in [low, high] (without the ends that are open)."""
        value = self.get(field, float, optional)
        if value is not None and (value < low or value > high or open_low and value == low
                                  or open_high and value == high):
            raise self.bad(field, f"{value!r} is not in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}")
        return None if value is None else float(value)

    def strings(self, field: str, optional: bool = False, nonempty: bool = False) -> list[str] | None:
        """A list of strings (at least one with `nonempty`)."""
        value = self.get(field, list, optional)
        if value is not None and (not all(isinstance(v, str) for v in value) or nonempty and not value):
            raise self.bad(field, f"{shown(value)} is not a list of {'one or more ' if nonempty else ''}strings")
        return value

    def fields(self, field: str, optional: bool = False) -> "Fields | None":
        """The field's object, as Fields."""
        value = self.get(field, dict, optional)
        return None if value is None else Fields(self.where, value, self.name(field), self.error)
