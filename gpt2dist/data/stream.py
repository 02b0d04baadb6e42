"""Streaming mode (`data.mode=stream`): whole shards read in order through webdataset, from a local
directory or over the network, with the random-access mode's promises: the same batches on resume,
and a stream that does not depend on the number of ranks.

Where. A corpus location is a local directory, an `http(s)://` URL, an `s3://` URL (through
fsspec's s3fs) or a `pipe:` command with `{file}` where the file name goes (`pipe:ssh host cat
/data/owt/{file}`); the manifest is read from the same place. A directory or URL may end in a brace
pattern of training shards, webdataset's convention (`https://host/owt/train-{000000..000099}.tar`):
those shards are trained on, the manifest and validation split read from their directory. Remote
shards are downloaded whole into a local cache with a size budget (least recently used shards
evicted first), cut off at the size the manifest declares (so that a server cannot fill the disk),
checked against the manifest's SHA-256, fetched ahead in the background, and retried with backoff;
a shard that stays unreachable or corrupt raises `ShardUnavailable`, naming its URL. Nothing is
written outside the cache directory: the manifest is checked before any shard is fetched, and
only shard names (`gpt2dist.data.shards.shard_path`) are joined to the cache or put in a command.

Order. Each source's training stream is cut into `lanes` (data.stream.lanes) sequential streams:
- the shard slots of epoch e are a seeded permutation of all shards; slot g of the endless
  sequence (epoch g // n, position g % n) goes to lane g % lanes;
- a lane reads its shards one after another, the windows of each in a seeded permutation of that
  shard (the shuffle window is one shard; a micro-batch mixes nothing across lanes);
- the global micro-batches come in rounds of `lanes`, one from each lane, and each round from one
  source: the random-access mode's mixture schedule (`SampleStream`), drawn by round, not by sample.
  Global micro-batch c (round r = c // lanes) is the next micro-batch of lane c % lanes of round r's
  source, and goes to rank c % world_size, as in the random-access mode.
None of this depends on the number of ranks or workers, so an elastic restart continues the same
stream; the position of every lane follows from the number of samples consumed alone, so a resume
skips whole shards by their sizes in the manifest and reads at most one shard per lane to get back.
"""

import hashlib
import os
import re
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tar_file_iterator

from gpt2dist import outputs
from gpt2dist.data.loader import MIX_PERIOD, Permutation, SampleStream
from gpt2dist.data.shards import MANIFEST, MAX_MANIFEST_BYTES, TOKEN_DTYPE, CorpusError, read_manifest, shard_path

REMOTE = ("http://", "https://", "s3://", "pipe:")
STREAM_KEY = 0x5354  # keeps the shard permutations apart from the random-access mode's
DOWNLOAD_CHUNK = 1 << 20
BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")  # {000000..000099} or {a,b}


class ShardUnavailable(CorpusError):
    """A shard (or manifest) that stayed unreachable or corrupt after every retry (names its URL)."""


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(REMOTE)


def split_pattern(location: str) -> tuple[str, list[str] | None]:
    """(the corpus location, the training shard files a brace pattern at its end names, or None)."""
    head, _, name = location.rpartition("/")
    if location.startswith("pipe:") or not head or not BRACES.search(name):
        return location, None
    return head + "/", list(braceexpand(name))


def streams_only(location: str) -> bool:
    """Whether only stream mode reads this location (a URL, a command or a brace pattern)."""
    return is_remote(location) or split_pattern(location)[1] is not None


def file_url(location: str, file: str) -> str:
    """Where `file` of the corpus at `location` is."""
    if location.startswith("pipe:"):
        return location.replace("{file}", file)
    return f"{location.rstrip('/')}/{file}"


