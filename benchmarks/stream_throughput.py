"""Stream mode's loader, measured (docs/data.md "Data from anywhere"; numbers in BENCHMARKS.md):

1. latency: tokens/s from a web server 10 ms away, stream mode against random access over the
   same server (one HTTP range request per window), alternating, in one run; random access from
   local disk beside them. The 10 ms are `tc netem` delay on a veth pair into a network namespace
   where the kernel has netem, else a wait in the server before each answer (said in the output).
2. per core: tokens/s per CPU-second of the loader process (all its threads) from a local server.
3. memory: peak resident memory of a process streaming one epoch of a corpus, for two corpus
   sizes, against the bound: a decoded shard per lane (the shuffle window) and one more being
   decoded; the cache, on disk, held to its budget.
4. resume: seconds to the first micro-batch of a resume, cold cache, at growing sample counts, in
   a corpus of 100,000 shards (hard links to the small one's) and in the small one (read thousands of times).

Each loader is 1 process, no DataLoader workers; the servers are other processes.

    nice -n -5 python benchmarks/stream_throughput.py [--rounds 5] [--out results.json]
"""

import argparse
import functools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from itertools import islice
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine  # noqa: E402
from gpt2dist.data.builtin_corpus import documents  # noqa: E402
from gpt2dist.data.loader import SampleStream, Windows, train_loader, train_windows  # noqa: E402
from gpt2dist.data.prepare import prepare_corpus  # noqa: E402
from gpt2dist.data.shards import MANIFEST, SplitWriter, TokenBlocks, read_manifest, shard_offsets, write_manifest  # noqa: E402
from gpt2dist.data.stream import Rounds, ShardStore, stream_loader  # noqa: E402

SEQ, MICRO, LANES, BLOCK = 1024, 8, 8, 2048
MB = 2**20


