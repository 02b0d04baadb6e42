"""Stream mode (gpt2dist/data/stream.py) from a real web server on 127.0.0.1: the stream does not
depend on the number of ranks or workers, resumes exactly (loader and trainer), an elastic restart
repeats and skips nothing, the cache stays within its budget, and a corrupt shard stops the run
naming its URL, after a checkpoint, with exit status 2."""

import functools
import re
import hashlib
import http.server
import shutil
import threading
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from gpt2dist.data.builtin_corpus import documents
from gpt2dist.data.loader import Windows
from gpt2dist.data.prepare import prepare_corpus
from gpt2dist.data.shards import TokenBlocks, read_manifest
from gpt2dist.data.stream import Rounds, ShardPlan, ShardStore, ShardUnavailable, stream_loader
from gpt2dist.training.checkpoint import latest_tag
from tests.test_data_stream import rewind
from tests.conftest import TINY, read_metrics, run_train, train_cfg

SEQ, MICRO, LANES = 32, 2, 4


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """A small corpus in one-block shards (8 windows of 32 tokens each): many shards, cheaply."""
    out = tmp_path_factory.mktemp("data") / "stream"
    docs = [d for _, d in zip(range(40), documents("pydoc"))]
    prepare_corpus(docs, out, source="pydoc", val_fraction=0.1, block_tokens=256, shard_mb=0.0001, progress=False)
    return out


@pytest.fixture
def server(small_shards, tmp_path):
    """A copy of the corpus served over HTTP on 127.0.0.1: (its URL, its directory)."""
    root = tmp_path / "served"
    shutil.copytree(small_shards, root)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def micro_batches(url: str, cache: Path, rank: int, world: int, start: int, n: int, workers: int = 0) -> list:
    """This rank's first n micro-batches (token arrays) from sample `start` on, with a fresh cache."""
    store = ShardStore(url, cache, retries=0)
    manifest = read_manifest(store.local_corpus())
    loader = stream_loader([(store, manifest)], Rounds([1.0], 1337, LANES, MICRO), SEQ, rank, world, start, workers,
                           prefetch=2)
    return [np.concatenate([x, y[:, -1:]], axis=1).astype(np.uint16) for x, y in islice(loader, n)]


def hashes(batches: list) -> list[str]:
    return [hashlib.sha256(row.tobytes()).hexdigest() for b in batches for row in b]


