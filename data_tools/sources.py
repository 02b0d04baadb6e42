"""Reading raw text, streamed so that memory stays bounded whatever the input size.

- `.txt`: one document per file.
- `.jsonl`: one document per line, in a string field (`text` by default); blank lines are ignored.
- `.parquet`: one document per row, in a string column; read in row batches.

`.txt` and `.jsonl` may be compressed: `.txt.gz`, `.jsonl.gz`, `.txt.zst`, `.jsonl.zst`.
"""

import glob
import gzip
import io
import json
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import zstandard

SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".txt.zst", ".jsonl.zst", ".parquet")
PARQUET_BATCH_ROWS = 1024
SKIPS_SHOWN = 10  # skipped inputs named one by one on stderr; the rest are only counted


class InputError(ValueError):
    """Unusable input, naming the file (and line)."""


def supported(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def input_files(specs: list[str]) -> list[Path]:
    """Files named directly, found under directories, or matched by glob patterns; sorted."""
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and supported(p))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not found:
            raise InputError(f"{spec}: no such file, or no {', '.join(SUFFIXES)} files there")
        files.extend(found)
    for f in files:
        if not supported(f):
            raise InputError(f"{f}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
    return files


def _open(path: Path) -> BinaryIO:
    """The file's bytes, decompressed on the fly."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


# What a damaged or unreadable file raises while it is read (gzip raises EOFError when truncated).
READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not valid UTF-8 (byte {e.start})") from None


def _txt(path: Path, text_field: str) -> Iterator[str | InputError]:
    with _open(path) as f:
        text = _decode(f.read(), str(path))
    if text.strip():
        yield text


def _jsonl(path: Path, text_field: str) -> Iterator[str | InputError]:
    with _open(path) as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                line = _decode(raw, where)
            except InputError as e:
                yield e
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield InputError(f"{where}: malformed JSON ({e.msg})")
                continue
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                yield InputError(f"{where}: no string field {text_field!r}")
                continue
            yield record[text_field]


def _parquet(path: Path, text_field: str) -> Iterator[str | InputError]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    schema = table.schema_arrow
    if schema.get_field_index(text_field) < 0:
        raise InputError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)})")
    if not pa.types.is_string(schema.field(text_field).type) and not pa.types.is_large_string(
            schema.field(text_field).type):
        raise InputError(f"{path}: column {text_field!r} holds {schema.field(text_field).type}, not strings")
    row = 0
    try:
        for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                yield text if text is not None else InputError(f"{path}: row {row}: {text_field!r} is null")
    except pa.ArrowException as e:
        raise InputError(f"{path}: damaged Parquet file after row {row} ({e})") from None


def _reader(path: Path):
    if path.name.endswith(".parquet"):
        return _parquet
    return _jsonl if ".jsonl" in path.name else _txt


class Documents:
    """Every document of every file, in order.

    Bad input (an unreadable or empty file, invalid UTF-8, a malformed JSON line, a missing
    text field) raises InputError, or with `skip_bad` is skipped: counted in `skipped`, and
    the first few named on stderr. A file that fails part-way keeps the documents before it.
    """

    def __init__(self, files: list[Path], text_field: str = "text", skip_bad: bool = False):
        self.files, self.text_field, self.skip_bad = files, text_field, skip_bad
        self.skipped = 0

    def _bad(self, error: InputError) -> None:
        if not self.skip_bad:
            raise error
        self.skipped += 1
        if self.skipped <= SKIPS_SHOWN:
            print(f"skipped {error}" + (" (further skips are only counted)" if self.skipped == SKIPS_SHOWN else ""),
                  file=sys.stderr)

    def __iter__(self) -> Iterator[str]:
        for path in self.files:
            seen = 0
            try:
                for item in _reader(path)(path, self.text_field):
                    seen += 1
                    if isinstance(item, InputError):
                        self._bad(item)
                    else:
                        yield item
                if not seen:
                    raise InputError(f"{path}: empty file (no documents)")
            except READ_ERRORS as e:
                self._bad(InputError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})"))
            except InputError as e:  # a whole-file error (with skip_bad: the rest of the file is skipped)
                if not self.skip_bad:
                    raise
                self._bad(e)
