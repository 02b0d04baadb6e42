"""Tokenized corpora on disk: webdataset tar shards of fixed-size token blocks, and a manifest.

Layout of a prepared corpus directory:

    manifest.json          format, tokenizer, dtype, block size, per-split shard list
    train-000000.tar ...   webdataset shards; sample key = block number, member `<key>.tokens`
    val-000000.tar ...     the held-out documents, same format

Documents are tokenized, each followed by <|endoftext|>, and concatenated into one stream
per split. The stream is cut into blocks of `block_tokens + 1` tokens that overlap by one
token, so block i holds stream[i*L : i*L + L + 1]: every block gives L next-token targets, and
any sequence length that divides L uses every token. The tail shorter than one block is
dropped (recorded as `dropped_tokens`). Tokens are little-endian uint16 (vocab < 65536).

Blocks do not depend on the training sequence length: any seq_len up to `block_tokens`
(the documented maximum; 8192 by default) trains on the same corpus.

Shards are plain webdataset (`webdataset.WebDataset(urls)` streams them); the trainer reads
them by random access instead (`TokenBlocks`), so that any rank can seek to any block: the
global sample order then does not depend on how shards are split across ranks. The manifest
records each shard's size and SHA-256: `TokenBlocks` checks sizes and tar structure when it
opens a corpus (cheap), `python -m data_tools.verify` checks the checksums (reads everything).

A manifest may come from elsewhere (a downloaded corpus, a stream-mode server): every reader takes
it from `read_manifest`, which checks it whole (`check_manifest`) and names the key at fault, and
joins a shard's name to a directory through `shard_path`, so that only `train|val|test-NNNNNN.tar`
is ever opened or written.
"""

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import NotRequired, TypedDict

import numpy as np

from gpt2dist.errors import BadFile, Gpt2distError
from gpt2dist.fileio import sha256_of
from gpt2dist.data.tokenizer import TOKENIZER
from gpt2dist.safe_json import Fields, read_json, shown

FORMAT = "gpt2dist-tokens-v2"  # v2: shard sizes in the manifest
MANIFEST = "manifest.json"
TOKEN_DTYPE = np.dtype("<u2")
DEFAULT_BLOCK_TOKENS = 8192  # the longest training sequence a prepared corpus serves
SPLITS = ("train", "val", "test")
SHARD_NAME = re.compile(r"(train|val|test)-\d{6}\.tar")  # the only files a manifest may name
SHA256 = re.compile(r"[0-9a-f]{64}")
PRETRAIN, TASKS = "pretrain", ("pretrain", "sft", "classify")  # what a corpus is for (`task`)
EXAMPLE_TOKENS = {"sft": 2, "classify": 0}  # block_tokens - seq_len of a fine-tuning corpus (gpt2dist.data.sft)
# Bounds on what a manifest may claim, far beyond any real corpus: 16 MiB lists ~100,000 shards.
MAX_MANIFEST_BYTES = 16 * 2**20
MAX_BLOCK_TOKENS = 2**24
TOKEN_IDS = np.iinfo(TOKEN_DTYPE).max + 1  # the largest vocabulary whose ids the shards can hold


class CorpusError(Gpt2distError, RuntimeError):
    """A prepared corpus that is missing, incomplete or inconsistent (names the file)."""


class BadManifest(CorpusError, BadFile):
    """A corpus manifest that does not hold what this version writes (names the file and the key)."""


class Shard(TypedDict):
    file: str  # train-000000.tar: SHARD_NAME, its split's name first
    blocks: int
    bytes: int  # shard_bytes(blocks, block_tokens)
    sha256: str
    tokens: int  # blocks * block_tokens


class Split(TypedDict):
    shards: list[Shard]
    blocks: int
    tokens: int


class Manifest(TypedDict):
    """What `read_manifest` returns, checked: the keys the readers use (the writers add more, such as the
    source and the input size, which nothing reads back)."""

    format: str  # FORMAT
    tokenizer: str
    vocab_size: int
    block_tokens: int
    splits: dict[str, Split]  # train and val; test in fine-tuning corpora
    task: NotRequired[str]  # sft or classify (default: pretrain)
    seq_len: NotRequired[int]  # of a fine-tuning corpus: block_tokens - EXAMPLE_TOKENS[task]
    labels: NotRequired[list[str]]  # of a classification corpus: its classes, in the order of their ids


