"""The loss guard's rule, and that a skipped update really leaves a DeepSpeed engine untouched."""

import math

import pytest
import torch

from gpt2dist.training import dist
from gpt2dist.training import engine as ds_engine
from gpt2dist.config import gpt_config
from gpt2dist.training.guard import LossGuard
from gpt2dist.models.gpt import GPT
from tests.conftest import make_cfg, needs_fp16, run_to_end, tiny_overrides


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


def _fault_at(trainer, step: int, fault) -> None:
    """Run `fault(model)` once, in the first training forward pass of optimizer step `step` (1-based)."""
    model = trainer.engine.module

    def hook(module, args):
        if module.training and trainer.step + 1 == step and not getattr(hook, "done", False):
            hook.done = True
            fault(model)

    model.transformer.wte.register_forward_pre_hook(hook)


def test_a_spike_is_skipped_and_training_goes_on(corpus, tmp_path):
    from gpt2dist.training.trainer import Trainer
    from tests.conftest import read_metrics

    cfg = make_cfg(*tiny_overrides(corpus, tmp_path, "train.max_steps=8", "guard.min_history=3", "guard.zscore=4"))
    trainer = Trainer(cfg)
    head = trainer.engine.module.lm_head
    # Step 6: one batch's logits blown up 50x (a bad batch): a finite but huge loss.
    handle = head.register_forward_hook(lambda m, a, out: out * 50 if m.training and trainer.step + 1 == 6 else out)
    before = {}
    _fault_at(trainer, 6, lambda model: before.update({k: v.clone() for k, v in model.state_dict().items()}))
    after = {}
    _fault_at(trainer, 7, lambda model: after.update({k: v.clone() for k, v in model.state_dict().items()}))
    run_to_end(trainer)
    handle.remove()
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert metrics[5]["loss"] > 1.5 * metrics[4]["loss"]  # the spike was real
    assert [m.get("skipped_steps") for m in metrics] == [None] * 5 + [1, 1, 1]
    assert all(torch.equal(before[k], after[k]) for k in before)  # step 6 changed no weight


def test_nan_weights_stop_the_run_and_keep_the_last_good_checkpoint(corpus, tmp_path):
    from gpt2dist.training.checkpoint import CHECKPOINTS, latest_tag, verify
    from gpt2dist.training.guard import TrainingDiverged
    from gpt2dist.training.trainer import Trainer

    cfg = make_cfg(*tiny_overrides(corpus, tmp_path, "train.max_steps=12", "train.ckpt_interval=2",
                                   "guard.max_skips=3"))
    trainer = Trainer(cfg)
    # Step 5: a weight goes NaN (a hardware fault, a bad kernel): every later loss is NaN.
    _fault_at(trainer, 5, lambda model: model.transformer.h[0].mlp.c_fc.weight.data.fill_(float("nan")))
    with pytest.raises(TrainingDiverged, match="4 bad steps in a row up to step 8.*step_00000004"):
        run_to_end(trainer)
    assert latest_tag(tmp_path) == "step_00000004"  # no checkpoint of the NaN weights (steps 6 and 8)
    state = torch.load(tmp_path / CHECKPOINTS / "step_00000004" / "mp_rank_00_model_states.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["module"].values())
    verify(tmp_path / CHECKPOINTS / "step_00000004")


@needs_fp16
def test_fp16_overflows_are_reported(corpus, tmp_path):
    from gpt2dist.training.trainer import Trainer
    from tests.conftest import read_metrics

    run_to_end(Trainer(make_cfg(*tiny_overrides(corpus, tmp_path, "train.precision=fp16", "zero.stage=1",
                                            "train.max_steps=4"))))
    counts = [m["fp16_overflows"] for m in read_metrics(tmp_path)]
    assert len(counts) == 4 and all(isinstance(c, int) for c in counts)
    assert counts == sorted(counts)  # DeepSpeed's count of steps its loss scaler skipped, cumulative
