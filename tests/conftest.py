"""Shared test fixtures: a small prepared corpus, tiny configs, and a clean way to run the CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gpt2dist.data.builtin_corpus import documents
from gpt2dist.config import CONF_DIR, given_keys, register
from gpt2dist.data.prepare import prepare_corpus
from gpt2dist.training.checkpoint import CHECKPOINTS

ROOT = Path(__file__).resolve().parent.parent
register()

# `make test` runs the suite on pytest-xdist workers (`-n 3 --dist loadgroup`). Each module runs whole on one
# worker, so its module- and session-scoped fixtures are made once, and modules that share a machine-wide
# resource or an expensive session fixture share a worker, one after another: those that start the SLURM
# cluster (one munged serves the machine, and a cluster that stops stops it) and those of the 2-rank runs.
# xdist's own xdist_group marks do not reach its scheduler under pytest 9 (it renames Node._nodeid, which
# pytest 9 no longer reads), so the groups are named here, by module, for a scheduler of ours.
GROUPS = {"test_slurm": "slurm", "test_multinode": "slurm", "test_parts": "slurm",
          "test_elastic": "two-ranks", "test_multirank": "two-ranks"}
SHARED = {"slurm_cluster": "slurm", "two_nodes": "slurm", "two_rank_run": "two-ranks"}  # what makes a module join


def pytest_collection_modifyitems(items):
    """A module that uses a shared resource but is not in its group would run beside the others: refused."""
    for item in items:
        name = item.module.__name__.rpartition(".")[2]
        uses = set(vars(item.module)) | set(item.fixturenames)
        for resource, group in SHARED.items():
            if resource in uses and GROUPS.get(name) != group:
                raise pytest.UsageError(f"tests/{name}.py uses {resource}: add it to GROUPS[{group!r}] in tests/conftest.py")


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroups(LoadScopeScheduling):
        """xdist's loadscope (a module is a unit of work), with the modules of a group in one unit."""

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return GROUPS.get(Path(module).stem, module)

    return ModuleGroups(config, log) if config.getvalue("dist") == "loadgroup" else None


# A model and batch small enough that a step takes milliseconds on a CPU.
TINY = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=64",
    "data.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4",
    "train.max_steps=4", "train.eval_interval=2", "train.eval_sequences=8", "train.ckpt_interval=2",
    "logger.log_interval=1", "logger.wandb=disabled", "train.sample_tokens=4", "optim.warmup_steps=2",
]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Python's English documentation, prepared with small blocks."""
    out = tmp_path_factory.mktemp("data") / "pydoc"
    prepare_corpus(documents("pydoc"), out, source="pydoc", val_fraction=0.1, block_tokens=256, progress=False)
    return out


@pytest.fixture(scope="session")
def code_corpus(tmp_path_factory) -> Path:
    """Python source, a second domain for mixtures: 40 standard-library modules, small blocks."""
    out = tmp_path_factory.mktemp("data") / "pycode"
    docs = [d for _, d in zip(range(40), documents("pycode"))]
    prepare_corpus(docs, out, source="pycode", val_fraction=0.1, block_tokens=256, progress=False)
    return out


# The shared 2-rank runs (two_rank_run): optim.lr high enough that 4 steps move the loss.
TWO_RANK_STEPS = ["train.max_steps=4", "train.ckpt_interval=2", "optim.lr=3e-3"]


@pytest.fixture(scope="session")
def two_rank_run(corpus, tmp_path_factory):
    """`two_rank_run(stage)`: an uninterrupted 2-rank run of the tiny model at that ZeRO stage under torchrun
    (TWO_RANK_STEPS: checkpoints at steps 2 and 4), made once per session on first use, since each costs
    ~15 s: (its CompletedProcess, its run directory). Tests copy the directory before writing to it."""
    runs = {}

    def run(stage: int):
        if stage not in runs:
            run_dir = tmp_path_factory.mktemp(f"two-ranks-zero{stage}")
            result = run_train(tiny_overrides(corpus, run_dir, *TWO_RANK_STEPS, f"zero.stage={stage}"), nproc=2)
            assert result.returncode == 0, result.stderr[-3000:]
            runs[stage] = result, run_dir
        return runs[stage]

    return run


