"""The optimizer, built by name, and the learning-rate schedule's shapes, value by value."""

import shutil

import pytest
import torch

from gpt2dist.training.checkpoint import CHECKPOINTS, CheckpointError
from gpt2dist.config import ConfigError, check
from gpt2dist.training.optim import build_optimizer, lr_factor, param_groups
from tests.conftest import make_cfg, train


def factors(*overrides: str, max_steps: int = 10) -> list[float]:
    optim = make_cfg(*overrides).optim
    return [lr_factor(step, optim, max_steps) for step in range(max_steps + 2)]


def test_cosine_warms_up_then_decays_to_min_lr():
    f = factors("optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=2")
    assert f[:2] == pytest.approx([0.5, 1.0])
    assert f[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the 8 decay steps
    assert all(a > b for a, b in zip(f[2:10], f[3:11]))
    assert f[10:] == pytest.approx([0.1, 0.1])


def test_constant_holds_the_peak_then_anneals_linearly():
    f = factors("optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=2", "optim.schedule=constant",
                "optim.decay_steps=4")
    assert f == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1])


def test_constant_without_decay_stays_at_the_peak():
    f = factors("optim.warmup_steps=0", "optim.schedule=constant")
    assert f == pytest.approx([1.0] * 12)


@pytest.mark.parametrize("overrides,key", [
    (["optim.schedule=constant", "optim.decay_steps=9", "optim.warmup_steps=2", "train.max_steps=10"],
     "optim.decay_steps=9"),
    (["optim.decay_steps=3"], "optim.decay_steps is for optim.schedule=constant"),
    (["optim.min_lr=1e-3", "optim.lr=1e-4"], "optim.min_lr"),
    (["train.init_optimizer=true"], "train.init_optimizer needs train.init_from"),
])
def test_bad_schedules_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=key):
        check(make_cfg(*overrides), world_size=1)


@pytest.mark.parametrize("extra", [
    ["optim=lion"],
    ["optim=lion", "zero=stage2", "zero.offload_optimizer=true"],
], ids=["lion", "lion-offload"])
def test_each_optimizer_trains_and_resumes_exactly(corpus, tmp_path, extra):
    """Lion (AdamW: tests/test_train.py) learns, and resuming from the step-3 checkpoint
    reproduces steps 4-6 of the uninterrupted run bit for bit, its moment included."""
    lr = ("optim.lr=1e-3", "optim.min_lr=1e-3")  # Lion's steps are lr-sized: a high rate shows in 6 steps
    full = train(corpus, tmp_path / "full", "train.max_steps=6", "train.ckpt_interval=3", *lr, *extra)
    losses = [m["loss"] for m in full if "loss" in m]
    assert min(losses[3:]) < losses[0] - 0.2, losses
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)
    shutil.rmtree(resumed_dir / CHECKPOINTS / "step_00000006")
    resumed = train(corpus, resumed_dir, "train.max_steps=6", "train.ckpt_interval=3", *lr, *extra)
    assert [(m["step"], m.get("loss"), m.get("val_loss")) for m in resumed] == \
        [(m["step"], m.get("loss"), m.get("val_loss")) for m in full]


def test_resume_with_another_optimizer_is_refused(corpus, tmp_path):
    train(corpus, tmp_path, "train.max_steps=2")
    with pytest.raises(CheckpointError, match=r"AdamW|adamw.*optim=adamw"):
        train(corpus, tmp_path, "train.max_steps=4", "optim=lion")


def test_the_optimizer_is_built_by_name():
    from deepspeed.ops.lion import DeepSpeedCPULion

    model = torch.nn.Linear(4, 4)
    adamw = build_optimizer(param_groups(model, 0.1), make_cfg().optim, offload=False)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["betas"] == (0.9, 0.95)
    lion = build_optimizer(param_groups(model, 1.0), make_cfg("optim=lion").optim, offload=True)
    assert isinstance(lion, DeepSpeedCPULion) and lion.param_groups[0]["weight_decay"] == 1.0
