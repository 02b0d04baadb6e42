"""One corpus prepared on many machines: `data_tools.prepare ... --part K --of N` on N array tasks,
then `--merge --of N`, writes the corpus that `data_tools.prepare ...` on one machine writes from the
same inputs and settings, byte for byte (shards, manifest, validation split), whatever N is.

The plan: the inputs, in input_files' order, are cut into units (a file, or a row group of a Parquet
file) weighed by their bytes on disk; each unit goes to the part where the middle of its bytes falls.
Parts are thus contiguous ranges of about equal size, computed from the inputs alone, the same by
every task. A document's tokens and its split (a hash of its own text) do not depend on its
neighbours, so each split's token stream is the concatenation of the parts' streams in order: a
part stores its streams as raw tokens (`train.tokens`, `val.tokens`) with their counts, and the
merge feeds them, part after part, to the CorpusWriter a single machine uses, which cuts the same
blocks and shards.

Parts live beside the output, hidden, in `.OUTPUT.parts/part-KKKKK-of-NNNNN/`, with a `part.json`
(counts, checksums, and a fingerprint of the plan and of the settings a part depends on) and no
corpus manifest: nothing takes a part for a corpus. A part is written into a staging directory and
renamed into place, `part.json` last, so a part that exists is complete; a task killed mid-way
leaves only its staging directory, which its rerun removes, and a rerun of a complete part does
nothing. The merge refuses, in one line, while any part is missing, or was made from other inputs
or settings; once the corpus is written it removes the parts.
"""

import contextlib
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_tools.sources import Documents, Piece, parquet_row_groups
from gpt2dist import outputs
from gpt2dist.errors import BadFile, Gpt2distError
from gpt2dist.data.prepare import SPLITS, CorpusWriter, check_output, check_val_fraction, staged, tokenize
from gpt2dist.data.shards import TOKEN_DTYPE
from gpt2dist.data.tokenizer import TOKENIZER

PART_FORMAT = "gpt2dist-prepare-part-v1"
PART_MANIFEST = "part.json"
PART_FIELDS = {"input_bytes": int, "skipped_inputs": int, "skips": dict, "splits": dict}
SPLIT_FIELDS = {"documents": int, "tokens": int, "sha256": str}
MERGE_CHUNK_TOKENS = 1 << 24  # tokens read from a part at a time (32 MiB)
MISSING_SHOWN = 10  # missing parts named one by one


class PartsError(Gpt2distError):
    """A part or a merge that cannot be done as asked (names the setting, or the missing parts)."""


@dataclass(frozen=True)
class Plan:
    """What each of the parts reads (`parts[k]`: pieces of the inputs, in order), the settings that its
    tokens depend on, and a fingerprint of both with the inputs' names and sizes."""

    parts: list[list[Piece]]
    settings: dict
    fingerprint: str

    @property
    def of(self) -> int:
        return len(self.parts)