def test_stream_is_the_same_on_any_world_size_and_resumes_elastically(server, tmp_path):
    url, root = server
    whole = micro_batches(url, tmp_path / "c1", 0, 1, 0, 24)
    # 2 ranks (rank 0 with 2 workers) for 6 steps of 2 micro-batches per rank, then 1 rank resumes.
    ranks = [micro_batches(url, tmp_path / f"c2-{r}", r, 2, 0, 6, workers=2 - r) for r in (0, 1)]
    before = [ranks[c % 2][c // 2] for c in range(12)]
    after = micro_batches(url, tmp_path / "c3", 0, 1, 12 * MICRO, 12)
    assert all((a == b).all() for a, b in zip(before + after, whole, strict=True))
    # Nothing repeated, and every sample a window of the corpus.
    drawn = hashes(whole)
    windows = Windows(TokenBlocks(root, "train"), SEQ)
    assert len(set(drawn)) == len(drawn) and set(drawn) <= set(hashes([windows.tokens(i)[None]
                                                                       for i in range(len(windows))]))
    # A resume many epochs in fetches one shard per lane (plus the 2 each fetches ahead) to get back.
    micro_batches(url, tmp_path / "c4", 0, 1, 100_000 * MICRO, LANES)
    assert len(list((tmp_path / "c4").glob("stream/*/shards/*.tar"))) <= LANES * 3


def test_an_epoch_reads_every_window_once(small_shards):
    """The lanes' shard slots of one epoch are a permutation of all shards."""
    shards = read_manifest(small_shards)["splits"]["train"]["shards"]
    plan = ShardPlan(shards, per_block=8, lanes=LANES, seed=1)
    slots = [plan.slot(g % LANES, g // LANES) for g in range(2 * len(shards))]
    for epoch in (0, 1):
        assert sorted(s for e, s in slots if e == epoch) == list(range(len(shards)))
    assert [s for e, s in slots if e == 0] != [s for e, s in slots if e == 1]
    assert sorted(plan.order(0, 3)) == list(range(8)) and list(plan.order(0, 3)) != list(plan.order(1, 3))


def test_cache_stays_within_its_budget(server, tmp_path):
    url, _ = server
    shard_bytes = read_manifest(server[1])["splits"]["train"]["shards"][0]["bytes"]
    store = ShardStore(url, tmp_path / "cache", budget_bytes=5 * shard_bytes, retries=0)
    manifest = read_manifest(store.local_corpus())
    for shard in manifest["splits"]["train"]["shards"][:20]:
        with store.open(shard) as f:
            assert len(f.read()) == shard["bytes"]
    cached = sorted(p.name for p in store.shard_dir.glob("*.tar"))
    assert cached == [s["file"] for s in manifest["splits"]["train"]["shards"][15:20]]  # the 5 newest


def stream_overrides(url: str, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.path={url}", f"data.cache_dir={run_dir.parent / 'cache'}", f"data.stream.lanes={LANES}",
            f"train.run_dir={run_dir}", *extra]


def test_training_from_http_resumes_exactly(server, tmp_path):
    url, _ = server
    whole = train_cfg(stream_overrides(url, tmp_path / "whole", "model.dropout=0.1"), tmp_path / "whole")
    resumed = train_cfg(stream_overrides(url, rewind(tmp_path / "whole", tmp_path / "resumed", 2), "model.dropout=0.1"),
                        tmp_path / "resumed")
    losses = [m["loss"] for m in whole if "loss" in m]
    assert len(losses) == 4 and [m["loss"] for m in resumed if "loss" in m] == losses  # steps 1-2 copied, 3-4 rerun
    assert whole[-1]["val_loss"] == resumed[-1]["val_loss"]


def test_corrupt_shard_stops_the_run_naming_its_url(server, tmp_path):
    url, root = server
    manifest = read_manifest(root)
    plan = ShardPlan(manifest["splits"]["train"]["shards"], per_block=8, lanes=1, seed=1337)
    # Lane 0's fourth shard: samples 24..31 of step 7 (4 samples a step), fetched during step 6 (the
    # device prefetch takes the next micro-batch while the last one of a step computes).
    bad = manifest["splits"]["train"]["shards"][plan.slot(0, 3)[1]]["file"]
    data = bytearray((root / bad).read_bytes())
    data[600] ^= 0xFF  # a flipped bit in a token: the tar still parses, only the checksum can tell
    (root / bad).write_bytes(bytes(data))
    run_dir = tmp_path / "run"
    result = run_train([*stream_overrides(url, run_dir, "data.stream.lanes=1", "data.stream.retries=1",
                                          "train.max_steps=8", "train.ckpt_interval=4")])
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {url}{bad}: SHA-256") and "after 2 tries" in error
    assert latest_tag(run_dir) == "step_00000005"  # step 6 was not applied; step 5 was saved before stopping
    assert [m["step"] for m in read_metrics(run_dir) if "loss" in m] == [1, 2, 3, 4, 5]


def test_pipe_commands_and_unreachable_servers(small_shards, tmp_path):
    store = ShardStore(f"pipe:cat {small_shards}/{{file}}", tmp_path / "cache", retries=0)
    manifest = read_manifest(store.local_corpus())
    loader = stream_loader([(store, manifest)], Rounds([1.0], 1, LANES, MICRO), SEQ, 0, 1, 0, 0, prefetch=0)
    assert next(iter(loader))[0].shape == (MICRO, SEQ)
    store = ShardStore(f"pipe:cat {tmp_path}/nothing/{{file}}", tmp_path / "cache", retries=1, backoff_s=0.01)
    with pytest.raises(ShardUnavailable, match=re.escape(f"cat {tmp_path}/nothing/manifest.json: exit status 1")):
        store.local_corpus()
    with pytest.raises(ShardUnavailable, match=r"http://127.0.0.1:9/manifest.json: .*refused \(after 2 tries\)"):
        ShardStore("http://127.0.0.1:9", tmp_path / "cache", retries=1, backoff_s=0.01).local_corpus()
