"""Loader tokens/s of stream mode from an HTTP server on 127.0.0.1 that answers each request 10 ms
late (a stand-in for network latency), against the random-access mode on the same corpus on local
disk, alternating, in one run. Random access over that server would need one request per window:
its bound, seq_len tokens per 10 ms, is printed beside the measurements.

    python benchmarks/stream_throughput.py [--latency-ms 10] [--rounds 3]
"""

import argparse
import functools
import http.server
import statistics
import tempfile
import threading
import time
from itertools import islice
from pathlib import Path

from gpt2dist.data.builtin_corpus import documents
from gpt2dist.data.loader import SampleStream, train_loader, train_windows
from gpt2dist.data.prepare import prepare_corpus
from gpt2dist.data.shards import read_manifest
from gpt2dist.data.stream import Rounds, ShardStore, stream_loader

SEQ, MICRO, BATCHES = 256, 8, 400


class SlowHandler(http.server.SimpleHTTPRequestHandler):
    latency_s = 0.01

    def handle_one_request(self):
        time.sleep(self.latency_s)
        super().handle_one_request()

    def log_message(self, *args):
        pass


def tokens_per_s(loader) -> float:
    t0 = time.perf_counter()
    n = sum(x.numel() for x, _ in islice(loader, BATCHES))
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    corpus = tmp / "corpus"
    prepare_corpus(documents("pydoc"), corpus, source="pydoc", val_fraction=0.01, block_tokens=2048, shard_mb=0.02,
                   progress=False)
    manifest = read_manifest(corpus)
    SlowHandler.latency_s = args.latency_ms / 1000
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SlowHandler, directory=str(corpus)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    windows = train_windows(corpus, SEQ, 1.0)
    results = {"random (local disk)": [], f"stream (HTTP, +{args.latency_ms:g} ms)": []}
    for r in range(args.rounds):
        random_loader = train_loader([windows], SampleStream([len(windows)], [1.0], r), MICRO, 0, 1, 0, 0)
        results["random (local disk)"].append(tokens_per_s(random_loader))
        store = ShardStore(url, tmp / f"cache{r}")  # a cold cache each round: every shard comes over HTTP
        store.local_corpus(splits=())
        results[f"stream (HTTP, +{args.latency_ms:g} ms)"].append(
            tokens_per_s(stream_loader([(store, manifest)], Rounds([1.0], r, 8, MICRO), SEQ, 0, 1, 0, 0, prefetch=2)))
    print(f"corpus: {manifest['splits']['train']['tokens']:,} tokens in {len(manifest['splits']['train']['shards'])} "
          f"shards; {BATCHES} micro-batches of {MICRO} x {SEQ} tokens; 1 process, no workers")
    for name, values in results.items():
        print(f"{name:28s} median {statistics.median(values) / 1e6:6.2f} M tokens/s "
              f"(min {min(values) / 1e6:.2f}, max {max(values) / 1e6:.2f})")
    print(f"random access over that HTTP (one request per window), bound: {SEQ / (args.latency_ms / 1000) / 1e6:.3f} "
          "M tokens/s")
    httpd.shutdown()


if __name__ == "__main__":
    main()
