"""Stream mode against real servers run as processes, and a real slow, lossy network: moto's
S3-compatible server read through s3fs, a web server killed and restarted mid-stream, a web server
in a network namespace behind a shaped link, and a shard lost before step 1 on 2 ranks."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2dist.data.shards import read_manifest
from gpt2dist.data.stream import Rounds, ShardPlan, ShardStore, ShardUnavailable, stream_loader
from gpt2dist.training.checkpoint import latest_tag
from tests.conftest import TINY, run_python, run_train, train_cfg
from tests.test_stream import LANES, MICRO, SEQ, micro_batches, server, small_shards, stream_overrides  # noqa: F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(host: str, port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    """Until a server process accepts connections (fails if it exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with status {proc.returncode}"
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


def start_web_server(root: Path, host: str, port: int, netns: str | None = None, log=subprocess.DEVNULL):
    """Python's web server serving `root`, as a process (in a network namespace if given)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []  # ip execs the server: the same PID
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "http.server", str(port), "--bind", host,
                             "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=log)
    wait_for(host, port, proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


# --- S3: moto's standalone server, read through s3fs ---

@pytest.fixture(scope="module")
def s3(corpus):
    """moto's S3 server on 127.0.0.1 holding the corpus at s3://gpt2dist/pydoc/; yields the
    environment that s3fs (botocore) reads."""
    import s3fs

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("127.0.0.1", port, proc)
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=env["AWS_ENDPOINT_URL"],
                               skip_instance_cache=True)
        fs.mkdir("gpt2dist")
        fs.put(f"{corpus}/", "gpt2dist/pydoc/", recursive=True)
        yield env
    finally:
        stop(proc)


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The S3 server's environment in this process; s3fs's cached clients (made with another) dropped."""
    import s3fs

    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3
    s3fs.S3FileSystem.clear_instance_cache()


def test_training_from_s3_reads_what_the_local_stream_reads(corpus, s3_env, tmp_path):
    from_s3 = micro_batches("s3://gpt2dist/pydoc/", tmp_path / "c1", 0, 1, 0, 16)
    assert all((a == b).all() for a, b in zip(from_s3, micro_batches(str(corpus), tmp_path / "c2", 0, 1, 0, 16),
                                              strict=True))
    run_dir = tmp_path / "run"
    metrics = train_cfg([*TINY, "data.path=s3://gpt2dist/pydoc/", f"data.stream.lanes={LANES}",
                         f"data.cache_dir={tmp_path / 'cache'}", f"train.run_dir={run_dir}", "train.max_steps=2",
                         "train.sample_tokens=0"], run_dir)
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2] and latest_tag(run_dir) == "step_00000002"
    assert list((tmp_path / "cache").glob("stream/*/shards/train-000000.tar"))  # through the cache


def test_s3_errors_name_the_url(s3_env, monkeypatch, tmp_path):
    import s3fs

    with pytest.raises(ShardUnavailable, match=r"^s3://nowhere/pydoc/manifest.json: The specified bucket does not "
                                               r"exist \(after 1 tries\)$"):
        ShardStore("s3://nowhere/pydoc/", tmp_path, retries=0).local_corpus()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs.S3FileSystem.clear_instance_cache()  # a client made with the credentials above would be reused
    with pytest.raises(ShardUnavailable, match=r"^s3://gpt2dist/pydoc/manifest.json: .*Unable to locate credentials"):
        ShardStore("s3://gpt2dist/pydoc/", tmp_path, retries=0).local_corpus()


