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
"""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from gpt2dist.errors import Gpt2distError
from gpt2dist.fileio import sha256_of
from gpt2dist.data.tokenizer import TOKENIZER

FORMAT = "gpt2dist-tokens-v2"  # v2: shard sizes in the manifest
MANIFEST = "manifest.json"
TOKEN_DTYPE = np.dtype("<u2")
DEFAULT_BLOCK_TOKENS = 8192  # the longest training sequence a prepared corpus serves


class CorpusError(Gpt2distError, RuntimeError):
    """A prepared corpus that is missing, incomplete or inconsistent (names the file)."""


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


def read_manifest(corpus_dir: str | Path) -> dict:
    path = Path(corpus_dir) / MANIFEST
    if not path.is_file():
        raise CorpusError(f"{path}: no manifest: not a corpus prepared by data_tools.prepare, or its preparation did not finish")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path}: corrupt manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CorpusError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}: prepare the corpus "
                          "again with this version of data_tools.prepare")
    return manifest


def corpus_task(manifest: dict) -> str:
    """What a corpus was prepared for: pretrain (data_tools.prepare), sft or classify (their manifests say)."""
    return manifest.get("task", "pretrain")


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
        for s in self.shards:
            path = self.dir / s["file"]
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
            self._files[i] = open(self.dir / self.shards[i]["file"], "rb")
        return self._files[i], self._offsets[i]

    def _index(self, i: int) -> list[int]:
        """Byte offsets of each block's data in shard i, checked against the manifest."""
        return shard_offsets(self.dir / self.shards[i]["file"], self.shards[i]["blocks"], self.block_tokens)

    def read(self, block: int, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the given block (numbered across the split)."""
        assert 0 <= start and start + length <= self.block_tokens + 1
        shard = int(np.searchsorted(self.starts, block, side="right")) - 1
        f, offsets = self._shard(shard)
        f.seek(offsets[block - self.starts[shard]] + start * TOKEN_DTYPE.itemsize)
        data = f.read(length * TOKEN_DTYPE.itemsize)
        if len(data) != length * TOKEN_DTYPE.itemsize:
            raise CorpusError(f"{self.dir / self.shards[shard]['file']}: shard is truncated")
        tokens = np.frombuffer(data, dtype=TOKEN_DTYPE)
        if tokens.max(initial=0) >= self.manifest["vocab_size"]:  # a damaged shard, not a silently wrong batch
            raise CorpusError(f"{self.dir / self.shards[shard]['file']}: token ids beyond the vocabulary in block "
                              f"{block - self.starts[shard]} (damaged shard? run python -m data_tools.verify)")
        return tokens
