"""Elastic resume at ZeRO 1-3: a checkpoint whose optimizer state is sharded over 2 ranks continues on 1,
and one from 1 rank on 2, with the same global batch, through DeepSpeed's universal form.

What must hold: the continued losses match the uninterrupted run's (rel 1e-5, which is what 2 ranks
against 1 process already differ by, since the reductions run in another order; in practice they are
equal to the last bit in fp32; in bf16 rel 1e-3, since at ZeRO 2 two ranks average their gradients in
bf16, which one process never does: the gradient norm then moves by about 1e-4), the sample stream continues at the saved count
(same tokens, same losses: no sample repeated or skipped), the conversion is made once, beside the
original, whose files stay as they were.
"""

import pytest
import torch

from gpt2dist import safe_load
from gpt2dist.training import checkpoint
from gpt2dist.training.checkpoint import CHECKPOINTS, UNIVERSAL, CheckpointError
from gpt2dist.training.trainer import Trainer
from tests.conftest import (TWO_RANK_STEPS as STEPS, make_cfg, read_metrics, rewind, run_to_end, run_train,
                            tiny_overrides)
from tests.test_untrusted_checkpoints import WritesMarker

RESUMED_STEP = 2
GLOBAL_BATCH = 4  # TINY's train.global_batch_size


def assert_continues(reference: list[dict], resumed: list[dict], rel: float) -> None:
    """The resumed run logged every step once, and from the resume on the reference's tokens and losses."""
    assert [m["step"] for m in resumed] == [m["step"] for m in reference] == [1, 2, 3, 4]
    for a, b in zip(reference[RESUMED_STEP:], resumed[RESUMED_STEP:]):
        assert b["tokens"] == a["tokens"], a["step"]
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel), (a["step"], key)


def assert_original_untouched(ckpt_dir) -> None:
    """Every file the checkpoint's manifest lists is as written (size and SHA-256), its universal form sits
    beside them, and no partial conversion is left."""
    manifest = checkpoint.verify(ckpt_dir)
    assert {p.name for p in ckpt_dir.iterdir()} == {*manifest["files"], checkpoint.MANIFEST, UNIVERSAL}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_resume_on_one(corpus, two_rank_run, tmp_path, capsys, stage):
    _, full = two_rank_run(stage)
    run_dir = rewind(full, tmp_path / "run", RESUMED_STEP)
    trainer = Trainer(make_cfg(*tiny_overrides(corpus, run_dir, *STEPS, f"zero.stage={stage}")))
    assert trainer.samples == RESUMED_STEP * GLOBAL_BATCH  # the stream seeks to the saved count
    run_to_end(trainer)
    out = capsys.readouterr().out
    ckpt = run_dir / CHECKPOINTS / f"step_{RESUMED_STEP:08d}"
    assert (f"elastic resume: {ckpt} was saved by 2 ranks, this run has 1: loading its universal form "
            f"(converted in ") in out
    assert_continues(read_metrics(full), read_metrics(run_dir), rel=1e-5)
    assert trainer.samples == 4 * GLOBAL_BATCH
    assert_original_untouched(ckpt)
    assert checkpoint.read_manifest(run_dir / CHECKPOINTS / "step_00000004")["world_size"] == 1


@pytest.mark.parametrize("saved,stage", [(2, 1), (1, 2)])
def test_another_zero_stage_resumes_through_the_universal_form(corpus, two_rank_run, tmp_path, capsys, saved, stage):
    """A ZeRO-2 checkpoint of 2 ranks continues on 1 rank at ZeRO 1, and a ZeRO-1 one at ZeRO 2: the universal
    form holds each parameter's fp32 weights and Adam moments whole, whatever sharded them."""
    _, full = two_rank_run(saved)
    run_dir = rewind(full, tmp_path / "run", RESUMED_STEP)
    run_to_end(Trainer(make_cfg(*tiny_overrides(corpus, run_dir, *STEPS, f"zero.stage={stage}"))))
    assert (f"was saved by 2 ranks at ZeRO stage {saved}, this run has 1 at ZeRO stage {stage}: loading its "
            "universal form") in capsys.readouterr().out
    assert_continues(read_metrics(full), read_metrics(run_dir), rel=1e-5)
    assert checkpoint.read_manifest(run_dir / CHECKPOINTS / "step_00000004")["zero_stage"] == stage