class SplitWriter:
    """Cuts one split's token stream into blocks and writes them to numbered tar shards."""

    def __init__(self, out_dir: Path, split: str, block_tokens: int, shard_blocks: int):
        self.out_dir, self.split = out_dir, split
        self.block_tokens, self.shard_blocks = block_tokens, shard_blocks
        self.pending = np.empty(0, dtype=TOKEN_DTYPE)
        self.shards: list[dict] = []
        self.documents = 0
        self.tar: tarfile.TarFile | None = None

    def add(self, tokens: np.ndarray, documents: int) -> None:
        """Append tokenized documents (each already ending in <|endoftext|>)."""
        self.documents += documents
        self.pending = np.concatenate([self.pending, tokens.astype(TOKEN_DTYPE, copy=False)])
        L = self.block_tokens
        n = (len(self.pending) - 1) // L  # complete blocks of L + 1 tokens
        for i in range(n):
            self._write_block(self.pending[i * L : i * L + L + 1])
        self.pending = self.pending[n * L :]

    def add_block(self, block: np.ndarray) -> None:
        """Write one whole block (`block_tokens + 1` tokens) as one document: a fine-tuning example
        (`gpt2dist.data.sft`), which shares no tokens with its neighbours."""
        assert len(block) == self.block_tokens + 1
        self.documents += 1
        self._write_block(block.astype(TOKEN_DTYPE, copy=False))

    def _write_block(self, block: np.ndarray) -> None:
        if self.tar is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self.shards.append({"file": name, "blocks": 0})
            self.tar = tarfile.open(self.out_dir / name, "w", format=tarfile.USTAR_FORMAT)
        # What webdataset's TarWriter writes, with a fixed mtime: byte-identical shards for the same input.
        info = tarfile.TarInfo(f"{self.shards[-1]['blocks']:08d}.tokens")
        info.size, info.mode, info.uname, info.gname = block.nbytes, 0o444, "bigdata", "bigdata"
        self.tar.addfile(info, io.BytesIO(block.tobytes()))
        self.shards[-1]["blocks"] += 1
        if self.shards[-1]["blocks"] == self.shard_blocks:
            self._close_shard()

    def _close_shard(self) -> None:
        self.tar.close()
        self.tar = None
        shard = self.shards[-1]
        shard["tokens"] = shard["blocks"] * self.block_tokens
        shard["bytes"] = (self.out_dir / shard["file"]).stat().st_size
        shard["sha256"] = sha256_of(self.out_dir / shard["file"])

    def close(self) -> dict:
        """Finish the last shard; returns this split's manifest entry."""
        if self.tar is not None:
            self._close_shard()
        return {
            "documents": self.documents,
            "blocks": sum(s["blocks"] for s in self.shards),
            "tokens": sum(s["tokens"] for s in self.shards),
            "dropped_tokens": max(len(self.pending) - 1, 0),
            "shards": self.shards,
        }


def write_manifest(out_dir: Path, manifest: dict) -> None:
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out_dir / MANIFEST)


def read_manifest(corpus_dir: str | Path, source: str | None = None) -> Manifest:
    """The corpus manifest of a directory, checked (`check_manifest`); errors name `source` (where it was
    fetched from, for a remote corpus), or else the file."""
    path = Path(corpus_dir) / MANIFEST
    if not path.is_file():
        raise CorpusError(f"{source or path}: no manifest: not a corpus prepared by data_tools.prepare, or its "
                          "preparation did not finish")
    where = source or str(path)
    return check_manifest(read_json(path, MAX_MANIFEST_BYTES, where, BadManifest), where)