# The SLURM tests' runs: long enough to signal one mid-run.
SLURM_STEPS = ["train.max_steps=30", "train.ckpt_interval=0", "train.eval_interval=10", "zero.stage=2"]


@pytest.fixture(scope="session")
def torchrun_reference(corpus, tmp_path_factory) -> list[dict]:
    """The metrics of an uninterrupted SLURM_STEPS run on 2 ranks under torchrun, on one node."""
    run_dir = tmp_path_factory.mktemp("torchrun")
    result = run_train(tiny_overrides(corpus, run_dir, *SLURM_STEPS), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(run_dir)


def rewind(run_dir: Path, dest: Path, step: int) -> Path:
    """A copy of run_dir as it was when the checkpoint of `step` was the newest."""
    shutil.copytree(run_dir, dest)
    for ckpt in (dest / CHECKPOINTS).glob("step_*"):
        if int(ckpt.name.removeprefix("step_")) > step:
            shutil.rmtree(ckpt)
    (dest / CHECKPOINTS / "latest").write_text(f"step_{step:08d}")
    return dest


def make_cfg(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def tiny_overrides(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.path={corpus}", f"train.run_dir={run_dir}", *extra]


def clean_env() -> dict:
    """The environment without rank variables an in-process test may have left behind."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_python(args: list[str], nproc: int = 0, timeout: int = 600, env: dict | None = None
               ) -> subprocess.CompletedProcess:
    """`python ARGS` (a script or `-m module`, with its arguments), or under `torchrun
    --nproc_per_node=nproc`; `env` adds variables."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    return subprocess.run([*launcher, *args], cwd=ROOT, env={**clean_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def run_train(overrides: list[str], nproc: int = 0, timeout: int = 600, env: dict | None = None
              ) -> subprocess.CompletedProcess:
    """`python train.py ...`, or under `torchrun --nproc_per_node=nproc`; `env` adds variables."""
    return run_python([str(ROOT / "train.py"), *overrides], nproc, timeout, env)


def fp16_supported() -> bool:
    """Whether this machine's accelerator runs fp16 (CPUs need oneDNN fp16 kernels, which some lack)."""
    from gpt2dist.training import deepspeed_env

    deepspeed_env.load()
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


needs_fp16 = pytest.mark.skipif(not fp16_supported(), reason="this CPU has no oneDNN fp16 kernels: DeepSpeed refuses fp16")


def from_hf(hf_model, directory: Path):
    """A Hugging Face GPT-2 as the commands read one: saved, then loaded by weights.load_model."""
    from gpt2dist.models.weights import load_model

    hf_model.save_pretrained(directory)
    return load_model(directory)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


TIMING = ("tokens_per_s", "mfu")  # the logged values that depend on how fast the machine ran


def without_timing(metrics: list[dict]) -> list[dict]:
    """Logged values that a run that never died (or ran elsewhere) must reproduce exactly: all but TIMING."""
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


def run_to_end(trainer):
    """Train a Trainer a test has built (and perhaps reached into) to its end, then close it."""
    try:
        return trainer.train()
    finally:
        trainer.close()


def train_cfg(overrides: list[str], run_dir: Path) -> list[dict]:
    """Train in this process through the real Trainer, as train.py does (the overrides' keys given); returns
    the metrics."""
    from gpt2dist.training.trainer import run

    run(make_cfg(*overrides), given_keys(overrides))
    return read_metrics(run_dir)


def train(corpus: Path, run_dir: Path, *extra: str) -> list[dict]:
    """Train the tiny model in this process; returns its metrics."""
    return train_cfg(tiny_overrides(corpus, run_dir, *extra), run_dir)
