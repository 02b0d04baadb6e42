"""Metrics backends: the console line, and TensorBoard's event files, read back with TensorBoard's
own reader, holding the numbers of metrics.jsonl, also across a resume."""

import shutil

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpt2dist.training.checkpoint import CHECKPOINTS
from gpt2dist.training.metrics import Metrics
from tests.conftest import make_cfg, train

BACKENDS = "logger.backends=[console,jsonl,tensorboard]"


def tensorboard_scalars(run_dir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard shows the run (restarts purged)."""
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    for tag, points in scalars.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), f"{tag}: a step shows twice: {steps}"
    return {tag: dict(points) for tag, points in scalars.items()}


def jsonl_scalars(metrics: list[dict]) -> dict[str, dict[int, float]]:
    """{key: {step: value}} of metrics.jsonl, each value as TensorBoard stores it (float32)."""
    scalars = {}
    for m in metrics:
        for key, value in m.items():
            if key != "step":
                scalars.setdefault(key, {})[m["step"]] = float(np.float32(value))
    return scalars


def test_tensorboard_matches_metrics_jsonl_across_a_resume(corpus, tmp_path):
    """A run that dies after step 2's checkpoint and is resumed shows each step once in
    TensorBoard, with the resumed run's values, also for a key the resumed run no longer logs
    at a step (val_loss at step 3: evaluated every step before, every 2nd step after)."""
    first = train(corpus, tmp_path, BACKENDS, "train.max_steps=4", "train.ckpt_interval=2", "train.eval_interval=1")
    assert tensorboard_scalars(tmp_path) == jsonl_scalars(first)
    assert sorted(tensorboard_scalars(tmp_path)["val_loss"]) == [1, 2, 3, 4]

    shutil.rmtree(tmp_path / CHECKPOINTS / "step_00000004")  # as if it died after step 2's checkpoint
    resumed = train(corpus, tmp_path, BACKENDS, "train.max_steps=4", "train.ckpt_interval=2", "train.eval_interval=2")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    shown = tensorboard_scalars(tmp_path)
    assert shown == jsonl_scalars(resumed)
    assert sorted(shown["val_loss"]) == [1, 2, 4]
    assert shown["tokens_per_s"][4] != jsonl_scalars(first)["tokens_per_s"][4]  # the resumed run's timing


def test_console_line(tmp_path, capsys):
    """The console backend's one line per step: None values left out, each number in its format."""
    metrics = Metrics(make_cfg("logger.backends=[console]", "train.max_steps=200"), tmp_path, 0, "run")
    metrics.log(10, {"loss": 5.12345, "lr": 6e-4, "grad_norm": None, "tokens": 40960, "tokens_per_s": 1234.4,
                     "mfu": 0.4123, "skipped_steps": 2})
    metrics.close()
    assert capsys.readouterr().out == (
        "step 10/200 | loss 5.1235 | lr 6.00e-04 | tokens 40,960 | tokens_per_s 1,234 | mfu 41.2% | skipped_steps 2\n")
    assert not any(tmp_path.iterdir())  # console only: nothing written
