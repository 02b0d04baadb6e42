"""Runs that die: kill -9 at random moments (saves included), a full disk during a save,
checkpoints that cannot be continued. The run must lose at most one checkpoint interval and,
resumed, produce exactly the loss curve of a run that never died."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from gpt2dist.training.checkpoint import (CHECKPOINTS, MANIFEST, PARTIAL, STALL_WRITE, CheckpointError,
                                          check_compatible, complete_tags, latest_tag)
from tests.conftest import ROOT, clean_env, make_cfg, read_metrics, run_train, tiny_overrides, without_timing

INTERVAL = 3
STEPS = ["train.max_steps=24", f"train.ckpt_interval={INTERVAL}", "train.eval_interval=4", "train.keep_last=2"]


def launch(overrides: list[str], nproc: int, log) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc else [sys.executable]
    return subprocess.Popen([*launcher, str(ROOT / "train.py"), *overrides], cwd=ROOT, env=clean_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def logged_steps(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_repeatedly(overrides: list[str], run_dir, nproc: int, kills: int, seed: int, tmp_path,
                    steps: int = 24) -> list[str]:
    """Start, kill -9 (the whole process group) at a random moment a few steps into training
    (inside a step, an evaluation or a save), restart; `kills` times, then run to the end (`steps`).
    Returns each restart's output."""
    rng = random.Random(seed)
    outputs = []
    for k in range(kills + 1):
        log_path = tmp_path / f"attempt{k}.log"
        with open(log_path, "w") as log:
            before = logged_steps(run_dir)
            proc = launch(overrides, nproc, log)
            if k < kills:
                target = min(before + rng.randint(1, 5), steps - 1)  # always before the last step
                deadline = time.monotonic() + 120
                while logged_steps(run_dir) < target and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.1))
                alive = proc.poll() is None
                if alive:
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=300)
        outputs.append(log_path.read_text())
        if k < kills:  # it must have been training when killed, not crashed or finished
            assert alive, outputs[-1][-3000:]
        if k == kills:
            assert proc.returncode == 0, outputs[-1][-3000:]
    return outputs


def uninterrupted(corpus, run_dir, nproc: int) -> list[dict]:
    result = run_train(tiny_overrides(corpus, run_dir, *STEPS), nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(run_dir)


def resumed_steps(outputs: list[str]) -> list[int]:
    return [int(line.rsplit(" ", 1)[1]) for out in outputs for line in out.splitlines()
            if line.startswith("resumed from")]


@pytest.mark.parametrize("nproc,kills,seed", [(0, 4, 1), (2, 2, 2)], ids=["1-process", "2-ranks"])
def test_kill_9_then_resume_is_bit_identical(corpus, tmp_path, nproc, kills, seed):
    reference = uninterrupted(corpus, tmp_path / "uninterrupted", nproc)
    run_dir = tmp_path / "run"
    outputs = kill_repeatedly(tiny_overrides(corpus, run_dir, *STEPS), run_dir, nproc, kills, seed, tmp_path)
    assert without_timing(read_metrics(run_dir)) == without_timing(reference)
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 25))
    # Never more than two checkpoint intervals of work lost per kill: a kill while checkpoint N is written in
    # the background (the save of N + INTERVAL may be waiting for it) resumes from N - INTERVAL, published
    # before N was begun.
    for out, resumed in zip(outputs[:-1], outputs[1:]):
        last_logged = max([int(line.split()[1].split("/")[0]) for line in out.splitlines()
                           if line.startswith("step ")], default=0)
        start = next((int(line.rsplit(" ", 1)[1]) for line in resumed.splitlines() if line.startswith("resumed from")), 0)
        assert last_logged - start <= 2 * INTERVAL, (last_logged, start)
    assert len(resumed_steps(outputs)) >= 1
    # keep_last=2: only the two newest complete checkpoints remain, and no partial one.
    assert sorted(p.name for p in (run_dir / CHECKPOINTS).iterdir() if p.name != "latest") == \
        ["step_00000021", "step_00000024"]