@pytest.mark.parametrize("stage", [0, 3])
def test_zero_stage_change_deepspeed_cannot_load_is_refused_naming_both(corpus, two_rank_run, tmp_path, stage):
    """ZeRO 0 has no sharded state to convert, and DeepSpeed's ZeRO-3 loader reads only ZeRO-3 files."""
    _, full = two_rank_run(2)
    run_dir = rewind(full, tmp_path / "run", RESUMED_STEP)
    with pytest.raises(CheckpointError, match=f"written by 2 ranks at ZeRO stage 2; this run has 1 ranks at ZeRO "
                                              f"stage {stage}"):
        Trainer(make_cfg(*tiny_overrides(corpus, run_dir, *STEPS, f"zero.stage={stage}")))


@pytest.mark.parametrize("stage,precision", [(1, "fp32"), (2, "bf16"), (3, "bf16")])
def test_one_rank_resumes_on_two(corpus, tmp_path, stage, precision):
    overrides = [*STEPS, f"zero.stage={stage}", f"train.precision={precision}"]
    full = tmp_path / "full"
    run_to_end(Trainer(make_cfg(*tiny_overrides(corpus, full, *overrides))))
    run_dir = rewind(full, tmp_path / "run", RESUMED_STEP)
    result = run_train(tiny_overrides(corpus, run_dir, *overrides), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "was saved by 1 ranks, this run has 2: loading its universal form (converted in " in result.stdout
    assert_continues(read_metrics(full), read_metrics(run_dir), rel=1e-5 if precision == "fp32" else 1e-3)
    assert_original_untouched(run_dir / CHECKPOINTS / f"step_{RESUMED_STEP:08d}")


def test_universal_form_is_made_once_and_read_only_as_weights(corpus, two_rank_run, tmp_path, capsys):
    """A second start on 1 rank reuses the conversion (a crashed one's partial directory is replaced); a
    universal form that holds pickled code is refused, naming the file, like any checkpoint file."""
    _, full = two_rank_run(1)
    run_dir = rewind(full, tmp_path / "run", RESUMED_STEP)
    ckpt = run_dir / CHECKPOINTS / f"step_{RESUMED_STEP:08d}"
    (ckpt / f"{UNIVERSAL}.partial").mkdir()  # as if a conversion had been killed
    cfg = make_cfg(*tiny_overrides(corpus, run_dir, *STEPS, "zero.stage=1"))
    Trainer(cfg).close()
    assert "(converted in " in capsys.readouterr().out
    assert_original_untouched(ckpt)
    Trainer(cfg).close()
    assert "(converted earlier)" in capsys.readouterr().out
    path = ckpt / UNIVERSAL / ckpt.name / "zero" / "transformer.wte.weight" / "exp_avg.pt"
    torch.save({**safe_load.load(path, RuntimeError), "extra": WritesMarker(tmp_path / "marker")}, path)
    with pytest.raises(CheckpointError, match=f"{path}: refused: it holds builtins.exec"):
        Trainer(cfg)
    assert not (tmp_path / "marker").exists()


def test_muon_at_zero0_resumes_on_two_ranks(corpus, tmp_path):
    """A ZeRO-0 Muon state is whole (momenta and AdamW moments by parameter), so a 1-process checkpoint
    continues on 2 ranks as it is. (At ZeRO 1-3 another number of ranks is refused: tests/test_optim.py.)"""
    overrides = [*STEPS, "optim=muon"]
    full = tmp_path / "full"
    run_to_end(Trainer(make_cfg(*tiny_overrides(corpus, full, *overrides))))
    run_dir = rewind(full, tmp_path / "run", RESUMED_STEP)
    result = run_train(tiny_overrides(corpus, run_dir, *overrides), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_continues(read_metrics(full), read_metrics(run_dir), rel=1e-5)
