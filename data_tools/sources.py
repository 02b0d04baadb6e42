"""Finding input files and reading their text, streamed so that memory stays bounded whatever the input size.

- `.jsonl`: one document per line, in a string field (`text` by default); blank lines are ignored.
  Each line is read as `gpt2dist.safe_json` reads a row: an object, on a line of at most 32 MiB.
- `.parquet`: one document per row, in a string column; read row group by row group, in row batches.
- any other file (`.txt`, `.md`, `.py`, `.html`, no extension, ...): one document, if it is
  text; a binary file (a NUL byte near the start) is skipped and counted.

All but Parquet may be compressed (`.gz`, `.zst`: `notes.md.gz`, `docs.jsonl.zst`). Inputs are
files, directories (every file below) or glob patterns (`**` for any depth). Symbolic links are
followed, each real directory entered and each real file read once, so a link loop cannot
repeat or multiply the input; hidden names (`.git`, `.cache`, ...) below an input are passed over.
"""

import fnmatch
import gzip
import io
import os
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import zstandard

from gpt2dist.errors import BadFile, Gpt2distError
from gpt2dist.safe_json import rows

PARQUET_BATCH_ROWS = 1024
SKIPS_SHOWN = 10  # skipped inputs named one by one on stderr; the rest are only counted
GLOB_MAGIC = re.compile(r"[*?[]")
BINARY_SNIFF_BYTES = 8000  # a NUL byte among the first this many makes a file binary (as git decides)

# Why an input was passed over, and how the summary says it.
SKIP_REASONS = {
    "repeated": "already read under another path (symlinks or overlapping inputs)",
    "hidden": "hidden (name starts with '.')",
    "excluded": "excluded by --include/--exclude",
    "special": "not a regular file (broken link, socket, ...)",
    "binary": "binary (NUL bytes)",
}


class InputError(Gpt2distError, ValueError):
    """Unusable input, naming the file (and line)."""


class BinaryFile(InputError):
    """A file that is not text: skipped, not an error."""


def describe_skips(skips: Counter) -> str:
    """'3 binary (NUL bytes), 1 hidden (...)': the skip counts, in SKIP_REASONS order."""
    return ", ".join(f"{skips[r]:,} {why}" for r, why in SKIP_REASONS.items() if skips[r])


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether a relative path matches a glob pattern, part by part; `**` matches any number of parts."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])


def _walk(directory: Path, pattern: tuple[str, ...], skips: Counter, seen: set[Path],
          parts: tuple[str, ...] = ()) -> Iterator[Path]:
    """Files under `directory` whose path below it matches `pattern`, entering each real directory
    once (`seen`), so that symbolic links cannot make a loop; hidden names are passed over."""
    real = directory.resolve()
    if real in seen:
        skips["repeated"] += 1
        return
    seen.add(real)
    deeper = "**" in pattern or len(parts) + 1 < len(pattern)
    try:
        entries = sorted(directory.iterdir())
    except OSError as e:
        raise InputError(f"{directory}: cannot list ({e.strerror or e})") from None
    for entry in entries:
        path = parts + (entry.name,)
        if entry.is_dir():
            if deeper:
                if entry.name.startswith("."):
                    skips["hidden"] += 1
                else:
                    yield from _walk(entry, pattern, skips, seen, path)
        elif _matches(path, pattern):
            if entry.name.startswith("."):
                skips["hidden"] += 1
            elif entry.is_file():
                yield entry
            else:
                skips["special"] += 1


