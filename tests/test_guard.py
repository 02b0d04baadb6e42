"""The loss guard's rule, and that a skipped update really leaves a DeepSpeed engine untouched."""

import math

import pytest
import torch

from gpt2dist import dist, engine as ds_engine
from gpt2dist.config import gpt_config
from gpt2dist.guard import LossGuard
from gpt2dist.model import GPT
from tests.conftest import make_cfg, tiny_overrides


def test_nan_inf_and_spikes_are_skipped():
    guard = LossGuard(zscore=3.0, window=10, min_history=5, max_skips=2)
    for loss in (5.0, 5.1, 4.9, 5.0, 5.05):
        assert guard.check(loss) is None
    assert "spike" in guard.check(9.0)
    assert "nan" in guard.check(math.nan) and "inf" in guard.check(math.inf)
    assert guard.exhausted()  # 3 in a row > max_skips=2
    assert guard.check(5.02) is None and not guard.exhausted() and guard.skipped == 3
    assert 9.0 not in guard.history  # skipped losses do not shift the baseline


def test_no_spike_judged_before_min_history():
    guard = LossGuard(zscore=3.0, window=10, min_history=5, max_skips=2)
    assert [guard.check(x) for x in (10.0, 2.0, 9.0)] == [None, None, None]


def test_state_round_trips():
    guard = LossGuard(zscore=3.0, window=3, min_history=2, max_skips=2)
    for loss in (1.0, 2.0, 3.0, 4.0, math.nan):
        guard.check(loss)
    again = LossGuard(zscore=3.0, window=3, min_history=2, max_skips=2, state=guard.state_dict())
    assert again.state_dict() == guard.state_dict() == {"history": [2.0, 3.0, 4.0], "skips_in_a_row": 1, "skipped": 1}


def _snapshot(engine) -> list[torch.Tensor]:
    params = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in engine.module.parameters()]
    inner = engine.optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    moments = [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    return [t.detach().float().clone() for t in params + moments]


@pytest.mark.parametrize("extra", [["zero.stage=0"], ["zero.stage=1", "train.precision=bf16"], ["zero.stage=2"],
                                   ["zero.stage=3"], ["zero=offload"]],
                         ids=["zero0", "zero1-bf16", "zero2", "zero3", "zero3-offload"])
def test_skipped_update_changes_nothing(corpus, tmp_path, extra):
    dist.init()
    cfg = make_cfg(*tiny_overrides(corpus, tmp_path, "train.global_batch_size=2", *extra))
    torch.manual_seed(0)
    engine = ds_engine.build(GPT(gpt_config(cfg.model)), cfg, world_size=1)
    idx = torch.randint(0, 50257, (2, 33))

    def one_step(skip: bool) -> None:
        engine.backward(engine(idx[:, :-1], idx[:, 1:])[1])
        if skip:
            with ds_engine.update_skipped(engine):
                engine.step()
        else:
            engine.step()

    one_step(skip=False)  # Adam moments exist from here on
    before = _snapshot(engine)
    one_step(skip=True)
    after = _snapshot(engine)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    one_step(skip=False)  # and a normal step after it still trains (so this test could fail)
    assert not all(torch.equal(a, b) for a, b in zip(after, _snapshot(engine)))