class Server:
    """benchmarks/slow_server.py as a process (in a network namespace, if given): `url`, `stop()`."""

    def __init__(self, directory: Path, latency_ms: float = 0, host: str = "127.0.0.1", netns: str | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.proc = subprocess.Popen([*prefix, sys.executable, str(Path(__file__).with_name("slow_server.py")),
                                      str(directory), host, str(port), str(latency_ms)])
        self.url = f"http://{host}:{port}/"
        for _ in range(1200):  # a minute: the machine may be busy
            try:
                urllib.request.urlopen(self.url + MANIFEST, timeout=5).read()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the server at {self.url} did not start")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class DelayedNamespace:
    """A network namespace joined by a veth pair whose both ends delay packets by `ms` (netem):
    a round trip of 2 x ms. `ok` is False (and nothing is left behind) where the kernel has no netem."""

    def __init__(self, ms: float):
        n = os.getpid() % 2**14
        self.name, self.outer, inner = f"gpt2dist-bench-{os.getpid()}", f"g2b{n}o", f"g2b{n}i"
        self.address = f"10.124.{n >> 6}.{(n & 63) * 4 + 2}"
        run = functools.partial(subprocess.run, capture_output=True)
        self.ok = run(["ip", "netns", "add", self.name]).returncode == 0
        steps = [["ip", "link", "add", self.outer, "type", "veth", "peer", "name", inner, "netns", self.name],
                 ["ip", "addr", "add", f"10.124.{n >> 6}.{(n & 63) * 4 + 1}/30", "dev", self.outer],
                 ["ip", "link", "set", self.outer, "up"],
                 ["ip", "-n", self.name, "addr", "add", f"{self.address}/30", "dev", inner],
                 ["ip", "-n", self.name, "link", "set", inner, "up"],
                 ["tc", "qdisc", "add", "dev", self.outer, "root", "netem", "delay", f"{ms / 2}ms"],
                 ["ip", "netns", "exec", self.name, "tc", "qdisc", "add", "dev", inner, "root", "netem", "delay",
                  f"{ms / 2}ms"]]
        for step in steps:
            self.ok = self.ok and run(step).returncode == 0
        if not self.ok:
            self.close()

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def grown(base: Path, out: Path, copies: int, shard_mb: float) -> Path:
    """A corpus whose train split is `base`'s tokens `copies` times over, in shards of `shard_mb`."""
    out.mkdir(parents=True)
    manifest = read_manifest(base)
    blocks = TokenBlocks(base, "train")
    tokens = np.concatenate([blocks.read(i, 0, BLOCK + 1)[:-1] for i in range(len(blocks))])
    writer = SplitWriter(out, "train", BLOCK, max(1, int(shard_mb * MB) // ((BLOCK + 1) * 2)))
    for _ in range(copies):
        writer.add(tokens, 1)
    manifest["splits"] = {"train": writer.close(), "val": {**manifest["splits"]["val"], "shards": []}}
    write_manifest(out, manifest)
    return out


def stream_batches(url: str, cache: Path, start: int = 0, seed: int = 0, budget_mb: float = 10_000):
    """The stream loader from `url` with a fresh cache."""
    store = ShardStore(url, cache, budget_bytes=int(budget_mb * MB))
    manifest = read_manifest(store.local_corpus(splits=()))
    return stream_loader([(store, manifest)], Rounds([1.0], seed, LANES, MICRO), SEQ, 0, 1, start, 0, prefetch=2)


def random_over_http(url: str, corpus: Path, seed: int):
    """Random access through the web server: one range request per window (a full shuffle)."""
    blocks = TokenBlocks(corpus, "train")
    windows = Windows(blocks, SEQ)
    offsets = [shard_offsets(corpus / s["file"], s["blocks"], BLOCK) for s in blocks.shards]
    for i in np.random.default_rng(seed).permutation(len(windows)):
        block, w = divmod(int(i), windows.per_block)
        shard = int(np.searchsorted(blocks.starts, block, side="right")) - 1
        first = offsets[shard][block - blocks.starts[shard]] + w * SEQ * 2
        request = urllib.request.Request(url + blocks.shards[shard]["file"],
                                         headers={"Range": f"bytes={first}-{first + (SEQ + 1) * 2 - 1}"})
        yield np.frombuffer(urllib.request.urlopen(request).read(), dtype=np.uint16)


def rate(batches, n: int, tokens_each: int) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process) over the next n items."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in islice(batches, n):
        pass
    return n * tokens_each / (time.perf_counter() - wall), n * tokens_each / (time.process_time() - cpu)


def spread(values: list[float], scale: float = 1e6) -> str:
    return f"{statistics.median(values) / scale:.3g} ({min(values) / scale:.3g}-{max(values) / scale:.3g})"


def latency(corpus: Path, tmp: Path, rounds: int, ms: float) -> dict:
    namespace = DelayedNamespace(ms)
    how = (f"netem, {ms / 2:g} ms each way on a veth pair into a namespace" if namespace.ok else
           f"this kernel has no netem: the server waits {ms:g} ms before each answer")
    server = Server(corpus, 0 if namespace.ok else ms, namespace.address if namespace.ok else "127.0.0.1",
                    namespace.name if namespace.ok else None)
    windows = train_windows(corpus, SEQ, 1.0)
    out = {"how": how, "stream": [], "random over HTTP": [], "random, local disk": []}
    try:
        for r in range(rounds):
            out["stream"].append(rate(stream_batches(server.url, tmp / f"lat{r}", seed=r), 100, MICRO * SEQ)[0])
            out["random over HTTP"].append(rate(random_over_http(server.url, corpus, r), 50, SEQ)[0])
            local = train_loader([windows], SampleStream([len(windows)], [1.0], r), MICRO, 0, 1, 0, 0)
            out["random, local disk"].append(rate(local, 100, MICRO * SEQ)[0])
    finally:
        server.stop()
        namespace.close()
    out["ratio stream / random over HTTP, per round"] = [s / h for s, h in zip(out["stream"], out["random over HTTP"])]
    return out


def per_core(corpus: Path, tmp: Path, rounds: int) -> dict:
    server = Server(corpus)
    out = {"tokens/s": [], "tokens per CPU-second": []}
    try:
        for r in range(rounds):
            wall, cpu = rate(stream_batches(server.url, tmp / f"core{r}", seed=r), 400, MICRO * SEQ)
            out["tokens/s"].append(wall)
            out["tokens per CPU-second"].append(cpu)
    finally:
        server.stop()
    return out


def epoch_memory(url: str, cache: str, budget_mb: float, micro_batches: int) -> None:
    """Stream one epoch (this script with --memory); print resident memory before and at peak, MiB."""
    def status(key: str) -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
        return int(line.split()[1]) / 1024

    batches = iter(stream_batches(url, Path(cache), budget_mb=budget_mb))
    next(batches)
    before = status("VmRSS")
    for _ in islice(batches, micro_batches - 1):
        pass
    cached = sum(p.stat().st_size for p in Path(cache).glob("stream/*/shards/*.tar")) / MB
    print(json.dumps({"rss_after_first_batch_mib": before, "peak_rss_mib": status("VmHWM"), "cache_mib": cached}))


def memory(base: Path, tmp: Path, shard_mb: float, budget_mb: float, sizes: tuple[int, ...]) -> dict:
    out = {}
    for copies in sizes:
        corpus = grown(base, tmp / f"mem{copies}", copies, shard_mb)
        manifest = read_manifest(corpus)["splits"]["train"]
        server = Server(corpus)
        try:
            result = subprocess.run([sys.executable, __file__, "--memory", server.url, str(tmp / f"memcache{copies}"),
                                     str(budget_mb), str(manifest["tokens"] // (MICRO * SEQ))],
                                    capture_output=True, text=True, check=True)
        finally:
            server.stop()
        out[f"{manifest['tokens'] * 2 / MB:.0f} MiB corpus"] = {
            **json.loads(result.stdout), "shards": len(manifest["shards"]),
            "bound_mib": (LANES + 1) * max(s["bytes"] for s in manifest["shards"]) / MB}
        shutil.rmtree(corpus)
    return out


def linked(corpus: Path, out: Path, shards: int) -> Path:
    """A corpus of `shards` training shards, hard links to `corpus`'s in turn: a large corpus for
    what a resume reads (the manifest, then one shard per lane), on little disk."""
    out.mkdir()
    manifest = read_manifest(corpus)
    own = manifest["splits"]["train"]["shards"]
    listed = []
    for i in range(shards):
        shard = own[i % len(own)]
        os.link(corpus / shard["file"], out / f"train-{i:06d}.tar")
        listed.append({**shard, "file": f"train-{i:06d}.tar"})
    manifest["splits"] = {"train": {**manifest["splits"]["train"], "shards": listed},
                          "val": {**manifest["splits"]["val"], "shards": []}}
    write_manifest(out, manifest)
    return out


def resume(corpus: Path, tmp: Path, rounds: int, starts: tuple[int, ...]) -> dict:
    """Seconds from making the loader (the manifest already read) to its first micro-batch, cold cache."""
    server = Server(corpus)
    manifest = read_manifest(ShardStore(server.url, tmp / "manifest").local_corpus(splits=()))
    out = {f"{s:.0e} samples": [] for s in starts}
    try:
        for r in range(rounds):
            for s in starts:
                store = ShardStore(server.url, tmp / f"resume{r}-{s}")
                t = time.perf_counter()
                next(iter(stream_loader([(store, manifest)], Rounds([1.0], r, LANES, MICRO), SEQ, 0, 1, s, 0, 2)))
                out[f"{s:.0e} samples"].append(time.perf_counter() - t)
    finally:
        server.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=10)
    parser.add_argument("--out", type=Path, default=None, help="also write the results here (JSON)")
    parser.add_argument("--memory", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        url, cache, budget, n = args.memory
        return epoch_memory(url, cache, float(budget), int(n))
    tmp = Path(tempfile.mkdtemp())
    try:
        base = tmp / "pydoc"
        prepare_corpus(documents("pydoc"), base, source="pydoc", val_fraction=0.01, block_tokens=BLOCK,
                       progress=False)
        corpus = grown(base, tmp / "corpus", 32, shard_mb=1)
        results = {"machine": machine(), "seq_len": SEQ, "micro_batch": MICRO, "lanes": LANES,
                   "corpus_tokens": read_manifest(corpus)["splits"]["train"]["tokens"],
                   "latency": latency(corpus, tmp, args.rounds, args.latency_ms),
                   "per_core": per_core(corpus, tmp, args.rounds),
                   "resume_s, 100k-shard corpus": resume(linked(corpus, tmp / "linked", 100_000), tmp, args.rounds,
                                                         (0, 10**4, 10**6, 10**8)),
                   "resume_s, the 9-shard corpus": resume(corpus, tmp, args.rounds, (0, 10**4, 10**6, 10**8)),
                   "memory": memory(base, tmp, shard_mb=4, budget_mb=32, sizes=(64, 256))}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


def report(results: dict) -> None:
    print(f"{results['machine']}; {results['corpus_tokens']:,} tokens; micro-batches of {MICRO} x {SEQ}, "
          f"{LANES} lanes; medians (min-max)")
    lat = results["latency"]
    print(f"latency: {lat['how']}")
    for key in ("stream", "random over HTTP", "random, local disk"):
        print(f"  {key:22s} {spread(lat[key])} M tokens/s")
    print(f"  stream / random over HTTP: {spread(lat['ratio stream / random over HTTP, per round'], 1)}x")
    core = results["per_core"]
    print(f"local server: {spread(core['tokens/s'])} M tokens/s, "
          f"{spread(core['tokens per CPU-second'])} M tokens per CPU-second")
    for corpus in ("100k-shard corpus", "the 9-shard corpus"):
        for key, values in results[f"resume_s, {corpus}"].items():
            print(f"resume at {key}, {corpus}: {spread(values, 1)} s to the first micro-batch")
    for key, m in results["memory"].items():
        print(f"memory, {key} ({m['shards']} shards): peak RSS {m['peak_rss_mib']:.0f} MiB, "
              f"{m['peak_rss_mib'] - m['rss_after_first_batch_mib']:.0f} MiB above the first batch's; "
              f"bound ((lanes + 1) x shard) {m['bound_mib']:.0f} MiB; cache at the end {m['cache_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