def open_url(url: str, timeout: float = 30):
    """A readable binary stream of a URL (http(s)://, s3:// or pipe:)."""
    if url.startswith("pipe:"):
        return _Pipe(url.removeprefix("pipe:"))
    if url.startswith("s3://"):
        import fsspec  # s3fs behind it, which reads AWS_ENDPOINT_URL and the usual credentials

        try:
            return fsspec.open(url, "rb").open()
        except ImportError:  # no use retrying
            raise ShardUnavailable(f"{url}: reading s3:// needs s3fs (pip install s3fs)") from None
        except OSError:
            raise
        except Exception as e:  # botocore's own (no credentials, a bad endpoint), retried as network errors
            raise OSError(f"{type(e).__name__}: {e}") from e
    return urllib.request.urlopen(url, timeout=timeout)


class _Pipe:
    """A shell command's standard output; a non-zero exit status is an error at the end of the data."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        if not data and self.proc.wait() != 0:
            raise OSError(f"exit status {self.proc.returncode}: {self.proc.stderr.read().decode().strip()[-200:]}")
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.stdout.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()


def _older_cache(directory: Path) -> bool:
    """A stream cache an older gpt2dist made, before markers: a manifest or a shards/ directory of its own."""
    return (directory / MANIFEST).is_file() or (directory / "shards").is_dir()


class ShardStore:
    """The files of a corpus at a location, as local files: a local directory's own, or copies in a
    cache directory (`<cache_dir>/stream/<hash of the location>`) fetched on demand.

    The manifest and the validation split are kept in the cache directory itself (a corpus that
    `TokenBlocks` reads like any local one); streamed training shards go to its `shards/`, which
    is kept under `budget_bytes` by evicting the least recently used.
    """

    def __init__(self, location: str | Path, cache_dir: str | Path, budget_bytes: int = 10 * 2**30,
                 retries: int = 5, backoff_s: float = 0.5):
        self.location, self.pattern = split_pattern(str(location))
        self.remote = is_remote(self.location)
        self.budget, self.retries, self.backoff = budget_bytes, retries, backoff_s
        key = hashlib.sha256(self.location.encode()).hexdigest()[:16]
        self.dir = Path(cache_dir).expanduser() / "stream" / key if self.remote else Path(self.location).expanduser()
        self.shard_dir = self.dir / "shards" if self.remote else self.dir
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self):
        # Each worker process has its own prefetch threads.
        return {**self.__dict__, "_pending": {}, "_lock": None, "_pool": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def local_corpus(self, splits: tuple[str, ...] = ("val",)) -> Path:
        """A local directory with the manifest and the given splits' shards (fetched once, verified)."""
        if not self.remote:
            return self.dir
        self._claim()
        self._download(MANIFEST, self.dir / MANIFEST)
        manifest = read_manifest(self.dir, source=file_url(self.location, MANIFEST))
        for split in splits:
            for shard in manifest["splits"].get(split, {}).get("shards", []):
                dest = shard_path(self.dir, shard["file"])
                if not (dest.is_file() and dest.stat().st_size == shard["bytes"]):
                    self._download(shard["file"], dest, shard)
        return self.dir

    def train_shards(self, manifest: dict) -> list[dict]:
        """The manifest's training shards, or those the location's brace pattern names, in its order; each
        must fit the cache's budget."""
        shards = manifest["splits"]["train"]["shards"]
        if self.pattern is not None:
            listed = {s["file"]: s for s in shards}
            for file in self.pattern:
                if file not in listed:
                    raise CorpusError(f"{file_url(self.location, file)}: not a training shard of "
                                      f"{file_url(self.location, MANIFEST)}")
            shards = [listed[file] for file in self.pattern]
        for shard in shards:
            if self.remote and shard["bytes"] > self.budget:
                raise CorpusError(f"{file_url(self.location, shard['file'])}: {shard['bytes']:,} bytes, more than the "
                                  f"cache holds ({self.budget:,} bytes, data.stream.cache_gb)")
        return shards

    def prefetch(self, shard: dict) -> None:
        """Start fetching a shard in the background (remote locations only)."""
        if not self.remote:
            return
        with self._lock:
            if shard["file"] in self._pending:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-prefetch")
            self._pending[shard["file"]] = self._pool.submit(self._fetch, shard)

    def open(self, shard: dict):
        """An open binary file of the shard (fetched first if remote); waits for its prefetch."""
        if not self.remote:
            return open(shard_path(self.dir, shard["file"]), "rb")
        self.prefetch(shard)
        with self._lock:
            future = self._pending.pop(shard["file"])
        path = future.result()
        try:
            return open(path, "rb")  # open, an eviction by another process no longer matters
        except FileNotFoundError:
            return open(self._fetch(shard), "rb")

    def _fetch(self, shard: dict) -> Path:
        dest = shard_path(self.shard_dir, shard["file"])
        try:
            os.utime(dest)  # most recently used
            if dest.stat().st_size == shard["bytes"]:
                return dest
        except FileNotFoundError:
            pass
        self._claim()
        self.shard_dir.mkdir(exist_ok=True)
        self._download(shard["file"], dest, shard)
        self._evict(keep=dest)
        return dest

    def _claim(self) -> None:
        """Create and mark the cache directory (gpt2dist.outputs); one not empty and not ours is refused."""
        outputs.claim(self.dir, "stream-cache", _older_cache, what=f"{self.dir} (the stream cache of {self.location})")

    def _download(self, file: str, dest: Path, shard: dict | None = None) -> None:
        """Copy `file` to `dest` (atomically), retrying with backoff: a shard of the manifest, which must be its
        size and SHA-256, or else the manifest, at most MAX_MANIFEST_BYTES. A source that sends more is cut
        off there, so that no server can fill the disk."""
        url = file_url(self.location, file)
        limit = MAX_MANIFEST_BYTES if shard is None else shard["bytes"]
        for attempt in range(self.retries + 1):
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
            try:
                digest, got = hashlib.sha256(), 0
                with os.fdopen(fd, "wb") as out, open_url(url) as src:
                    while chunk := src.read(min(DOWNLOAD_CHUNK, limit + 1 - got)):  # one byte past the limit at most
                        got += len(chunk)
                        if got > limit:
                            raise OSError(f"sent more than the {limit:,} bytes " + (
                                "a manifest may hold" if shard is None else "the manifest declares"))
                        digest.update(chunk)
                        out.write(chunk)
                if shard is not None and got != limit:
                    raise OSError(f"sent {got:,} bytes, but the manifest declares {limit:,}")
                if shard is not None and digest.hexdigest() != shard["sha256"]:
                    raise OSError(f"SHA-256 {digest.hexdigest()[:12]}..., but the manifest says "
                                  f"{shard['sha256'][:12]}... (corrupt or replaced)")
                os.replace(tmp, dest)
                return
            except (OSError, urllib.error.URLError, ValueError) as e:  # fsspec/botocore errors are OSErrors
                error = e
            finally:
                Path(tmp).unlink(missing_ok=True)
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise ShardUnavailable(f"{url}: {_reason(error)} (after {self.retries + 1} tries)")

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used shards until the cache is within its budget."""
        files = []
        for path in self.shard_dir.glob("*.tar"):
            try:
                files.append((path.stat().st_mtime, path.stat().st_size, path))
            except FileNotFoundError:  # evicted by another process meanwhile
                pass
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.budget:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


class ShardPlan:
    """Which shard each lane reads, slot after slot, and the order of windows within it."""

    def __init__(self, shards: list[dict], per_block: int, lanes: int, seed: int, source: int = 0):
        self.shards, self.per_block, self.lanes = shards, per_block, lanes
        self.key = (seed, STREAM_KEY, source)  # each source of a mixture its own permutations
        self.sizes = np.array([s["blocks"] for s in shards], dtype=np.int64) * per_block  # windows of each shard
        self._epoch: tuple[int, Permutation] | None = None

    def _permutation(self, epoch: int) -> Permutation:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = epoch, Permutation(len(self.shards), (*self.key, epoch))
        return self._epoch[1]

    def slot(self, lane: int, j: int) -> tuple[int, int]:
        """(epoch, shard) of lane `lane`'s j-th shard."""
        epoch, i = divmod(lane + j * self.lanes, len(self.shards))
        return epoch, int(self._permutation(epoch)(np.array([i]))[0])

    def windows(self, shard: int) -> int:
        return int(self.sizes[shard])

    def seek(self, lane: int, position: int) -> tuple[int, int]:
        """(slot j, window within it) of sample `position` of a lane: whole shards skipped by their
        sizes in the manifest, all of the lane's slots of an epoch at once."""
        n, j = len(self.shards), 0
        while True:
            epoch = (lane + j * self.lanes) // n
            end = -(-((epoch + 1) * n - lane) // self.lanes)  # the lane's first slot in the next epoch
            slots = np.arange(j, end)
            ends = np.cumsum(self.sizes[self._permutation(epoch)(lane + slots * self.lanes - epoch * n)])
            k = int(np.searchsorted(ends, position, side="right"))  # the slot that holds the sample
            if k < len(slots):
                return j + k, position - (int(ends[k - 1]) if k else 0)
            position, j = position - int(ends[-1]), end

    def order(self, epoch: int, shard: int) -> np.ndarray:
        """The seeded order in which a lane reads the windows of a shard in an epoch."""
        return Permutation(self.windows(shard), (*self.key, epoch, shard))(np.arange(self.windows(shard)))


class Lane:
    """One lane's windows, in order, from a given sample position on."""

    def __init__(self, lane: int, position: int, plan: ShardPlan, store: ShardStore, manifest: dict,
                 seq_len: int, prefetch: int):
        self.lane, self.plan, self.store, self.manifest = lane, plan, store, manifest
        self.seq_len, self.prefetch = seq_len, prefetch
        self.j, self.next = plan.seek(lane, position)
        self._load()

    def _load(self) -> None:
        epoch, shard = self.plan.slot(self.lane, self.j)
        for ahead in range(1, self.prefetch + 1):
            self.store.prefetch(self.plan.shards[self.plan.slot(self.lane, self.j + ahead)[1]])
        self.blocks = self._read(self.plan.shards[shard])
        self.order = self.plan.order(epoch, shard)

    def _read(self, shard: dict) -> np.ndarray:
        """(blocks, block_tokens + 1) tokens of a shard, read sequentially through webdataset."""
        L = self.manifest["block_tokens"]
        with self.store.open(shard) as f:
            try:
                data = [np.frombuffer(s["data"], dtype=TOKEN_DTYPE) for s in tar_file_iterator(f)]
            except Exception as e:  # tarfile's and webdataset's errors on a damaged tar
                raise CorpusError(f"{file_url(self.store.location, shard['file'])}: unreadable shard ({e})") from None
        if len(data) != shard["blocks"] or any(len(d) != L + 1 for d in data):
            raise CorpusError(f"{file_url(self.store.location, shard['file'])}: {len(data)} members, but the manifest "
                              f"lists {shard['blocks']} blocks of {L + 1} tokens (truncated or replaced?)")
        blocks = np.stack(data) if data else np.empty((0, L + 1), dtype=TOKEN_DTYPE)
        if blocks.max(initial=0) >= self.manifest["vocab_size"]:
            raise CorpusError(f"{file_url(self.store.location, shard['file'])}: token ids beyond the vocabulary")
        return blocks

    def take(self, n: int) -> np.ndarray:
        """The next n windows, (n, seq_len + 1)."""
        out = []
        while len(out) < n:
            if self.next == len(self.order):
                self.j, self.next = self.j + 1, 0
                self._load()
                continue
            block, w = divmod(int(self.order[self.next]), self.plan.per_block)
            out.append(self.blocks[block, w * self.seq_len: (w + 1) * self.seq_len + 1])
            self.next += 1
        return np.stack(out)


class Rounds:
    """Which source each round of `lanes` global micro-batches (one from each lane) reads: the
    random-access mode's mixture schedule, drawn by round, so that a lane's micro-batches stay in
    one worker (see StreamBatches.__iter__); the weights are exact over every MIX_PERIOD rounds."""

    def __init__(self, weights: list[float], seed: int, lanes: int, micro_batch: int):
        self.mix = SampleStream([1] * len(weights), weights, seed)
        self.lanes, self.micro = lanes, micro_batch

    def locate(self, c: int) -> tuple[int, int, int]:
        """(source, lane, micro-batch number within that lane) of global micro-batch c."""
        r, lane = divmod(c, self.lanes)
        source = int(self.mix.schedule[r % MIX_PERIOD])
        return source, lane, self.mix.drawn(r)[source]

    def drawn(self, q: int) -> list[int]:
        """Samples each source contributes to stream positions [0, q)."""
        r, rest = divmod(q, self.lanes * self.micro)
        drawn = [n * self.lanes * self.micro for n in self.mix.drawn(r)]
        drawn[int(self.mix.schedule[r % MIX_PERIOD])] += rest
        return drawn


class StreamSource:
    """One corpus of the stream: where its shards are, its manifest, and its shard plan."""

    def __init__(self, store: ShardStore, manifest: dict, seq_len: int, lanes: int, seed: int, index: int):
        self.store, self.manifest = store, manifest
        self.plan = ShardPlan(store.train_shards(manifest), manifest["block_tokens"] // seq_len, lanes, seed, index)


class StreamBatches(IterableDataset):
    """This rank's micro-batches of the stream, from global micro-batch `first` on (see the module
    docstring); DataLoader workers take turns, as the DataLoader collects them."""

    def __init__(self, sources: list[StreamSource], rounds: Rounds, seq_len: int, micro_batch: int, rank: int,
                 world_size: int, first: int, prefetch: int):
        self.sources, self.rounds, self.seq_len, self.micro, self.prefetch = sources, rounds, seq_len, micro_batch, prefetch
        self.rank, self.world, self.first = rank, world_size, first

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        lanes: dict[tuple[int, int], Lane] = {}
        c = self.first + self.rank + worker * self.world
        while True:
            s, k, index = self.rounds.locate(c)
            if (s, k) not in lanes:  # a lane starts at its first micro-batch that this worker serves
                source = self.sources[s]
                lanes[s, k] = Lane(k, index * self.micro, source.plan, source.store, source.manifest, self.seq_len,
                                   self.prefetch)
            tokens = torch.from_numpy(lanes[s, k].take(self.micro).astype(np.int64))  # (B, T + 1)
            yield tokens[:, :-1], tokens[:, 1:]
            c += self.world * workers


def stream_loader(sources: list[tuple[ShardStore, dict]], rounds: Rounds, seq_len: int, rank: int, world_size: int,
                  start: int, num_workers: int, prefetch: int) -> DataLoader:
    """Endless micro-batches for this rank in stream mode from the sources (store and manifest each)
    mixed by `rounds`, starting `start` samples into the stream."""
    lanes, micro, seed = rounds.lanes, rounds.micro, rounds.mix.seed
    assert start % micro == 0, "the stream is resumed at a micro-batch boundary"
    # Each worker then serves whole lanes, each lane in order (see StreamBatches.__iter__).
    assert lanes % (world_size * max(1, num_workers)) == 0, "checked by config.check"
    streams = [StreamSource(store, manifest, seq_len, lanes, seed, i) for i, (store, manifest) in enumerate(sources)]
    for source, share in zip(streams, rounds.mix.per_period):
        if share > 0 and not source.plan.shards:
            raise CorpusError(f"{file_url(source.store.location, MANIFEST)}: the train split is empty")
    batches = StreamBatches(streams, rounds, seq_len, micro, rank, world_size, start // micro, prefetch)
    return DataLoader(batches, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))


def error_line(e: ShardUnavailable) -> str:
    """The error's own message, also when a DataLoader worker raised it (the DataLoader then re-raises
    it with the worker's whole traceback as its message, the original message on the last line)."""
    last = str(e).rstrip().splitlines()[-1]
    prefix = f"{ShardUnavailable.__module__}.{ShardUnavailable.__name__}: "
    return last.removeprefix(prefix)
