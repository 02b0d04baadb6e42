"""Stream mode (gpt2dist/data/stream.py) from a real web server on 127.0.0.1: the stream does not
depend on the number of ranks or workers, resumes exactly (loader and trainer), an elastic restart
repeats and skips nothing, the cache stays within its budget, a corrupt shard stops the run naming
its URL, after a checkpoint, with exit status 2; brace patterns of shards, mixtures drawn by weight,
and data_tools.prepare writing through a pipe: command or to a directory then served. Servers run
as processes, S3 and a shaped network: tests/test_stream_network.py."""

import contextlib
import functools
import hashlib
import re
import http.server
import shutil
import threading
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from gpt2dist.data.builtin_corpus import documents
from gpt2dist.data.loader import Windows
from gpt2dist.data.prepare import prepare_corpus
from data_tools.prepare import main as prepare_main
from gpt2dist.data.loader import MIX_PERIOD
from gpt2dist.data.shards import CorpusError, TokenBlocks, read_manifest
from gpt2dist.data.stream import Rounds, ShardPlan, ShardStore, ShardUnavailable, stream_loader
from gpt2dist.training.checkpoint import latest_tag
from gpt2dist.outputs import MARKER
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


@contextlib.contextmanager
def serve(root: Path, handler: type[http.server.SimpleHTTPRequestHandler] = QuietHandler):
    """Python's web server on 127.0.0.1, in a thread, serving `root` (with `handler`): yields its URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def server(small_shards, tmp_path):
    """A copy of the corpus served over HTTP on 127.0.0.1: (its URL, its directory)."""
    root = tmp_path / "served"
    shutil.copytree(small_shards, root)
    with serve(root) as url:
        yield url, root


def micro_batches(location: str | list[str], cache: Path, rank: int, world: int, start: int, n: int,
                  workers: int = 0, weights: tuple[float, ...] = (1.0,), retries: int = 0) -> list:
    """This rank's first n micro-batches (token arrays) from sample `start` on, with a fresh cache,
    from one location or a mixture of several with these weights."""
    locations = [location] if isinstance(location, str) else location
    stores = [ShardStore(where, cache, retries=retries, backoff_s=0.1) for where in locations]
    sources = [(store, read_manifest(store.local_corpus())) for store in stores]
    loader = stream_loader(sources, Rounds(list(weights), 1337, LANES, MICRO), SEQ, rank, world, start, workers,
                           prefetch=2)
    return [np.concatenate([x, y[:, -1:]], axis=1).astype(np.uint16) for x, y in islice(loader, n)]


def window_hashes(corpus: Path, files: list[str] | None = None) -> set[str]:
    """The hashes of every training window of a local corpus (or of these shards of it)."""
    blocks = TokenBlocks(corpus, "train")
    windows, starts = Windows(blocks, SEQ), blocks.starts * Windows(blocks, SEQ).per_block
    picked = [i for i, s in enumerate(blocks.shards) if files is None or s["file"] in files]
    return set(hashes([windows.tokens(w)[None] for i in picked for w in range(starts[i], starts[i + 1])]))


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
    assert len(set(drawn)) == len(drawn) and set(drawn) <= window_hashes(root)
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
    plan.sizes[::3] *= 2  # shards of two sizes: a seek skips each by its own
    for lane, start in [(0, 0), (1, 7), (2, 8), (3, 1000), (1, 12345)]:
        j, position = 0, start
        while position >= (size := plan.sizes[plan.slot(lane, j)[1]]):  # one slot after another
            position, j = position - size, j + 1
        assert plan.seek(lane, start) == (j, position)



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


@pytest.mark.parametrize("extra", [256 * 2**20, -100])
def test_a_download_stops_at_the_size_the_manifest_declares(small_shards, tmp_path, extra):
    """A server that sends more than a shard's declared size is cut off there, so that it cannot fill
    the disk before the SHA-256 check; one that sends less is refused too. Both name the URL and are
    retried."""
    sent = []  # bytes the server managed to send, each time it served the shard

    class Longer(QuietHandler):
        """The first training shard `extra` bytes longer (or shorter), without a Content-Length: its end is
        where the server closes the connection."""

        def do_GET(self):
            if not self.path.endswith("/train-000000.tar"):
                return super().do_GET()
            data = (small_shards / "train-000000.tar").read_bytes()[:extra if extra < 0 else None]
            self.send_response(200)
            self.end_headers()
            total = 0
            with contextlib.suppress(ConnectionError):
                for chunk in [data] + [bytes(2**20)] * (max(extra, 0) // 2**20):
                    self.wfile.write(chunk)
                    total += len(chunk)
            sent.append(total)

    shard = read_manifest(small_shards)["splits"]["train"]["shards"][0]
    with serve(small_shards, Longer) as url:
        store = ShardStore(url, tmp_path / "cache", retries=1, backoff_s=0)
        store.local_corpus()
        why = f"sent more than the {shard['bytes']:,} bytes the manifest declares" if extra > 0 else \
            f"sent {shard['bytes'] + extra:,} bytes, but the manifest declares {shard['bytes']:,}"
        with pytest.raises(ShardUnavailable, match=re.escape(f"{url}train-000000.tar: {why} (after 2 tries)")):
            store.open(shard)
        deadline = time.monotonic() + 30
        while len(sent) < 2 and time.monotonic() < deadline:  # the handler sees the connection closed
            time.sleep(0.01)
    assert len(sent) == 2 and max(sent) < 64 * 2**20  # the client stopped reading (socket buffers took the rest)
    assert not list(store.shard_dir.iterdir())  # nothing kept, no partial file left


def test_brace_pattern_trains_on_the_shards_it_names(server, tmp_path):
    url, root = server
    epoch = micro_batches(f"{url}train-{{000002..000005}}.tar", tmp_path / "c", 0, 1, 0, 4 * 8 // MICRO)
    drawn = hashes(epoch)  # 4 one-block shards of 8 windows: one epoch, each window once
    assert len(drawn) == 32 and set(drawn) == window_hashes(root, [f"train-{i:06d}.tar" for i in range(2, 6)])
    with pytest.raises(CorpusError, match=re.escape(f"{url}train-999999.tar: not a training shard of "
                                                    f"{url}manifest.json")):
        micro_batches(f"{url}train-{{000000,999999}}.tar", tmp_path / "c", 0, 1, 0, 1)


def test_mixture_draws_sources_by_weight_and_resumes_exactly(server, code_corpus, tmp_path):
    url, root = server
    sources, weights = [url, str(code_corpus)], (0.75, 0.25)  # over HTTP, and from a local directory
    whole = micro_batches(sources, tmp_path / "c1", 0, 1, 0, 48, weights=weights)
    rounds = Rounds(list(weights), 1337, LANES, MICRO)
    corpora = window_hashes(root), window_hashes(code_corpus)
    counts = [0, 0]
    for c, batch in enumerate(whole):  # each micro-batch from the source its round names
        source = rounds.locate(c)[0]
        assert set(hashes([batch])) <= corpora[source]
        counts[source] += MICRO
    assert counts == rounds.drawn(48 * MICRO) and 0 < counts[1] < counts[0]
    assert rounds.drawn(MIX_PERIOD * LANES * MICRO) == [n * LANES * MICRO for n in (7500, 2500)]  # exact by weight
    # 2 ranks (rank 0 with 2 workers) for 12 micro-batches, then 1 rank resumes: the same stream.
    ranks = [micro_batches(sources, tmp_path / f"c2-{r}", r, 2, 0, 6, workers=2 - r, weights=weights) for r in (0, 1)]
    after = micro_batches(sources, tmp_path / "c3", 0, 1, 12 * MICRO, 36, weights=weights)
    assert all((a == b).all() for a, b in zip([ranks[c % 2][c // 2] for c in range(12)] + after, whole, strict=True))


def test_prepare_writes_through_a_pipe_command_or_to_a_directory_then_served(small_shards, tmp_path, capsys):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, text in zip(range(10), documents("pydoc")):
        (texts / f"{i:02d}.txt").write_text(text)
    args = [str(texts), "--block-tokens", "256", "--shard-mb", "0.0001", "--val-fraction", "0.1", "--workers", "1"]
    piped, directory = tmp_path / "piped", tmp_path / "directory"
    piped.mkdir()
    assert prepare_main([*args, "--output", f"pipe:cat > {piped}/{{file}}"]) == 0
    assert prepare_main([*args, "--output", str(directory)]) == 0
    names = sorted(p.name for p in directory.iterdir() if p.name != MARKER)  # the marker: of a directory here only
    assert sorted(p.name for p in piped.iterdir()) == names
    assert all((piped / n).read_bytes() == (directory / n).read_bytes() for n in names)
    with serve(directory) as url:
        served = micro_batches(url, tmp_path / "c1", 0, 1, 0, 8)
    assert all((a == b).all() for a, b in zip(micro_batches(str(piped), tmp_path / "c2", 0, 1, 0, 8), served))
    # A command that fails: one line naming it, exit status 2.
    assert prepare_main([*args, "--output", f"pipe:cat > {tmp_path}/nowhere/{{file}}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: cat > {tmp_path}/nowhere/train-000000.tar: exit status 2: ")  # the shell's


def test_training_on_a_mixture_streams_each_source_by_weight(server, code_corpus, tmp_path):
    url, _ = server
    sources = (f"data.sources=[{{name: prose, path: '{url}', weight: 0.75}}, "
               f"{{name: code, path: '{code_corpus}', weight: 0.25}}]")
    metrics = train_cfg([*stream_overrides(url, tmp_path / "run", sources, "train.max_steps=6", "train.ckpt_interval=0",
                                           "train.sample_tokens=0")], tmp_path / "run")
    rounds = Rounds([0.75, 0.25], 1337, LANES, MICRO)  # train.seed 1337
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    for m in steps:
        assert [m["tokens/prose"], m["tokens/code"]] == [n * SEQ for n in rounds.drawn(m["step"] * 4)]
    assert steps[-1]["tokens/code"] > 0 and steps[-1]["tokens/prose"] > steps[-1]["tokens/code"]
    evals = [m for m in metrics if "val_loss" in m]
    assert evals and all(m["val_loss"] == m["val/prose"] != m["val/code"] for m in evals)
