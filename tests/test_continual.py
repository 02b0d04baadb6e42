"""Continual pretraining: init_from with the earlier run's optimizer state, the forgetting
metric, and the replay experiment in benchmarks/continual.py."""

import json
import shutil
import subprocess
import sys

import pytest

from gpt2dist.training.checkpoint import CHECKPOINTS, CheckpointError
from gpt2dist.config import ConfigError
from gpt2dist.commands.export import main as export_main
from gpt2dist.training.optim import lr_factor
from gpt2dist.training.trainer import Trainer
from tests.conftest import ROOT, clean_env, make_cfg, read_metrics, tiny_overrides, train


def test_init_optimizer_takes_the_moments_and_keeps_the_new_schedule(corpus, tmp_path):
    # a ends at a high learning rate, so a first step at a's lr instead of b's would show.
    train(corpus, tmp_path / "a", "train.max_steps=6", "optim.lr=3e-3", "optim.min_lr=3e-3")
    new = ("train.max_steps=3", "train.eval_interval=1", f"train.init_from={tmp_path / 'a'}")

    trainer = Trainer(make_cfg(*tiny_overrides(corpus, tmp_path / "b", *new, "train.init_optimizer=true",
                                               "optim.lr=1e-9", "optim.min_lr=1e-10")))
    try:
        state = trainer.engine.optimizer.state
        assert state and all(s["step"] == 6 for s in state.values())  # a's 6 steps of moments
        trainer.train()
    finally:
        trainer.close()
    b = read_metrics(tmp_path / "b")
    assert [m["step"] for m in b] == [0, 1, 2, 3]
    assert b[1]["val_loss"] == pytest.approx(b[0]["val_loss"], abs=1e-5)  # steps at b's lr of ~1e-9
    optim = make_cfg(*tiny_overrides(corpus, tmp_path, "optim.lr=1e-9", "optim.min_lr=1e-10")).optim
    assert [m["lr"] for m in b[1:]] == pytest.approx([1e-9 * lr_factor(s - 1, optim, 3) for s in (1, 2, 3)])

    # The same first step at lr 1e-3 from a's moments and from fresh ones.
    taken = train(corpus, tmp_path / "c", *new, "train.init_optimizer=true", "optim.lr=1e-3")
    fresh = train(corpus, tmp_path / "d", *new, "optim.lr=1e-3")
    assert taken[0]["val_loss"] == fresh[0]["val_loss"]
    assert abs(taken[1]["val_loss"] - fresh[1]["val_loss"]) > 1e-4


def test_init_optimizer_needs_a_checkpoint_of_the_same_zero_stage(corpus, tmp_path):
    train(corpus, tmp_path / "a", "train.max_steps=2")
    with pytest.raises(CheckpointError, match="ZeRO stage 0; this run has 1 ranks at ZeRO stage 1.*without "
                                              "train.init_optimizer"):
        Trainer(make_cfg(*tiny_overrides(corpus, tmp_path / "b", f"train.init_from={tmp_path / 'a'}",
                                         "train.init_optimizer=true", "zero=stage1")))
    assert export_main([str(tmp_path / "a"), str(tmp_path / "hf")]) == 0
    with pytest.raises(ConfigError, match="holds no gpt2dist checkpoint"):  # weights only
        Trainer(make_cfg(*tiny_overrides(corpus, tmp_path / "c", f"train.init_from={tmp_path / 'hf'}",
                                         "train.init_optimizer=true")))


def test_forgetting_is_each_sources_loss_minus_its_loss_at_the_start(corpus, code_corpus, tmp_path):
    train(corpus, tmp_path / "a", "train.max_steps=6", "optim.lr=3e-3")
    continued = (f"train.init_from={tmp_path / 'a'}", "optim.lr=3e-3",
                 f"data.sources=[{{name: code, path: '{code_corpus}'}}, {{name: prose, path: '{corpus}', weight: 0}}]")
    metrics = train(corpus, tmp_path / "b", *continued)
    evals = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in evals] == [0, 2, 4]
    start = evals[0]
    assert start["forgetting/code"] == start["forgetting/prose"] == 0
    for m in evals[1:]:
        for name in ("code", "prose"):
            assert m[f"forgetting/{name}"] == pytest.approx(m[f"val/{name}"] - start[f"val/{name}"], abs=1e-12)
    assert evals[-1]["forgetting/code"] < 0  # trained on code: its loss went down

    # A resumed run measures from the same start: its step-4 line is the uninterrupted run's.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "b", resumed)
    shutil.rmtree(resumed / CHECKPOINTS / "step_00000004")
    (resumed / CHECKPOINTS / "latest").write_text("step_00000002")
    again = train(corpus, resumed, *continued)
    assert [m["step"] for m in again] == [m["step"] for m in metrics]
    for key in ("val/prose", "forgetting/prose", "forgetting/code"):
        assert again[-1][key] == metrics[-1][key]


def test_replay_experiment_writes_its_report(tmp_path):
    """benchmarks/continual.py end to end at a few steps: the three replay fractions in the table and the plot."""
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "continual.py"), "--out", str(out),
                             "--runs", str(tmp_path / "runs"), "--steps-a", "2", "--steps-b", "2", "--evals", "1",
                             "model.n_embd=32", "train.eval_sequences=8", f"data.cache_dir={tmp_path / 'cache'}"],
                            cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ") and "%" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| 0%", "| 5%", "| 25%"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in json.loads((out / "report.json").read_text())["rows"]:
        assert row["forgetting_prose"] == pytest.approx(row["prose_end"] - row["prose_start"])
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["A", "B-replay-0", "B-replay-0.05", "B-replay-0.25"]
    zero = read_metrics(tmp_path / "runs" / "B-replay-0")
    assert zero[-1]["tokens/prose"] == 0 and zero[-1]["tokens/code"] > 0  # 0% replay: prose only evaluated
