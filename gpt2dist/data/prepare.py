"""Documents in, prepared corpus out: tokenize in parallel, split train/val, write shards, publish.

Documents are read in order, grouped into batches, and tokenized by a pool of worker
processes. Results are taken back in submission order, so the shards are byte-identical for
the same input and settings whatever the number of workers; at most a few batches per worker
are in flight, so memory stays bounded whatever the corpus size. `tokenize` gives the token
streams; `CorpusWriter` cuts each split's stream into blocks and shards and writes the manifest,
so a corpus tokenized in parts elsewhere (data_tools/parts.py) is written by the same code.

The corpus is written, staged and swapped in whole, by gpt2dist.outputs (which also decides what
may be replaced), so an interrupted preparation never leaves something that looks done. An output
`pipe:<command>` (stream mode's convention, gpt2dist/data/stream.py) is a command with `{file}` where
each file's name goes, run once per file with the file on its standard input
(`pipe:ssh host 'cat > /data/owt/{file}'`):
the corpus is written to a temporary directory first, then sent, the shards before the manifest, so
that a reader never finds a manifest whose shards are not there yet.
"""

import contextlib
import multiprocessing
import os
import subprocess
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2dist import outputs
from gpt2dist.errors import Gpt2distError
from gpt2dist.data.shards import DEFAULT_BLOCK_TOKENS, FORMAT, MANIFEST, TOKEN_DTYPE, SplitWriter, write_manifest
from gpt2dist.data.tokenizer import EOT, TOKENIZER, VOCAB_SIZE, get_tokenizer

BATCH_DOCUMENTS = 1024  # a batch ends at this many documents ...
BATCH_CHARS = 1 << 20  # ... or this many characters, whichever comes first
IN_FLIGHT_PER_WORKER = 4  # batches submitted ahead of the one being written
EOT_ARRAY = np.array([EOT], dtype=TOKEN_DTYPE)
SPLITS = ("train", "val")


class OutputError(Gpt2distError):
    """An output that could not be written (a `pipe:` command that failed; names the command)."""


def is_validation(utf8: bytes, val_fraction: float) -> bool:
    """A stable per-document choice, from the document's UTF-8 bytes: the same document lands
    in the same split every time."""
    return zlib.crc32(utf8) % 1_000_000 < val_fraction * 1_000_000