def make_plan(files: list[Path], of: int, text_field: str, val_fraction: float, skip_bad: bool) -> Plan:
    """Cut the input files (input_files' list) into `of` parts of about equal size on disk."""
    check_val_fraction(val_fraction)
    size = {path: path.stat().st_size for path in files}
    groups = {path: parquet_row_groups(path) if path.name.endswith(".parquet") else [] for path in files}
    # Units, in order: (file, row group, its bytes), or (file, None, its bytes) for a file read whole.
    units = [(path, g, n) for path in files
             for g, n in (enumerate(groups[path]) if groups[path] else [(None, size[path])])]
    total, done = sum(n for *_, n in units), 0
    parts: list[list[Piece]] = [[] for _ in range(of)]
    for path, group, n in units:
        pieces = parts[min(of - 1, (2 * done + n) * of // (2 * total)) if total else 0]  # where its middle falls
        done += n
        if group is not None and pieces and pieces[-1].path == path:  # the next row group of the same file
            pieces[-1] = Piece(path, range(pieces[-1].row_groups.start, group + 1))
        else:
            pieces.append(Piece(path, None if group is None else range(group, group + 1)))
    parts = [[Piece(p.path) if p.row_groups == range(len(groups[p.path])) else p for p in part] for part in parts]
    settings = {"text_field": text_field, "val_fraction": val_fraction, "skip_bad": skip_bad}
    described = {"format": PART_FORMAT, "tokenizer": TOKENIZER, "of": of, "settings": settings,
                 "inputs": [(str(path), size[path], groups[path]) for path in files]}
    return Plan(parts, settings, hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest())


def check_part_options(part: int | None, of: int | None, merge: bool, output: str) -> None:
    """Refuse --part/--of/--merge that do not go together, in one line naming them."""
    if of is None:
        if part is not None or merge:
            raise PartsError(f"{'--merge' if merge else '--part'} needs --of N, the number of parts")
        return
    if of < 1:
        raise PartsError(f"--of {of}: the number of parts must be at least 1")
    if merge == (part is not None):
        raise PartsError(f"--of {of} needs either --part K (tokenize part K) or --merge (write the corpus)")
    if part is not None and not 0 <= part < of:
        raise PartsError(f"--part {part}: the parts of --of {of} are numbered 0 to {of - 1}")
    if output.startswith("pipe:"):
        raise PartsError(f"--output {output}: a preparation in parts needs a directory to write its parts beside")


def parts_dir(output: str | Path) -> Path:
    """Where the parts of the corpus `output` go: `.NAME.parts` beside it (where a link points)."""
    out = Path(output).resolve()
    return out.parent / f".{out.name}.parts"


def part_dir(output: str | Path, part: int, of: int) -> Path:
    return parts_dir(output) / f"part-{part:05d}-of-{of:05d}"


def _part_manifest(part: Path) -> dict | None:
    """A part's part.json, or None where the part is not there (not complete)."""
    path = part / PART_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadFile(path, f"not a part's manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PART_FORMAT:
        raise BadFile(path, f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                            f"expected {PART_FORMAT!r}", key="format")
    for key, kind in PART_FIELDS.items():
        _expect(path, key, manifest.get(key), kind)
    for reason, n in manifest["skips"].items():
        _expect(path, f"skips.{reason}", n, int)
    for split in SPLITS:
        entry = manifest["splits"].get(split)
        _expect(path, f"splits.{split}", entry, dict)
        for key, kind in SPLIT_FIELDS.items():
            _expect(path, f"splits.{split}.{key}", entry.get(key), kind)
    return manifest


def _expect(path: Path, key: str, value, kind: type) -> None:
    if not isinstance(value, kind):
        raise BadFile(path, f"{value!r} is not {'an' if kind is int else 'a'} {kind.__name__}", key=key)


def _check_part(part: Path, k: int, manifest: dict, plan: Plan) -> None:
    """Refuse a part made from other inputs or settings than `plan`'s, or whose token files are not
    the size its manifest says."""
    path = part / PART_MANIFEST
    again = _again(k, plan.of)
    settings = manifest.get("settings") if isinstance(manifest.get("settings"), dict) else {}
    for key, value in plan.settings.items():
        if settings.get(key) != value:
            raise BadFile(path, f"made with {settings.get(key)!r}, this merge has {value!r}: {again}",
                          key=f"settings.{key}")
    if manifest.get("part") != k or manifest.get("fingerprint") != plan.fingerprint:
        raise BadFile(path, f"made from other inputs (the input files, their sizes or their Parquet row groups "
                            f"differ), or for another part: {again}", key="fingerprint")
    for split in SPLITS:
        tokens = part / f"{split}.tokens"
        size = tokens.stat().st_size if tokens.is_file() else None
        if size != manifest["splits"][split]["tokens"] * TOKEN_DTYPE.itemsize:
            raise BadFile(tokens, f"{size} bytes, but part.json says {manifest['splits'][split]['tokens']:,} "
                                  f"tokens (damaged or replaced?): {again}", key=f"splits.{split}.tokens")


def _complete(part: Path, k: int, plan: Plan) -> dict | None:
    """A part already there, complete and made from this plan, or None."""
    try:
        manifest = _part_manifest(part)
        if manifest is not None:
            _check_part(part, k, manifest, plan)
        return manifest
    except BadFile:  # an earlier try's, from other inputs: made again
        return None


class _TokenFile:
    """One split's token stream of a part, written as it comes, with its counts and checksum."""

    def __init__(self, path: Path):
        self.file, self.sha256 = open(path, "wb"), hashlib.sha256()
        self.documents = self.tokens = 0

    def add(self, tokens: np.ndarray, documents: int) -> None:
        data = tokens.astype(TOKEN_DTYPE, copy=False).tobytes()
        self.file.write(data)
        self.sha256.update(data)
        self.documents, self.tokens = self.documents + documents, self.tokens + len(tokens)

    def close(self) -> dict:
        self.file.close()
        return {"documents": self.documents, "tokens": self.tokens, "sha256": self.sha256.hexdigest()}


def prepare_part(plan: Plan, k: int, output: str | Path, source: str, overwrite: bool = False,
                 workers: int | None = None, progress: bool = True, inputs: list[str | Path] = ()) -> tuple[dict, bool]:
    """Tokenize part `k` of `plan` into part_dir(output, k, plan.of); returns its manifest, and whether
    it was already complete (then nothing is done). `overwrite` is the merge's: a corpus already at
    `output` is refused now, not after every part is tokenized. A part that an earlier try with other
    inputs or settings wrote is replaced (gpt2dist.outputs: only if gpt2dist wrote it), and what killed
    tries left is removed."""
    check_output(output, overwrite, inputs)
    part = part_dir(output, k, plan.of)
    done = _complete(part, k, plan)
    if done is not None:
        return done, True
    documents = Documents(plan.parts[k], plan.settings["text_field"], plan.settings["skip_bad"])
    outputs.remove_leftovers(part)
    with staged(part, True, "part", inputs) as tmp:
        streams = {split: _TokenFile(tmp / f"{split}.tokens") for split in SPLITS}
        n_bytes = 0
        for result in tokenize(documents, plan.settings["val_fraction"], workers,
                               f"part {k} of {plan.of}: tokenizing {source}", progress):
            for split, stream in streams.items():
                stream.add(*result[split])
            n_bytes += result["bytes"]
        manifest = {"format": PART_FORMAT, "part": k, "of": plan.of, "fingerprint": plan.fingerprint,
                    "settings": plan.settings, "input_bytes": n_bytes, "skipped_inputs": documents.skipped,
                    "skips": dict(documents.skips), "splits": {s: w.close() for s, w in streams.items()}}
        (tmp / PART_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")  # last: the part is complete
    return manifest, False


def _again(k: int, of: int) -> str:
    return f"run part {k} again (--part {k} --of {of})"


def _tokens(path: Path, sha256: str, key: str, again: str) -> Iterator[np.ndarray]:
    """A part's token file in chunks, checked against its checksum once read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MERGE_CHUNK_TOKENS * TOKEN_DTYPE.itemsize):
            h.update(chunk)
            yield np.frombuffer(chunk, dtype=TOKEN_DTYPE)
    if h.hexdigest() != sha256:
        raise BadFile(path, f"SHA-256 differs from part.json (damaged or replaced): {again}", key=key)


def merge_parts(plan: Plan, output: str | Path, source: str, block_tokens: int, shard_mb: float,
                overwrite: bool = False, progress: bool = True, inputs: list[str | Path] = ()) -> tuple[dict, Counter]:
    """Write the corpus at `output` from the plan's complete parts, then remove the parts; returns its
    manifest and the inputs the parts skipped, by reason (see sources.SKIP_REASONS)."""
    parts = [part_dir(output, k, plan.of) for k in range(plan.of)]
    manifests = [_part_manifest(part) for part in parts]
    missing = [k for k, m in enumerate(manifests) if m is None]
    if missing:
        named = ", ".join(map(str, missing[:MISSING_SHOWN])) + (", ..." if len(missing) > MISSING_SHOWN else "")
        raise PartsError(f"{parts_dir(output)}: {len(missing)} of {plan.of} parts not complete "
                         f"(part{'s' if len(missing) > 1 else ''} {named}): run {'them' if len(missing) > 1 else 'it'} "
                         f"(--part K --of {plan.of}) before the merge")
    for k, (part, manifest) in enumerate(zip(parts, manifests)):
        _check_part(part, k, manifest, plan)
    total = sum(m["splits"][s]["tokens"] for m in manifests for s in SPLITS)
    with staged(output, overwrite, "corpus", inputs) as tmp:
        corpus = CorpusWriter(tmp, plan.settings["val_fraction"], block_tokens, shard_mb)
        with tqdm(total=total, desc=f"merging {plan.of} parts", unit=" tokens", unit_scale=True,
                  disable=not progress, mininterval=1.0) as bar:
            for split in SPLITS:  # each split's stream: its parts' streams in order
                for k, (part, manifest) in enumerate(zip(parts, manifests)):
                    entry = manifest["splits"][split]
                    for tokens in _tokens(part / f"{split}.tokens", entry["sha256"], f"splits.{split}.sha256",
                                          _again(k, plan.of)):
                        corpus.add(split, tokens, 0)
                        bar.update(len(tokens))
                    corpus.add(split, np.empty(0, TOKEN_DTYPE), entry["documents"])
        manifest = corpus.close(source, sum(m["input_bytes"] for m in manifests),
                                sum(m["skipped_inputs"] for m in manifests))
    remove_parts(output)
    return manifest, sum((Counter(m["skips"]) for m in manifests), Counter())


def remove_parts(output: str | Path) -> None:
    """Remove the parts beside `output` (of any number of parts) and what killed tasks left, where
    gpt2dist.outputs says gpt2dist wrote them; nothing else there, and the directory only once it is empty."""
    root = parts_dir(output)
    for part in sorted(root.glob("part-*-of-*")):
        outputs.remove(part)
    outputs.remove_leftovers(root / "part-*-of-*")
    with contextlib.suppress(OSError):
        root.rmdir()
