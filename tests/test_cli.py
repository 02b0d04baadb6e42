"""`python train.py` end to end, as a user runs it: the built-in corpus prepared on first use."""

import json
import re

import pytest

from gpt2dist.training.checkpoint import latest_tag
from tests.conftest import TINY, read_metrics, run_train, tiny_overrides


@pytest.mark.parametrize("nproc", [0, 2], ids=["plain", "torchrun-2"])
def test_train_on_builtin_corpus(tmp_path, nproc):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    result = run_train([*TINY, f"train.run_dir={run_dir}", f"data.cache_dir={cache}", "data.builtin=pydoc",
                        "train.sample_tokens=8"], nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "tokenizing builtin:pydoc" in result.stderr  # progress while preparing
    assert "model gpt2-tiny: 1,635,744 parameters" in out
    assert out.count("step 4/4") == 1 and "sample: 'The" in out
    assert len(list(cache.glob("builtin-pydoc-py*/manifest.json"))) == 1
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and "val_loss" in metrics[-1]
    assert latest_tag(run_dir) == "step_00000004"
    assert "seq_len: 32" in (run_dir / "config.yaml").read_text()
    # DeepSpeed's accelerator notice, gcc probes, build lines and FutureWarnings are held back.
    for noise in ("real_accelerator", "-laio", "built successfully", "FutureWarning"):
        assert noise not in result.stdout + result.stderr, noise


def test_local_sweep_jobs_each_see_their_own_launcher(corpus, tmp_path):
    """`-m` runs the jobs one after another in one process: the second must not take the rank
    variables the first one's start set for torchrun's, and W&B names say what each job is."""
    sweep = tmp_path / "lr-sweep"
    result = run_train(["-m", *tiny_overrides(corpus, sweep, "train.max_steps=1", "optim.warmup_steps=1", "train.sample_tokens=0",
                                              "logger.wandb=offline"), "optim.lr=1e-3,2e-3"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("launcher plain: rank 0 of 1") == 2, result.stdout
    assert re.findall(r"W&B: offline run '([^']*)'", result.stdout) == [
        "lr-sweep: optim.lr=0.001", "lr-sweep: optim.lr=0.002"]
    assert [read_metrics(sweep / job)[0]["step"] for job in ("0", "1")] == [1, 1]
