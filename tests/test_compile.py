"""train.compile=true: the compiled training step learns what the eager one does, validation and
sampling run eager beside it (nothing recompiles for them), its checkpoints resume without compile,
and a combination that cannot compile says so in one line and trains eager."""

import shutil

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

from gpt2dist.training.checkpoint import CHECKPOINTS
from gpt2dist.training.trainer import Trainer
from tests.conftest import make_cfg, read_metrics, run_to_end, tiny_overrides, train

EAGER_LINE = "train.compile=true: "
LINEAR = torch.nn.functional.linear  # as torch has it, before any ZeRO-3 engine


def losses(metrics, key="loss"):
    return [m[key] for m in metrics if key in m]


def samples(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("sample: ")]


def test_compiled_run_matches_eager_validates_samples_and_resumes_eagerly(corpus, tmp_path, capsys):
    """One compiled run with gradient checkpointing and the chunked loss, validating every 2 steps and
    sampling at the end, against the plain eager run (the memory savers do not change the loss,
    test_train): the same losses, validation losses and sample. Validating and sampling again after
    the run compiles no graph: they run eager. Its step-2 checkpoint continues without compile."""
    eager = train(corpus, tmp_path / "eager")
    eager_sample = samples(capsys.readouterr().out)
    run_dir = tmp_path / "compiled"
    trainer = Trainer(make_cfg(*tiny_overrides(corpus, run_dir, "train.compile=true",
                                               "train.gradient_checkpointing=true", "train.loss_chunk=40")))
    try:
        assert trainer.engine.is_compiled
        trainer.train()
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0  # the training forward was compiled
        trainer.validate()
        trainer.sample()  # 4 tokens through the KV cache: a new shape at every step
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        trainer.close()
    out = capsys.readouterr().out
    assert EAGER_LINE not in out
    compiled = read_metrics(run_dir)
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
    assert losses(compiled, "val_loss") == pytest.approx(losses(eager, "val_loss"), rel=1e-4)
    assert samples(out) == eager_sample * 2 and len(eager_sample) == 1

    shutil.rmtree(run_dir / CHECKPOINTS / "step_00000004")
    resumed = train(corpus, run_dir)
    assert losses(resumed) == pytest.approx(losses(eager), rel=1e-4)


@pytest.mark.parametrize("extra, line", [
    (["zero=stage3"], "ZeRO stage 3's parameter hooks do not compile: training eager"),
    ([], "no C++ compiler (/nonexistent/g++) for torch.compile on the CPU: training eager"),
], ids=["zero3", "no-compiler"])
def test_what_cannot_compile_says_so_in_one_line_and_trains_eager(corpus, tmp_path, capsys, extra, line):
    compiler = {} if extra else {"cpp.cxx": (None, "/nonexistent/g++")}  # $CXX=/nonexistent/g++
    with inductor_config.patch(compiler):
        trainer = Trainer(make_cfg(*tiny_overrides(corpus, tmp_path, "train.compile=true", "train.max_steps=2",
                                                   "train.sample_tokens=0", *extra)))
    assert not trainer.engine.is_compiled
    run_to_end(trainer)
    said = [text for text in capsys.readouterr().out.splitlines() if text.startswith(EAGER_LINE)]
    assert said == [EAGER_LINE + line]
    assert len(losses(read_metrics(tmp_path))) == 2
    assert torch.nn.functional.linear is LINEAR  # ZeRO-3's replacement is put back when the trainer closes