def test_kill_9_during_the_background_write_leaves_only_complete_checkpoints(corpus, tmp_path):
    """Killed while checkpoint 4 is written in the background (held there by the test-only STALL_WRITE hook,
    after its first file), after training went on to step 6: no step_00000004 is visible, only its partial
    directory, and the resumed run starts from step 2 and logs steps 3-6 exactly as the killed run did."""
    run_dir, log_path = tmp_path / "run", tmp_path / "killed.log"
    overrides = tiny_overrides(corpus, run_dir, "train.max_steps=8", "train.eval_interval=0")
    partial = run_dir / CHECKPOINTS / f"{PARTIAL}step_00000004"
    with open(log_path, "w") as log:
        env = {**clean_env(), STALL_WRITE: "step_00000004"}
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        # Step 6's checkpoint waits for step 4's write, which never ends: the run stays there.
        while logged_steps(run_dir) < 6 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and partial.is_dir() and any(partial.iterdir()), log_path.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    killed = read_metrics(run_dir)
    assert [m["step"] for m in killed] == [1, 2, 3, 4, 5, 6]
    assert complete_tags(run_dir / CHECKPOINTS) == ["step_00000002"] and latest_tag(run_dir) == "step_00000002"
    assert not (partial / MANIFEST).exists()
    result = run_train(overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {run_dir / CHECKPOINTS / 'step_00000002'} at step 2" in result.stdout
    resumed = read_metrics(run_dir)
    assert without_timing(resumed[:6]) == without_timing(killed)
    assert complete_tags(run_dir / CHECKPOINTS) == [f"step_{s:08d}" for s in (2, 4, 6, 8)]
    assert not list((run_dir / CHECKPOINTS).glob(f"{PARTIAL}*"))


def test_full_disk_during_save_keeps_the_previous_checkpoint(corpus, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        run_dir = mount / "run"
        # A checkpoint of this model is ~20 MB (weights and Adam state): the second does not fit. Written in
        # the background (the default), its error is raised on the main thread at the next step.
        result = run_train(tiny_overrides(corpus, run_dir, "train.max_steps=6", "train.ckpt_interval=2",
                                          "logger.backends=[console]"))
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        error = result.stderr.strip().splitlines()[-1]
        assert error.startswith("error: ") and ".partial-step_" in error and "previous checkpoints are untouched" in error
        tags = sorted(p.name for p in (run_dir / CHECKPOINTS).iterdir() if p.name != "latest")
        assert tags and all(not t.startswith(".partial") for t in tags)
        newest = run_dir / CHECKPOINTS / latest_tag(run_dir)
        check_compatible(make_cfg(*tiny_overrides(corpus, run_dir)), newest, world_size=1)  # intact: checksums hold
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished")
    result = run_train(tiny_overrides(corpus, run_dir, "zero.stage=1", "train.max_steps=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_corrupt_checkpoint_is_named(corpus, finished_run, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    ckpt = run_dir / CHECKPOINTS / latest_tag(run_dir)
    victim = next(p for p in sorted(ckpt.iterdir()) if p.name.endswith("optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match=f"{victim.name}: missing or corrupt"):
        check_compatible(make_cfg(*tiny_overrides(corpus, run_dir, "zero.stage=1")), ckpt, world_size=1)


def test_incomplete_checkpoint_is_ignored(finished_run, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    newest = run_dir / CHECKPOINTS / latest_tag(run_dir)
    shutil.copytree(newest, run_dir / CHECKPOINTS / "step_00000099")
    (run_dir / CHECKPOINTS / "step_00000099" / MANIFEST).unlink()  # as if killed before publishing
    assert latest_tag(run_dir) == newest.name


@pytest.mark.parametrize("overrides,message,hint", [
    (["zero.stage=3"], "ZeRO stage 1; this run has 1 ranks at ZeRO stage 3", "train.init_from="),
    (["zero.stage=1", "model.n_layer=3"], "'n_layer': 2.* does not match .*'n_layer': 3", "does not match"),
])
def test_incompatible_resume_fails_before_training(corpus, finished_run, tmp_path, overrides, message, hint):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    ckpt = run_dir / CHECKPOINTS / latest_tag(run_dir)
    with pytest.raises(CheckpointError, match=message):
        check_compatible(make_cfg(*tiny_overrides(corpus, run_dir, *overrides)), ckpt, world_size=1)
    result = run_train(tiny_overrides(corpus, run_dir, *overrides, "train.max_steps=4"))
    assert result.returncode == 2 and hint in result.stderr.strip().splitlines()[-1]
    assert "step 3/4" not in result.stdout  # refused before any work


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """The pid of each rank torchrun (process launcher_pid) started, by rank."""
    pids = {}
    for pid in map(int, open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()):
        env = dict(v.split("=", 1) for v in open(f"/proc/{pid}/environ").read().split("\0") if "=" in v)
        pids[int(env["RANK"])] = pid
    return pids


def running(pid: int) -> bool:
    """Whether process pid exists and has not exited (a zombie, not yet reaped by its parent, has)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


TIMEOUT_S = 3


def test_a_hung_rank_stops_the_others_within_dist_timeout(corpus, tmp_path):
    """A rank that stops answering mid-run (SIGSTOP: as a hung process, or a node gone without closing its
    connections, looks to its peers) must not leave the others waiting forever: they fail once a collective
    has waited dist.timeout_s (measured: 1-2 s after it). A rank killed outright closes its connections,
    and its peers fail at once (measured: 0.4 s), timeout or not."""
    log_path = tmp_path / "out.log"
    overrides = tiny_overrides(corpus, tmp_path / "run", "train.max_steps=100000", "train.ckpt_interval=0",
                               "train.eval_interval=0", f"dist.timeout_s={TIMEOUT_S}")
    with open(log_path, "w") as log:
        proc = launch(overrides, 2, log)
        ranks = {}
        try:
            deadline = time.monotonic() + 120
            while "step 3/" not in log_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None, log_path.read_text()[-3000:]
            ranks = worker_pids(proc.pid)
            os.kill(ranks[1], signal.SIGSTOP)
            stopped = time.monotonic()
            while running(ranks[0]) and time.monotonic() - stopped < TIMEOUT_S + 30:
                time.sleep(0.05)
            detected = time.monotonic() - stopped
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun, waiting for its ranks
            for pid in ranks.values():  # the stopped rank has a process group of its own: it would outlive the test
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=60)
    out = log_path.read_text()
    print(f"rank 0 stopped {detected:.1f} s after its peer hung (dist.timeout_s={TIMEOUT_S})")
    assert TIMEOUT_S <= detected < TIMEOUT_S + 15, out[-3000:]
    assert f"Timed out waiting {TIMEOUT_S * 1000}ms" in out  # it failed on gloo's timeout, not otherwise
    assert f"error: rank 0 waited dist.timeout_s={TIMEOUT_S} s in a collective for a peer rank that stopped " \
           "answering" in out  # one line, not a traceback
