"""The data stream through the real trainer: mixtures with per-source tokens and validation
sets, exact resume with DataLoader workers on 2 ranks, and elastic resume from 2 ranks to 1."""

import pytest

from gpt2dist.training.trainer import Trainer
from tests.conftest import make_cfg, read_metrics, rewind, run_to_end, run_train, tiny_overrides, without_timing


def mixture(corpus, code_corpus) -> str:
    return (f"data.sources=[{{name: prose, path: '{corpus}', weight: 0.75}}, "
            f"{{name: code, path: '{code_corpus}', weight: 0.25}}, {{name: held_out, path: '{code_corpus}', weight: 0}}]")


def train(overrides):
    """Train in this process; the Trainer is returned for its data stream."""
    trainer = Trainer(make_cfg(*overrides))
    run_to_end(trainer)
    return trainer


def test_mixture_logs_tokens_and_validation_per_source(corpus, code_corpus, tmp_path):
    trainer = train(tiny_overrides(corpus, tmp_path, mixture(corpus, code_corpus), "train.max_steps=6"))
    metrics = read_metrics(tmp_path)
    for m in metrics:
        assert m["tokens/prose"] + m["tokens/code"] == m["tokens"] and m["tokens/held_out"] == 0
        assert m["tokens/prose"] // 32 == trainer.stream.drawn(m["step"] * 4)[0]
    assert metrics[-1]["tokens/code"] > 0 and metrics[-1]["tokens/prose"] > metrics[-1]["tokens/code"]
    evals = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in evals] == [2, 4, 6]
    for m in evals:
        assert m["val_loss"] == m["val/prose"] and m["val/held_out"] == m["val/code"]  # same corpus
        assert m["val/prose"] != m["val/code"]


def test_mixture_resumes_exactly(corpus, code_corpus, tmp_path):
    overrides = [mixture(corpus, code_corpus), "train.max_steps=6", "train.ckpt_interval=3", "model.dropout=0.1"]
    train(tiny_overrides(corpus, tmp_path / "full", *overrides))
    resumed = rewind(tmp_path / "full", tmp_path / "resumed", 3)
    train(tiny_overrides(corpus, resumed, *overrides))
    assert without_timing(read_metrics(resumed)) == without_timing(read_metrics(tmp_path / "full"))  # bit-identical


STEPS = ["train.max_steps=6", "train.ckpt_interval=3", "optim.lr=3e-3", "train.sample_tokens=0"]


@pytest.fixture(scope="module")
def two_ranks(corpus, tmp_path_factory):
    """An uninterrupted 2-rank run (ZeRO 0, micro-batch 2 per rank, 2 DataLoader workers each)."""
    run_dir = tmp_path_factory.mktemp("two-ranks") / "run"
    result = run_train(tiny_overrides(corpus, run_dir, *STEPS, "data.num_workers=2"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_two_ranks_with_workers_resume_exactly(corpus, two_ranks, tmp_path):
    resumed = rewind(two_ranks, tmp_path / "resumed", 3)
    result = run_train(tiny_overrides(corpus, resumed, *STEPS, "data.num_workers=2"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    full, again = read_metrics(two_ranks), read_metrics(resumed)
    assert [m["step"] for m in again] == [m["step"] for m in full] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, again):
        for key in ("loss", "val_loss", "grad_norm", "tokens"):
            if key in a:
                assert a[key] == b[key], (a["step"], key)  # the same batches, token for token


def test_elastic_resume_from_two_ranks_on_one(corpus, two_ranks, tmp_path):
    """The 2-rank checkpoint of step 3, resumed by one process accumulating 2 micro-batches
    (the same global batch), continues the sample stream of an uninterrupted 1-process run."""
    one = tmp_path / "one"
    result = run_train(tiny_overrides(corpus, one, *STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = rewind(two_ranks, tmp_path / "resumed", 3)
    result = run_train(tiny_overrides(corpus, resumed, *STEPS, "data.num_workers=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 of 1" in result.stdout and "resumed from" in result.stdout
    expected, again = read_metrics(one), read_metrics(resumed)
    assert [m["step"] for m in again] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected[3:], again[3:]):
        assert a["tokens"] == b["tokens"]
        for key in ("loss", "val_loss"):  # all-reduce in another order: equal up to float rounding
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
