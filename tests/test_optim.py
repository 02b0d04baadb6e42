"""The learning-rate schedule's shapes, value by value."""

import pytest

from gpt2dist.config import ConfigError, check
from gpt2dist.optim import lr_factor
from tests.conftest import make_cfg


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