def _found(spec: str, skips: Counter) -> list[Path]:
    """The files one input names: itself, every file under a directory, or those matching a glob pattern."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        return list(_walk(path, ("**", "*"), skips, set()))
    if not GLOB_MAGIC.search(spec):
        raise InputError(f"{spec}: no such file or directory")
    parts = path.parts
    fixed = next(i for i, part in enumerate(parts) if GLOB_MAGIC.search(part))  # the pattern starts below here
    root = Path(*parts[:fixed]) if fixed else Path(".")
    return list(_walk(root, parts[fixed:], skips, set())) if root.is_dir() else []


def _selected(path: Path, include: list[str], exclude: list[str]) -> bool:
    """Whether the --include/--exclude patterns keep a file: each is matched against its name and its path."""
    def matches(pattern: str) -> bool:
        return fnmatch.fnmatchcase(path.name, pattern) or fnmatch.fnmatchcase(str(path), pattern)

    return (not include or any(map(matches, include))) and not any(map(matches, exclude))


def input_files(specs: list[str], include: list[str] = (), exclude: list[str] = ()) -> tuple[list[Path], Counter]:
    """The files to read, in order (each input's sorted), each real file once, those the
    `include` patterns (if any) name and the `exclude` patterns do not; and the number of files
    passed over, by reason (see SKIP_REASONS)."""
    files, skips, seen = [], Counter(), set()
    for spec in specs:
        found = _found(spec, skips)
        if not found:
            raise InputError(f"{spec}: no input files there")
        for f in sorted(found):
            if not _selected(f, include, exclude):
                skips["excluded"] += 1
            elif f.resolve() in seen:
                skips["repeated"] += 1
            else:
                seen.add(f.resolve())
                files.append(f)
    return files, skips


def _open(path: Path) -> BinaryIO:
    """The file's bytes, decompressed on the fly."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        _check_zstd_end(path)
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


ZSTD_FRAME, ZSTD_SKIPPABLE = 0xFD2FB528, 0x184D2A50  # magic numbers (RFC 8878); a skippable one's low 4 bits vary


def _check_zstd_end(path: Path) -> None:
    """Raise ZstdError if a .zst file ends inside a frame (truncated): zstandard's reader would end there
    without a word, the rest of the data lost (gzip's raises EOFError). Walks the frame and block headers
    (RFC 8878, 3.1.1), decompressing nothing; what else is wrong with the file the decoder says."""
    with open(path, "rb") as f:
        end, pos = os.fstat(f.fileno()).st_size, 0
        while pos < end:
            f.seek(pos)
            head = f.read(8)
            magic = int.from_bytes(head[:4], "little")
            if magic & ~0xF == ZSTD_SKIPPABLE and len(head) == 8:
                pos += 8 + int.from_bytes(head[4:], "little")
                continue
            if magic != ZSTD_FRAME or len(head) < 5:
                return
            descriptor = head[4]
            single_segment = descriptor >> 5 & 1
            # magic, descriptor, window size, dictionary id, content size
            pos += 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3] + (single_segment, 2, 4, 8)[descriptor >> 6]
            last = False
            while not last and pos < end:
                f.seek(pos)
                header = int.from_bytes(f.read(3).ljust(3, b"\0"), "little")
                last, rle, size = header & 1, (header >> 1 & 3) == 1, header >> 3
                pos += 3 + (1 if rle else size)
            if not last:
                break
            pos += 4 * (descriptor >> 2 & 1)  # the content checksum
    if pos != end:
        raise zstandard.ZstdError("truncated: the file ends inside a zstd frame")


# What a damaged or unreadable file raises while it is read (gzip raises EOFError when truncated).
READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not valid UTF-8 (byte {e.start})") from None


def _txt(path: Path, text_field: str) -> Iterator[str | InputError]:
    with _open(path) as f:
        head = f.read(BINARY_SNIFF_BYTES)
        if b"\0" in head:
            raise BinaryFile(f"{path}: binary")
        text = _decode(head + f.read(), str(path))
    if text.strip():
        yield text


def _jsonl(path: Path, text_field: str) -> Iterator[str | BadFile]:
    with _open(path) as f:
        for where, record in rows(f, path):
            if isinstance(record, BadFile):
                yield record
            elif not isinstance(record.get(text_field), str):
                yield BadFile(where, f"no string field {text_field!r}")
            else:
                yield record[text_field]


