"""Documents in, prepared corpus out: tokenize, split train/val, write shards, publish.

The corpus is written into a temporary directory beside the target and renamed into place
only when complete, so an interrupted preparation never leaves something that looks done.
"""

import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from gpt2dist.shards import DEFAULT_BLOCK_TOKENS, FORMAT, MANIFEST, TOKEN_DTYPE, SplitWriter, write_manifest
from gpt2dist.tokenizer import EOT, get_tokenizer

BATCH_DOCUMENTS = 256  # documents handed to tiktoken's threaded batch encoder at once


def is_validation(text: str, val_fraction: float) -> bool:
    """A stable per-document choice: the same document lands in the same split every time."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) % 1_000_000 < val_fraction * 1_000_000


def _batches(documents: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(documents)
    while batch := list(islice(it, n)):
        yield batch


def prepare_corpus(
    documents: Iterable[str],
    out_dir: str | Path,
    source: str,
    val_fraction: float = 0.01,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    shard_mb: float = 256,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize `documents` into a corpus at `out_dir`; returns its manifest."""
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: a prepared corpus is already there (pass --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the corpus is not
    try:
        enc = get_tokenizer()
        shard_blocks = max(1, int(shard_mb * 2**20) // ((block_tokens + 1) * TOKEN_DTYPE.itemsize))
        writers = {s: SplitWriter(tmp, s, block_tokens, shard_blocks) for s in ("train", "val")}
        start, n_bytes, n_tokens = time.perf_counter(), 0, 0
        with tqdm(desc=f"tokenizing {source}", unit=" docs", disable=not progress, mininterval=1.0) as bar:
            for batch in _batches(documents, BATCH_DOCUMENTS):
                for text, ids in zip(batch, enc.encode_ordinary_batch(batch, num_threads=os.cpu_count() or 1)):
                    ids.append(EOT)
                    writers["val" if is_validation(text, val_fraction) else "train"].add_document(ids)
                    n_bytes += len(text.encode("utf-8", "surrogatepass"))
                    n_tokens += len(ids)
                secs = max(time.perf_counter() - start, 1e-9)
                bar.update(len(batch))
                bar.set_postfix_str(f"{n_tokens:,} tokens, {n_bytes / secs / 2**20:.1f} MB/s")
        splits = {s: w.close() for s, w in writers.items()}
        if splits["train"]["blocks"] == 0:
            raise ValueError(
                f"{source}: {n_tokens:,} tokens are not enough for one training block of {block_tokens + 1} tokens"
            )
        manifest = {
            "format": FORMAT,
            "source": source,
            "tokenizer": "gpt2",
            "vocab_size": enc.n_vocab,
            "eot_token": EOT,
            "dtype": TOKEN_DTYPE.str,
            "block_tokens": block_tokens,
            "val_fraction": val_fraction,
            "input_bytes": n_bytes,
            "input_tokens": n_tokens,
            "splits": splits,
        }
        write_manifest(tmp, manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)  # only reached with overwrite=True; the new corpus is complete
        os.replace(tmp, out_dir)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
