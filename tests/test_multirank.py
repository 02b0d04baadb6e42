"""Two ranks under torchrun (gloo on CPU): every ZeRO stage matches one process with the same
global batch, because the global sample order does not depend on the world size."""

import pytest

from gpt2dist.training.checkpoint import CHECKPOINTS
from tests.conftest import TWO_RANK_STEPS as STEPS, read_metrics, run_train, tiny_overrides


@pytest.fixture(scope="module")
def single_process(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    # micro-batch 2 x 2 accumulation steps = global batch 4
    result = run_train(tiny_overrides(corpus, run_dir, *STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(run_dir)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_match_one_process(two_rank_run, single_process, stage):
    # micro-batch 2 x 2 ranks = global batch 4
    result, run_dir = two_rank_run(stage)
    assert "rank 0 of 2" in result.stdout and "launcher torchrun" in result.stdout
    assert result.stdout.count("model gpt2-tiny") == 1  # rank 0 alone prints
    two = read_metrics(run_dir)
    assert [m["step"] for m in two] == [m["step"] for m in single_process]
    for a, b in zip(two, single_process):
        for key, rel in (("loss", 1e-5), ("val_loss", 1e-5), ("grad_norm", 1e-3)):
            if key in b:  # ZeRO reduces in another order: equal up to float rounding
                assert a[key] == pytest.approx(b[key], rel=rel), (a["step"], key)
    ckpt = run_dir / CHECKPOINTS / "step_00000004"
    assert {p.name for p in ckpt.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    assert len(list(ckpt.glob("*zero_pp_rank_1_*optim_states.pt"))) == 1  # rank 1 holds its shard


def test_ranks_with_different_run_directories_are_refused(corpus, tmp_path):
    """A run directory that resolves differently per rank (here through $RANK) would scatter one
    checkpoint over two places; it is refused at start-up instead of hanging at the first save."""
    result = run_train([*tiny_overrides(corpus, tmp_path, *STEPS), f"train.run_dir={tmp_path}/${{oc.env:RANK}}"],
                       nproc=2, timeout=300)
    assert result.returncode != 0
    assert "error: train.run_dir differs between ranks" in result.stderr
    assert not list(tmp_path.glob("*/checkpoints/step_*"))