def test_s3_without_s3fs_is_one_line(tmp_path):
    """As where s3fs is not installed: the import fails (a None in sys.modules makes it fail)."""
    code = ("import runpy, sys; sys.modules['s3fs'] = None; sys.argv[0] = 'train.py'; "
            "runpy.run_path('train.py', run_name='__main__')")
    result = run_python(["-c", code, *TINY, "data.path=s3://gpt2dist/pydoc/", f"data.cache_dir={tmp_path}",
                         f"train.run_dir={tmp_path / 'run'}"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1] == (
        "error: s3://gpt2dist/pydoc/manifest.json: reading s3:// needs s3fs (pip install s3fs)")


# --- A web server killed and restarted; a shard lost on one of 2 ranks ---

def test_web_server_killed_and_restarted_mid_stream_is_survived(small_shards, tmp_path):
    expected = micro_batches(str(small_shards), tmp_path / "local", 0, 1, 0, 64)  # the same stream, read locally
    port = free_port()
    server = start_web_server(small_shards, "127.0.0.1", port)
    try:
        # Waits of 0.1, 0.2, ... 12.8 s: 25 s for the server to come back on a busy machine.
        store = ShardStore(f"http://127.0.0.1:{port}/", tmp_path / "cache", retries=8, backoff_s=0.1)
        loader = iter(stream_loader([(store, read_manifest(store.local_corpus()))], Rounds([1.0], 1337, LANES, MICRO),
                                    SEQ, 0, 1, 0, 0, prefetch=2))
        got = [next(loader) for _ in range(16)]  # each lane's first shard; the next 2 each fetched ahead
        stop(server)
        log = tmp_path / "restarted.log"

        def restart():
            nonlocal server
            time.sleep(1.0)  # meanwhile the lanes' fetches are refused and retried
            server = start_web_server(small_shards, "127.0.0.1", port, log=log.open("w"))

        restarter = threading.Thread(target=restart)
        restarter.start()
        got += [next(loader) for _ in range(48)]  # 3 more shards per lane: fetched from the restarted server
        restarter.join()
    finally:
        stop(server)
    assert all((np.concatenate([x, y[:, -1:]], axis=1) == e).all() for (x, y), e in zip(got, expected, strict=True))
    assert "GET /train-" in log.read_text()


def test_shard_lost_before_step_1_on_one_of_two_ranks_stops_both(server, tmp_path):
    url, root = server
    manifest = read_manifest(root)
    plan = ShardPlan(manifest["splits"]["train"]["shards"], per_block=8, lanes=LANES, seed=1337)
    # Global micro-batch 1, rank 1's first, is lane 1's first: its first shard is lost.
    lost = manifest["splits"]["train"]["shards"][plan.slot(1, 0)[1]]["file"]
    (root / lost).unlink()
    run_dir = tmp_path / "run"
    result = run_train(stream_overrides(url, run_dir, "data.stream.retries=0"), nproc=2, timeout=180)
    # Both ranks stop with exit 2; torchrun, seeing the first exit, may end the other before it has (a loaded
    # machine), so its report may hold one exit 2 and the other rank's line be missing. The rank that lost the
    # shard says why before either exits: its line is always there.
    assert result.returncode != 0 and result.stderr.count("exitcode  : 2 ") >= 1  # torchrun's report
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert f"error: {url}{lost}: HTTP 404 File not found (after 1 tries)" in errors
    assert set(errors) <= {f"error: {url}{lost}: HTTP 404 File not found (after 1 tries)",
                           "error: a shard was unavailable on another rank (see its error)"}
    assert latest_tag(run_dir) is None  # nothing trained, nothing saved


# --- A slow, lossy network: a namespace with a shaped link in front of the web server ---

def sh(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True)


@contextlib.contextmanager
def shaped_namespace():
    """A network namespace of our own, joined to this one by a veth pair with addresses of its own,
    its link made slow and lossy by `tc`: yields (its name, its address, the qdisc in front of it).
    netem (delay and loss) where the kernel has it; else tbf, whose short queue drops TCP's bursts.
    Tears down only what it made: the namespace (and with it the pair)."""
    n = os.getpid() % 2**14  # names and a /30 subnet of this process's own
    ns, outer, inner = f"gpt2dist-{os.getpid()}", f"g2d{n}o", f"g2d{n}i"
    here, there = f"10.123.{n >> 6}.{(n & 63) * 4 + 1}", f"10.123.{n >> 6}.{(n & 63) * 4 + 2}"
    made = sh("ip", "netns", "add", ns) if shutil.which("ip") and shutil.which("tc") else None
    if made is None:
        print("skipped: no ip or tc command (iproute2)")
        pytest.skip("no ip or tc command (iproute2)")
    if made.returncode != 0:
        print(f"skipped: cannot make a network namespace: {made.stderr.strip()}")
        pytest.skip(f"cannot make a network namespace: {made.stderr.strip()}")
    try:
        for command in (["ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns],
                        ["ip", "addr", "add", f"{here}/30", "dev", outer], ["ip", "link", "set", outer, "up"],
                        ["ip", "-n", ns, "addr", "add", f"{there}/30", "dev", inner],
                        ["ip", "-n", ns, "link", "set", inner, "up"]):
            done = sh(*command)
            assert done.returncode == 0, f"{' '.join(command)}: {done.stderr}"
        qdisc = ["netem", "delay", "10ms", "loss", "2%"]
        if sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", inner, "root", *qdisc).returncode != 0:
            qdisc = ["tbf", "rate", "20mbit", "burst", "3kb", "limit", "6kb"]
            print("this kernel has no netem: the link is shaped by tbf (20 Mbit/s, a 6 kB queue that drops bursts)")
            done = sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", inner, "root", *qdisc)
            assert done.returncode == 0, done.stderr
        yield ns, there, inner, qdisc[0]
    finally:
        sh("ip", "link", "del", outer)  # gone with the namespace too; removed first so no name lingers
        sh("ip", "netns", "del", ns)


def dropped(ns: str, dev: str) -> int:
    stats = sh("ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", dev).stdout
    return int(stats.split("dropped ")[1].split(",")[0])


def test_streaming_over_a_slow_lossy_link_reads_the_same_stream(small_shards, tmp_path):
    expected = micro_batches(str(small_shards), tmp_path / "local", 0, 1, 0, 48)
    with shaped_namespace() as (ns, address, dev, kind):
        server = start_web_server(small_shards, address, 8000, netns=ns)
        try:
            got = micro_batches(f"http://{address}:8000/", tmp_path / "remote", 0, 1, 0, 48, retries=3)
        finally:
            stop(server)
        losses = dropped(ns, dev)
    print(f"{kind}: {losses} packets dropped")
    assert all((a == b).all() for a, b in zip(got, expected, strict=True))
    assert kind == "netem" or losses > 0  # tbf's drops are counted; netem's loss is random
