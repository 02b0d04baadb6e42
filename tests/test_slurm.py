"""gpt2dist's own sbatch script on a real one-node SLURM cluster (started by these tests):
2 tasks train like torchrun, and a job signalled mid-run checkpoints, requeues itself and ends
with the same loss as an uninterrupted run."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from gpt2dist.training.checkpoint import CHECKPOINTS
from tests.conftest import ROOT, SLURM_STEPS as STEPS, clean_env, read_metrics, tiny_overrides

CLUSTER = ROOT / "tests" / "slurm_cluster.sh"


def slurm_cluster(state, nodes: int = 1):
    """A generator for a fixture: starts a cluster of `nodes` nodes in directory `state` (see
    tests/slurm_cluster.sh), yields the environment for sbatch/scontrol, then stops it."""
    missing = [c for c in ("sbatch", "slurmctld", "slurmd", "munged") if not shutil.which(c)
               and not os.path.exists(f"/usr/sbin/{c}")]
    reason = None
    if missing:
        reason = f"SLURM not installed ({', '.join(missing)} missing): `apt-get install slurm-wlm munge`"
    elif os.geteuid() != 0:
        reason = "starting a SLURM cluster needs root"
    if reason:
        if os.environ.get("GPT2DIST_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    started = subprocess.run([str(CLUSTER), "start", str(state), str(nodes)], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    env = clean_env()
    env.update(SLURM_CONF=str(state / "slurm.conf"), GPT2DIST_PYTHON=sys.executable)
    yield env
    stopped = subprocess.run([str(CLUSTER), "stop", str(state)], capture_output=True, text=True)
    assert stopped.returncode == 0, f"the test cluster did not stop cleanly: {stopped.stderr}"


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """Environment for sbatch/scontrol, with a one-node cluster of our own running."""
    yield from slurm_cluster(tmp_path_factory.mktemp("slurm"))


def submit(env, run_dir, log, *overrides, nodes: int = 1, tasks_per_node: int = 2, script: str = "train.sbatch"
           ) -> str:
    """sbatch slurm/<script> on `nodes` nodes with `tasks_per_node` CPU tasks each; returns the job id."""
    out = subprocess.run(
        ["sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--gpus-per-node=0",
         "--cpus-per-task=1", f"--output={log}", str(ROOT / "slurm" / script), *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def job_field(env, job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith(f"{field}=")), "")


def wait_for(predicate, what: str, timeout: float = 300, poll: float = 0.5) -> float:
    """Wait until predicate() holds, checking every `poll` seconds; returns the seconds waited."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - start


def test_sbatch_two_tasks_match_torchrun(slurm_env, corpus, tmp_path, torchrun_reference):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm_env, run_dir, log, *tiny_overrides(corpus, run_dir, *STEPS))
    wait_for(lambda: job_field(slurm_env, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the job")
    output = log.read_text()
    assert job_field(slurm_env, job, "JobState") == "COMPLETED", output[-3000:]
    assert "launcher srun: rank 0 of 2" in output
    ckpt = run_dir / CHECKPOINTS / "step_00000030"
    assert {p.name for p in ckpt.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}  # both ranks trained
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [m["step"] for m in torchrun_reference]
    for a, b in zip(metrics, torchrun_reference):
        assert a["loss"] == b["loss"], a["step"]  # same ranks, same data, same arithmetic


def test_preempted_job_requeues_and_finishes_the_same(slurm_env, corpus, tmp_path, torchrun_reference):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm_env, run_dir, log, *tiny_overrides(corpus, run_dir, *STEPS))
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5, "step 5")
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm_env, check=True)  # what --signal=USR1@120 sends
    # SLURM holds a requeued job for the credential lifetime (AuthInfo=cred_expire: 120 s by default,
    # 10 s in the test cluster) before it starts again.
    wait_for(lambda: job_field(slurm_env, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED")
             and job_field(slurm_env, job, "Restarts") == "1", "the requeued job to finish")
    output = log.read_text()
    assert job_field(slurm_env, job, "JobState") == "COMPLETED", output[-3000:]
    assert "stopped by SIGUSR1 at step" in output and "requeueing job" in output
    assert "resumed from" in output and "(restart 1)" in output
    final = read_metrics(run_dir)
    assert [m["step"] for m in final] == list(range(1, 31))  # no step lost or logged twice
    assert final[-1]["loss"] == torchrun_reference[-1]["loss"]
    assert final[-1]["val_loss"] == torchrun_reference[-1]["val_loss"]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 0  # W&B disabled in tests; id reuse tested elsewhere


def test_submitit_sweep(slurm_env, corpus, tmp_path):
    """`python train.py -m hydra/launcher=slurm ...`: a 2-job sweep, each job 2 tasks, no sbatch script."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2",
         "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
         *tiny_overrides(corpus, sweep, "train.max_steps=3", "train.ckpt_interval=0"), "optim.lr=1e-3,3e-3"],
        cwd=ROOT, env=slurm_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lrs = []
    for job in ("0", "1"):
        metrics = read_metrics(sweep / job)
        assert [m["step"] for m in metrics] == [1, 2, 3]
        assert (sweep / job / CHECKPOINTS / "step_00000003" / "rng_rank1.pt").exists()  # 2 ranks in each job
        lrs.append(metrics[1]["lr"])  # step 2: warmup (2 steps) done, the peak rate
    assert lrs == [1e-3, 3e-3]


def test_optuna_search_on_slurm(slurm_env, corpus, tmp_path):
    """`python train.py -m hydra/sweeper=optuna hydra/launcher=slurm ...`: 3 trials at once (n_jobs), each a
    SLURM job of one CPU task; the objective that each job's train.py returns comes back to the study."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/sweeper=optuna", "hydra/launcher=slurm",
         "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=3", "hydra.sweeper.sampler.seed=1",
         "hydra.launcher.tasks_per_node=1", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=10", "optim.lr=tag(log,interval(1e-4,1e-2))",
         *tiny_overrides(corpus, sweep, "train.max_steps=2", "train.ckpt_interval=0", "train.sample_tokens=0")],
        cwd=ROOT, env=slurm_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.out"))  # one per SLURM job
    assert all(f"run dir {sweep / str(job)}\n" in logs for job in range(3)), logs[-3000:]
    finals = [read_metrics(sweep / str(job))[-1]["val_loss"] for job in range(3)]
    assert len(set(finals)) == 3  # three learning rates, three results
    assert f"best_value: {min(finals)}\n" in (sweep / "optimization_results.yaml").read_text()
