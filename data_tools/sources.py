"""Reading raw text: `.txt` files (one document each) and JSON Lines (one document a line)."""

import glob
import json
from collections.abc import Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".jsonl")


class InputError(ValueError):
    """Unusable input, naming the file (and line)."""


def input_files(specs: list[str]) -> list[Path]:
    """Files named directly, found under directories, or matched by glob patterns; sorted."""
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not found:
            raise InputError(f"{spec}: no such file, or no .txt/.jsonl files there")
        files.extend(found)
    for f in files:
        if f.suffix not in TEXT_SUFFIXES:
            raise InputError(f"{f}: unsupported file type (expected .txt or .jsonl)")
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None


def documents(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """Every document of every file, in order."""
    for path in files:
        text = _read_text(path)
        if path.suffix == ".txt":
            yield text
            continue
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: malformed JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise InputError(f"{path}:{n}: no string field {text_field!r}")
            yield record[text_field]