def shard_bytes(blocks: int, block_tokens: int) -> int:
    """The size of a shard that SplitWriter writes: per block a USTAR member (a 512-byte header, the data
    padded to 512 bytes), then the two zero blocks that end an archive, padded to tarfile's 10240-byte record."""
    member = 512 + -(-(block_tokens + 1) * TOKEN_DTYPE.itemsize // 512) * 512
    return -(-(blocks * member + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _fields(where: str, value: object, key: str = "") -> Fields:
    return Fields(where, value, key, BadManifest)


def check_manifest(raw: object, where: str) -> Manifest:
    """`raw`, the JSON of a corpus manifest read from `where`, checked to be one that this version wrote:
    every key the readers use present and of its type, every count in its range and consistent with the
    others (a shard's size is that of its blocks), every shard file a shard's name; raises BadManifest
    naming the key otherwise. Returns it as a Manifest."""
    m = _fields(where, raw)
    if raw.get("format") != FORMAT:
        raise m.bad("format", f"{shown(raw.get('format'))}, expected {FORMAT!r}: prepare the corpus again with this "
                              "version of data_tools.prepare")
    m.get("tokenizer", str)
    vocab_size = m.count("vocab_size", 1, TOKEN_IDS)
    block_tokens = m.count("block_tokens", 1, MAX_BLOCK_TOKENS)
    if m.get("dtype", str, optional=True) not in (None, TOKEN_DTYPE.str):
        raise m.bad("dtype", f"{shown(raw['dtype'])}: this version reads tokens of {TOKEN_DTYPE.str} only")
    task = m.get("task", str, optional=True) or PRETRAIN
    if task not in TASKS:
        raise m.bad("task", f"{shown(task)} is none of {', '.join(TASKS)}")
    if task in EXAMPLE_TOKENS:
        seq_len = m.count("seq_len", 1, MAX_BLOCK_TOKENS)
        if block_tokens != seq_len + EXAMPLE_TOKENS[task]:
            raise m.bad("block_tokens", f"{block_tokens:,}, but {task} examples of seq_len {seq_len:,} take "
                                        f"{seq_len + EXAMPLE_TOKENS[task]:,}")
    if task == "classify":
        labels = m.get("labels", list)
        if not 0 < len(labels) <= vocab_size or not all(isinstance(label, str) for label in labels) \
                or len(set(labels)) != len(labels):
            raise m.bad("labels", f"{shown(labels)} is not a list of 1 to {vocab_size:,} distinct strings")
    splits = m.fields("splits")
    for split in raw["splits"]:
        if split not in SPLITS:
            raise splits.bad(split, f"not a split ({', '.join(SPLITS)})")
    files = set()
    for split in ("train", "val", *(["test"] if "test" in raw["splits"] else [])):  # test: fine-tuning corpora only
        s = splits.fields(split)
        blocks = tokens = 0
        for i, entry in enumerate(s.get("shards", list)):
            shard = _fields(where, entry, s.name(f"shards[{i}]"))
            file = shard.get("file", str)
            if not SHARD_NAME.fullmatch(file) or not file.startswith(f"{split}-"):
                raise shard.bad("file", f"{shown(file)} is not the name of a shard of the {split} split "
                                        f"({split}-NNNNNN.tar)")
            if file in files:
                raise shard.bad("file", f"{file} is listed twice")
            files.add(file)
            n = shard.count("blocks", 1)
            if shard.count("bytes") != shard_bytes(n, block_tokens):
                raise shard.bad("bytes", f"{entry['bytes']:,}, but a shard of {n:,} blocks of {block_tokens:,} tokens "
                                         f"is {shard_bytes(n, block_tokens):,} bytes")
            if shard.count("tokens") != n * block_tokens:
                raise shard.bad("tokens", f"{entry['tokens']:,}, but {n:,} blocks hold {n * block_tokens:,}")
            if not SHA256.fullmatch(shard.get("sha256", str)):
                raise shard.bad("sha256", f"{shown(entry['sha256'])} is not a SHA-256 (64 hex digits)")
            blocks, tokens = blocks + n, tokens + n * block_tokens
        for field, total in (("blocks", blocks), ("tokens", tokens)):
            if s.count(field) != total:
                raise s.bad(field, f"{s.value[field]:,}, but its shards hold {total:,}")
    return raw


def shard_path(corpus_dir: str | Path, file: str) -> Path:
    """Where shard `file` of a corpus is. Only a shard's name is joined (a manifest's are checked when it is
    read, and here again), so that no name from elsewhere can point outside the corpus directory."""
    if not SHARD_NAME.fullmatch(file):
        raise CorpusError(f"{corpus_dir}: {shown(file)} is not the name of a shard (train-NNNNNN.tar)")
    return Path(corpus_dir) / file


def corpus_task(manifest: Manifest) -> str:
    """What a corpus was prepared for: pretrain (data_tools.prepare), sft or classify (their manifests say)."""
    return manifest.get("task", PRETRAIN)


# What each kind of corpus holds, as its manifest says (`corpus_task`).
CORPUS_KINDS = {"pretrain": "a pretraining corpus", "sft": "fine-tuning examples (data_tools.sft)",
                "classify": "classification examples (data_tools.classify)"}


def require_kind(manifest: Manifest, corpus_dir: str | Path, kinds: tuple[str, ...], use: str) -> None:
    """Refuse (CorpusError) a corpus whose kind is not one of `kinds` for `use`, which says what it was given
    to and what to do instead: the examples of another task would be read in a layout they do not have."""
    kind = corpus_task(manifest)
    if kind not in kinds:
        raise CorpusError(f"{corpus_dir}: holds {CORPUS_KINDS.get(kind, kind)}, not {use}")


def check_tokenizer(manifest: dict, corpus_dir: str | Path, vocab_size: int) -> None:
    """A corpus tokenized with another tokenizer would train on meaningless ids: refuse it."""
    if manifest["tokenizer"] != TOKENIZER or manifest["vocab_size"] > vocab_size:
        raise CorpusError(f"{Path(corpus_dir) / MANIFEST}: tokenized with {manifest['tokenizer']} "
                          f"({manifest['vocab_size']} tokens), but the model expects {TOKENIZER} ({vocab_size})")


def shard_offsets(path: Path, blocks: int, block_tokens: int) -> list[int]:
    """Byte offsets of each block's data in a shard, which must hold `blocks` blocks."""
    size = (block_tokens + 1) * TOKEN_DTYPE.itemsize
    try:
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError) as e:
        raise CorpusError(f"{path}: unreadable shard ({e})") from None
    if len(members) != blocks or any(m.size != size for m in members):
        raise CorpusError(f"{path}: {len(members)} members, but the manifest lists {blocks} blocks of "
                          f"{size} bytes (truncated or replaced?)")
    return [m.offset_data for m in members]


class TokenBlocks:
    """Random access to the token blocks of one split of a prepared corpus.

    Safe to use from DataLoader workers: open files are per process.
    """

    def __init__(self, corpus_dir: str | Path, split: str):
        self.dir = Path(corpus_dir)
        self.manifest = read_manifest(self.dir)
        if split not in self.manifest["splits"]:
            raise CorpusError(f"{self.dir / MANIFEST}: no split {split!r}")
        self.split = split
        self.block_tokens = self.manifest["block_tokens"]
        self.shards = self.manifest["splits"][split]["shards"]
        self.starts = np.cumsum([0] + [s["blocks"] for s in self.shards])  # first block of each shard
        self.paths = [shard_path(self.dir, s["file"]) for s in self.shards]
        for s, path in zip(self.shards, self.paths):
            if not path.is_file():
                raise CorpusError(f"{path}: shard listed in the manifest is missing")
            if path.stat().st_size != s["bytes"]:
                raise CorpusError(f"{path}: {path.stat().st_size:,} bytes, but the manifest says {s['bytes']:,} "
                                  "(truncated or replaced?)")
        self._offsets: dict[int, list[int]] = {}
        self._files: dict[int, io.BufferedReader] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self):
        # Workers re-open their own files.
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def _shard(self, i: int) -> tuple[io.BufferedReader, list[int]]:
        if self._pid != os.getpid():  # forked: file positions are shared with the parent
            self._files, self._pid = {}, os.getpid()
        if i not in self._offsets:
            self._offsets[i] = self._index(i)
        if i not in self._files:
            self._files[i] = open(self.paths[i], "rb")
        return self._files[i], self._offsets[i]

    def _index(self, i: int) -> list[int]:
        """Byte offsets of each block's data in shard i, checked against the manifest."""
        return shard_offsets(self.paths[i], self.shards[i]["blocks"], self.block_tokens)

    def read(self, block: int, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the given block (numbered across the split)."""
        assert 0 <= start and start + length <= self.block_tokens + 1
        shard = int(np.searchsorted(self.starts, block, side="right")) - 1
        f, offsets = self._shard(shard)
        f.seek(offsets[block - self.starts[shard]] + start * TOKEN_DTYPE.itemsize)
        data = f.read(length * TOKEN_DTYPE.itemsize)
        if len(data) != length * TOKEN_DTYPE.itemsize:
            raise CorpusError(f"{self.paths[shard]}: shard is truncated")
        tokens = np.frombuffer(data, dtype=TOKEN_DTYPE)
        if tokens.max(initial=0) >= self.manifest["vocab_size"]:  # a damaged shard, not a silently wrong batch
            raise CorpusError(f"{self.paths[shard]}: token ids beyond the vocabulary in block "
                              f"{block - self.starts[shard]} (damaged shard? run python -m data_tools.verify)")
        return tokens