def check_val_fraction(val_fraction: float) -> None:
    """Refuse a share of documents held out that is not between 0 and 1."""
    if not 0 <= val_fraction <= 1:
        raise ValueError(f"val_fraction={val_fraction} is not between 0 and 1")


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if len(batch) == BATCH_DOCUMENTS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_batch(texts: list[str], val_fraction: float) -> dict:
    """One batch, in a worker: each split's tokens concatenated (documents in order, each
    followed by <|endoftext|>), its document count, and the input size in UTF-8 bytes."""
    enc = get_tokenizer()
    out = {"bytes": 0}
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for text in texts:
        utf8 = text.encode("utf-8", "surrogatepass")
        # = encode_ordinary (no special tokens recognised in the text), without a Python list per document
        ids = enc.encode_to_numpy(text, disallowed_special=())
        parts["val" if is_validation(utf8, val_fraction) else "train"] += [ids, EOT_ARRAY]
        out["bytes"] += len(utf8)
    for split, arrays in parts.items():
        tokens = np.concatenate(arrays, dtype=TOKEN_DTYPE, casting="unsafe") if arrays else EOT_ARRAY[:0]
        out[split] = (tokens, len(arrays) // 2)
    return out


def _tokenized(documents: Iterable[str], val_fraction: float, workers: int) -> Iterator[tuple[int, dict]]:
    """(documents in the batch, tokenize_batch's result) for each batch, in input order."""
    if workers <= 1:
        for batch in _batches(documents):
            yield len(batch), tokenize_batch(batch, val_fraction)
        return
    # spawn: the caller may be a trainer with threads running, which fork does not copy safely.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = deque()
        for batch in _batches(documents):
            pending.append((len(batch), pool.submit(tokenize_batch, batch, val_fraction)))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                n, future = pending.popleft()
                yield n, future.result()
        while pending:
            n, future = pending.popleft()
            yield n, future.result()


def send(corpus: Path, command: str) -> None:
    """Run `command` (with `{file}`) once per file of the corpus, the file on its standard input;
    the manifest last."""
    files = sorted(p.name for p in corpus.iterdir() if p.name != MANIFEST) + [MANIFEST]
    for name in files:
        one = command.replace("{file}", name)  # names of our own making: nothing to quote
        with open(corpus / name, "rb") as f:
            result = subprocess.run(one, shell=True, stdin=f, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if result.returncode != 0:
            said = result.stderr.decode(errors="replace").strip().splitlines() or [""]
            raise OutputError(f"{one}: exit status {result.returncode}: {said[-1]}")


def check_output(out_dir: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse now, before any work, an output `staged` would refuse at its start (gpt2dist.outputs.check)."""
    if not str(out_dir).startswith("pipe:"):
        outputs.check(out_dir, inputs, overwrite)


@contextlib.contextmanager
def staged(out_dir: str | Path, overwrite: bool, kind: str = "corpus",
           inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """A temporary directory to write a corpus into: published as `out_dir` by gpt2dist.outputs (which
    refuses an output it may not write or replace) or, for `pipe:<command>`, sent through the command,
    when the block ends without an error; removed in any case (see the module docstring)."""
    if str(out_dir).startswith("pipe:"):
        command = str(out_dir).removeprefix("pipe:")
        if "{file}" not in command:
            raise OutputError(f"{out_dir}: a pipe: output needs {{file}} where each file's name goes")
        with tempfile.TemporaryDirectory(prefix="gpt2dist-prepare-") as tmp:
            yield Path(tmp)
            send(Path(tmp), command)
        return
    with outputs.staged(out_dir, kind, inputs, overwrite) as tmp:
        yield tmp


def tokenize(documents: Iterable[str], val_fraction: float, workers: int | None, desc: str,
             progress: bool = True) -> Iterator[dict]:
    """tokenize_batch's results for `documents`, in input order, by `workers` processes (default: one
    per core), with a progress bar on stderr (documents, tokens, MB/s)."""
    start, n_bytes, n_tokens = time.perf_counter(), 0, 0
    with tqdm(desc=desc, unit=" docs", disable=not progress, mininterval=1.0) as bar:
        for n_docs, result in _tokenized(documents, val_fraction, workers or os.cpu_count() or 1):
            yield result
            n_bytes += result["bytes"]
            n_tokens += sum(len(result[split][0]) for split in SPLITS)
            secs = max(time.perf_counter() - start, 1e-9)
            bar.update(n_docs)
            bar.set_postfix_str(f"{n_tokens:,} tokens, {n_bytes / secs / 1e6:.1f} MB/s")


class CorpusWriter:
    """Each split's token stream in (documents in order, each ending in <|endoftext|>), a prepared corpus
    out: blocks cut and shards written as the tokens come (SplitWriter), the manifest last (`close`)."""

    def __init__(self, out_dir: Path, val_fraction: float, block_tokens: int, shard_mb: float):
        self.out_dir, self.val_fraction, self.block_tokens = out_dir, val_fraction, block_tokens
        shard_blocks = max(1, int(shard_mb * 2**20) // ((block_tokens + 1) * TOKEN_DTYPE.itemsize))
        self.writers = {s: SplitWriter(out_dir, s, block_tokens, shard_blocks) for s in SPLITS}
        self.tokens = {s: 0 for s in SPLITS}

    def add(self, split: str, tokens: np.ndarray, documents: int) -> None:
        self.writers[split].add(tokens, documents)
        self.tokens[split] += len(tokens)

    def close(self, source: str, input_bytes: int, skipped_inputs: int) -> dict:
        """Finish the shards and write the manifest; returns it. The train split must hold at least one
        block; with `val_fraction=1` (a held-out corpus, everything to validation), the val split."""
        splits = {s: w.close() for s, w in self.writers.items()}
        needed = "val" if self.val_fraction == 1 else "train"
        if splits[needed]["blocks"] == 0:
            raise ValueError(f"{source}: the {needed} split's {self.tokens[needed]:,} tokens are not enough for "
                             f"one block of {self.block_tokens + 1} tokens")
        manifest = {
            "format": FORMAT,
            "source": source,
            "tokenizer": TOKENIZER,
            "vocab_size": VOCAB_SIZE,
            "eot_token": EOT,
            "dtype": TOKEN_DTYPE.str,
            "block_tokens": self.block_tokens,
            "val_fraction": self.val_fraction,
            "input_bytes": input_bytes,
            "input_tokens": sum(self.tokens.values()),
            "skipped_inputs": skipped_inputs,
            "splits": splits,
        }
        write_manifest(self.out_dir, manifest)
        return manifest


def prepare_corpus(
    documents: Iterable[str],
    out_dir: str | Path,
    source: str,
    val_fraction: float = 0.01,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    shard_mb: float = 256,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    skipped: Callable[[], int] = lambda: 0,
    inputs: Iterable[str | Path] = (),
) -> dict:
    """Tokenize `documents` into a corpus at `out_dir` with `workers` processes (default: one per
    core); returns its manifest. `skipped()`, asked once the documents are read, is the number
    of bad inputs the reader skipped, recorded in the manifest. The train split must hold at least
    one block; with `val_fraction=1` (a held-out corpus, everything to validation), the val split.
    `inputs`, the files and directories read, are what the output may not be, be inside or hold."""
    check_val_fraction(val_fraction)
    with staged(out_dir, overwrite, "corpus", inputs) as tmp:
        corpus, n_bytes = CorpusWriter(tmp, val_fraction, block_tokens, shard_mb), 0
        for result in tokenize(documents, val_fraction, workers, f"tokenizing {source}", progress):
            for split in SPLITS:
                corpus.add(split, *result[split])
            n_bytes += result["bytes"]
        return corpus.close(source, n_bytes, skipped())