def parquet_row_groups(path: Path) -> list[int]:
    """The size in bytes (compressed, all columns) of each row group of a Parquet file, from its footer;
    [] when it cannot be read (reading it whole then says why)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError):
        return []
    return [sum(group.column(c).total_compressed_size for c in range(group.num_columns))
            for group in map(meta.row_group, range(meta.num_row_groups))]


def _parquet(path: Path, text_field: str, row_groups: range | None = None) -> Iterator[str | InputError]:
    """The rows of a Parquet file (or of `row_groups` of it), row group by row group: a damaged row
    group is one bad input, and the row groups after it are still read, so that the same rows are read
    whether the file is read whole or in ranges of row groups (data_tools.parts)."""
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
    meta = table.metadata
    groups = range(meta.num_row_groups) if row_groups is None else row_groups
    row = sum(meta.row_group(g).num_rows for g in range(groups.start))  # rows are numbered across the file
    for group in groups:
        end = row + meta.row_group(group).num_rows
        try:
            for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=[text_field]):
                for text in batch.column(0).to_pylist():
                    row += 1
                    yield text if text is not None else InputError(f"{path}: row {row}: {text_field!r} is null")
        except (pa.ArrowException, OSError) as e:  # a corrupt page raises OSError ("Corrupt snappy compressed data")
            yield InputError(f"{path}: damaged Parquet row group {group} after row {row} ({e})")
        row = end


class Piece(NamedTuple):
    """What one reader reads: a whole file, or (`row_groups`) a range of a Parquet file's row groups."""

    path: Path
    row_groups: range | None = None

    @property
    def first(self) -> bool:
        """Whether this piece holds the file's start: a whole-file error (an unreadable file, a missing
        column) is counted there only, so that a file read in pieces counts it once, as read whole."""
        return self.row_groups is None or self.row_groups.start == 0


def _reader(path: Path):
    if path.name.endswith(".parquet"):
        return _parquet
    return _jsonl if path.name.removesuffix(".gz").removesuffix(".zst").endswith(".jsonl") else _txt


class Documents:
    """Every document of every file (or `Piece` of a file), in order.

    Bad input (an unreadable, truncated or empty file, invalid UTF-8, a JSON Lines row that
    `gpt2dist.safe_json` refuses, a missing text field) raises InputError or BadFile (naming the
    file, and line or row), or with `skip_bad` is skipped: counted in `skipped`, and
    the first few named on stderr. A file that fails part-way keeps the documents before it.
    Binary files are skipped and counted in `skips["binary"]`.
    """

    def __init__(self, files: list[Path | Piece], text_field: str = "text", skip_bad: bool = False):
        self.pieces = [f if isinstance(f, Piece) else Piece(f) for f in files]
        self.text_field, self.skip_bad = text_field, skip_bad
        self.skipped = 0
        self.skips = Counter()

    def _bad(self, error: Gpt2distError) -> None:
        if not self.skip_bad:
            raise error
        self.skipped += 1
        if self.skipped <= SKIPS_SHOWN:
            print(f"skipped {error}" + (" (further skips are only counted)" if self.skipped == SKIPS_SHOWN else ""),
                  file=sys.stderr)

    def _bad_file(self, piece: Piece, error: InputError) -> None:
        """A whole-file error: with skip_bad, the rest of the file is skipped, and counted once (Piece.first)."""
        if piece.first or not self.skip_bad:
            self._bad(error)

    def _items(self, piece: Piece) -> Iterator[str | Gpt2distError]:
        if piece.row_groups is not None:
            return _parquet(piece.path, self.text_field, piece.row_groups)
        return _reader(piece.path)(piece.path, self.text_field)

    def __iter__(self) -> Iterator[str]:
        for piece in self.pieces:
            path, seen = piece.path, 0
            try:
                for item in self._items(piece):
                    seen += 1
                    if isinstance(item, Gpt2distError):  # a bad line or row
                        self._bad(item)
                    else:
                        yield item
                if not seen and piece.row_groups is None:
                    raise InputError(f"{path}: empty file (no documents)")
            except BinaryFile:
                self.skips["binary"] += 1
            except READ_ERRORS as e:
                self._bad_file(piece, InputError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})"))
            except InputError as e:
                self._bad_file(piece, e)
