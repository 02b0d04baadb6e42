"""Training through the real DeepSpeed engine, in this process: precisions, checkpointing, resume."""

import json
import math
import shutil

import pytest
import torch

from gpt2dist.training.checkpoint import CHECKPOINTS, STALL_WRITE, CheckpointError, latest_tag
from gpt2dist.config import ConfigError
from gpt2dist.training.optim import lr_factor
from gpt2dist.training.trainer import Trainer
from gpt2dist.models.weights import WeightsError
from tests.conftest import TINY, fp16_supported, make_cfg, needs_fp16, run_train, tiny_overrides, train


def losses(metrics):
    return [m["loss"] for m in metrics if "loss" in m]


@pytest.mark.parametrize("extra", [
    ["train.precision=fp32"],
    ["train.precision=bf16"],
    pytest.param(["train.precision=fp16", "zero=stage1"], marks=needs_fp16),
    ["train.gradient_checkpointing=true", "train.loss_chunk=100"],
    ["zero=stage2", "zero.offload_optimizer=true"],
    ["zero=offload"],
], ids=["fp32", "bf16", "fp16", "grad-ckpt+loss-chunk", "offload-opt", "offload-all"])
def test_few_steps_learn(corpus, tmp_path, extra):
    metrics = train(corpus, tmp_path, "train.max_steps=6", "optim.lr=3e-3", *extra)
    loss = losses(metrics)
    assert len(loss) == 6 and all(torch.isfinite(torch.tensor(loss)))
    assert min(loss[3:]) < loss[0] - 0.2, loss  # 6 steps at a high learning rate: clearly down from ~10.8
    assert all(m["grad_norm"] > 0 for m in metrics if "loss" in m)
    assert [m["step"] for m in metrics if "val_loss" in m] == [2, 4, 6]
    assert latest_tag(tmp_path) == "step_00000006"


def test_memory_savers_do_not_change_the_loss(corpus, tmp_path):
    """Gradient checkpointing and the chunked loss recompute what they drop: the same losses."""
    plain = losses(train(corpus, tmp_path / "a"))
    ckpt = losses(train(corpus, tmp_path / "b", "train.gradient_checkpointing=true", "train.loss_chunk=100"))
    assert plain == pytest.approx(ckpt, abs=1e-5)


def test_compiled_run_matches_eager_and_resumes_eagerly(corpus, tmp_path):
    """train.compile=true trains the same model (same losses), and its checkpoints keep the
    parameter names, so a compiled run's step-2 checkpoint continues without compile."""
    eager = losses(train(corpus, tmp_path / "eager", "train.sample_tokens=0"))
    compiled = losses(train(corpus, tmp_path / "compiled", "train.compile=true", "train.sample_tokens=0"))
    assert compiled == pytest.approx(eager, rel=1e-4)
    shutil.rmtree(tmp_path / "compiled" / CHECKPOINTS / "step_00000004")
    resumed = losses(train(corpus, tmp_path / "compiled", "train.sample_tokens=0"))
    assert resumed == pytest.approx(eager, rel=1e-4)


def test_grad_norm_is_taken_before_clipping_and_only_once(corpus, tmp_path, monkeypatch):
    """At ZeRO 0 in fp32, the logged norm is the one DeepSpeed clips with (kept, not computed a
    second time), and it is the norm before clipping: step 1's gradients do not depend on the
    clipping threshold, so a run clipping hard logs the same step-1 norm as one that never clips."""
    unclipped = train(corpus, tmp_path / "unclipped", "train.max_steps=2", "optim.grad_clip=0")[0]
    own_norms = []
    get_total_norm = torch.nn.utils.get_total_norm
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda *a, **k: own_norms.append(1) or get_total_norm(*a, **k))
    clipped = train(corpus, tmp_path / "clipped", "train.max_steps=2", "optim.grad_clip=0.01")[0]
    assert own_norms == []  # DeepSpeed's norm was reported, none of our own
    assert clipped["step"] == unclipped["step"] == 1
    assert clipped["grad_norm"] == pytest.approx(unclipped["grad_norm"], rel=1e-6)
    assert clipped["grad_norm"] > 1  # before clipping: far above the 0.01 it was clipped to


def test_metrics_and_schedule(corpus, tmp_path):
    metrics = train(corpus, tmp_path, "train.max_steps=6", "optim.warmup_steps=2", "optim.lr=1e-3",
                    "optim.min_lr=1e-4")
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    assert [m["tokens"] for m in steps] == [128 * s for s in range(1, 7)]  # 4 sequences x 32 tokens
    # Each step logs the rate its update used: step 1 is the first of 2 warmup steps, then cosine.
    optim = make_cfg(*tiny_overrides(corpus, tmp_path, "optim.warmup_steps=2", "optim.lr=1e-3",
                                     "optim.min_lr=1e-4")).optim
    assert [m["lr"] for m in steps] == pytest.approx([1e-3 * lr_factor(s - 1, optim, 6) for s in range(1, 7)])
    assert steps[0]["lr"] == pytest.approx(5e-4) and steps[1]["lr"] == pytest.approx(1e-3)
    assert all(m["tokens_per_s"] > 0 for m in steps)
    # On a CPU too: against its torch.mm peak, measured at start-up (a busy machine can make it look lower).
    assert all(0 < m["mfu"] < 1.5 for m in steps)
    saved = (tmp_path / CHECKPOINTS / "step_00000006" / "config.yaml").read_text()
    assert "max_steps: 6" in saved


@pytest.mark.parametrize("extra", [[], ["zero.stage=2"], ["train.async_checkpoint=false"]],
                         ids=["background-save", "background-save-zero2", "synchronous-save"])
def test_resume_continues_exactly(corpus, tmp_path, extra):
    """Resuming from the step-3 checkpoint reproduces steps 4-6 of the uninterrupted run, whether the
    checkpoints were written in the background (snapshots of the state) or not."""
    settings = ["train.max_steps=6", "train.ckpt_interval=3", "model.dropout=0.1", *extra]
    full = train(corpus, tmp_path / "full", *settings)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)
    shutil.rmtree(resumed_dir / CHECKPOINTS / "step_00000006")
    resumed = train(corpus, resumed_dir, *settings)
    assert [m["step"] for m in resumed] == [m["step"] for m in full]  # no duplicated or missing lines
    for a, b in zip(full, resumed):
        assert a.keys() == b.keys()
        for key in ("loss", "val_loss", "grad_norm", "lr", "tokens"):
            if key in a:
                assert a[key] == b[key], (a["step"], key)  # bit-identical, dropout included


def test_resume_never_refuses_existing_checkpoints(corpus, tmp_path):
    train(corpus, tmp_path)
    with pytest.raises(ConfigError, match="train.resume=auto"):
        Trainer(make_cfg(*tiny_overrides(corpus, tmp_path, "train.resume=never")))


def test_resume_with_another_model_shape_is_refused(corpus, tmp_path):
    """Refused before anything is written: the good run's config and metrics stay as they were,
    and the message says how to start from its weights (another directory: resuming comes first)."""
    train(corpus, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    with pytest.raises(CheckpointError, match=r"n_embd.*train.run_dir=<a new directory> train.init_from="):
        Trainer(make_cfg(*tiny_overrides(corpus, tmp_path, "model.n_embd=64")))
    with pytest.raises(ConfigError, match="data.path"):
        Trainer(make_cfg(*tiny_overrides(corpus, tmp_path, "data=custom", "data.path=???")))
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


@pytest.mark.skipif(fp16_supported(), reason="this machine runs fp16; the refusal is for those that cannot")
def test_fp16_where_unsupported_is_one_error_line_suggesting_bf16(corpus, tmp_path):
    result = run_train(tiny_overrides(corpus, tmp_path / "run", "train.precision=fp16", "zero=stage1"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: train.precision=fp16 is not supported on this cpu device; use train.precision=bf16"]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_finished_run_does_nothing(corpus, tmp_path, capsys):
    train(corpus, tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    train(corpus, tmp_path)
    assert "already complete at step 4" in capsys.readouterr().out
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_wandb_offline_writes_a_run(corpus, tmp_path):
    train(corpus, tmp_path, "logger.wandb=offline")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    run_id = (tmp_path / "wandb_id").read_text().strip()
    assert runs[0].name.endswith(run_id)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4


@pytest.mark.parametrize("signame", ["SIGUSR1", "SIGTERM"])
def test_stop_signal_checkpoints_and_exits_for_requeue(corpus, tmp_path, signame, monkeypatch):
    """SIGUSR1 (SLURM's warning) or SIGTERM (preemption) mid-run: the step finishes, a checkpoint
    is saved (its background write held back half a second: the stop waits for it), and the resumed
    run ends exactly where an uninterrupted one does."""
    import os
    import signal

    from gpt2dist.training.preemption import EXIT_REQUEUE

    full = train(corpus, tmp_path / "full", "train.max_steps=5", "train.ckpt_interval=0")
    monkeypatch.setenv(STALL_WRITE, "step_00000001:0.5")
    trainer = Trainer(make_cfg(*tiny_overrides(corpus, tmp_path / "cut", "train.max_steps=5", "train.ckpt_interval=0")))
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        os.kill(os.getpid(), getattr(signal, signame))
        assert trainer.train() == EXIT_REQUEUE
        assert latest_tag(tmp_path / "cut") == "step_00000001"  # published before train() returned
    finally:
        trainer.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    resumed = train(corpus, tmp_path / "cut", "train.max_steps=5", "train.ckpt_interval=0")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
    assert resumed[-1]["loss"] == full[-1]["loss"] and resumed[-1]["val_loss"] == full[-1]["val_loss"]


def test_evals_during_training_are_logged(corpus, tmp_path):
    metrics = train(corpus, tmp_path, "evals.interval=2", f"evals.corpus={corpus}", "evals.sequences=8")
    logged = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in logged] == [2, 4]
    for m in logged:  # the same 8 validation windows as val_loss, scored by gpt2dist.evaluate
        assert m["eval_loss"] == pytest.approx(m["val_loss"], abs=1e-4)
        assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-4)


def test_init_from_starts_from_another_runs_weights(corpus, tmp_path):
    first = train(corpus, tmp_path / "a", "train.max_steps=6", "optim.lr=3e-3")
    second = train(corpus, tmp_path / "b", f"train.init_from={tmp_path / 'a'}", "train.eval_interval=1",
                   "optim.lr=1e-9", "optim.min_lr=1e-10")
    # b evaluates a's final weights before its first step, and (negligible learning rate) after it;
    # a fresh model would be ~10.8.
    assert second[0]["step"] == 0 and second[0]["val_loss"] == pytest.approx(first[-1]["val_loss"], abs=1e-6)
    assert second[1]["val_loss"] == pytest.approx(first[-1]["val_loss"], abs=1e-3)
    assert second[1]["lr"] == pytest.approx(0.5e-9)  # its own schedule (warmup step 1 of 2), not a's
    with pytest.raises(WeightsError, match="does not match"):
        Trainer(make_cfg(*tiny_overrides(corpus, tmp_path / "c", f"train.init_from={tmp_path / 'a'}",
                                         "model.n_embd=64")))


def test_resumed_run_continues_the_same_wandb_run(corpus, tmp_path):
    train(corpus, tmp_path, "logger.wandb=offline", "train.max_steps=4", "train.ckpt_interval=2")
    run_id = (tmp_path / "wandb_id").read_text().strip()
    shutil.rmtree(tmp_path / CHECKPOINTS / "step_00000004")  # as if it died after step 2's checkpoint
    metrics = train(corpus, tmp_path, "logger.wandb=offline", "train.max_steps=4", "train.ckpt_interval=2")
    assert (tmp_path / "wandb_id").read_text().strip() == run_id
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and all(run_id in r.name for r in runs)  # one W&B run id, however often resumed (a second
    # start within the same second gets a "-1" suffix on its directory)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]


def test_wandb_online_without_network_falls_back_to_offline(corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # no key and no network here: online cannot start
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    metrics = train(corpus, tmp_path, "logger.wandb=online")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_corpus_without_validation_trains_with_validation_off(tmp_path, capsys):
    """A corpus prepared with --val-fraction 0 has an empty val split: it trains, without val_loss, with a warning."""
    from gpt2dist.data.builtin_corpus import documents
    from gpt2dist.data.prepare import prepare_corpus

    docs = [d for _, d in zip(range(30), documents("pydoc"))]
    prepare_corpus(docs, tmp_path / "corpus", source="pydoc", val_fraction=0, block_tokens=256, progress=False,
                   workers=1)
    metrics = train(tmp_path / "corpus", tmp_path / "run")
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert not any("val_loss" in m for m in metrics)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"warning: {tmp_path / 'corpus'}: the val split has no window of 32 tokens: "
                                  "validation of ") and " is off " in warnings[0]


def test_held_out_corpus_is_refused_for_training(tmp_path):
    """A corpus prepared with --val-fraction 1 has no training text: one clear error, not an assertion."""
    from gpt2dist.data.builtin_corpus import documents
    from gpt2dist.data.prepare import prepare_corpus
    from gpt2dist.data.shards import CorpusError

    docs = [d for _, d in zip(range(10), documents("pydoc"))]
    prepare_corpus(docs, tmp_path / "held-out", source="pydoc", val_fraction=1, block_tokens=256, progress=False,
                   workers=1)
    with pytest.raises(CorpusError, match="held-out: the train split is empty .* give it weight 0 to evaluate it"):
        Trainer(make_cfg(*tiny_overrides(tmp_path / "held-out", tmp_path / "run")))


def test_resume_over_other_data_is_refused_unless_allowed(corpus, code_corpus, tmp_path):
    """The checkpoint's sample count points into its own data stream: another corpus, window
    length or seed is refused (before anything is written); the same corpus moved elsewhere is not."""
    run_dir = tmp_path / "run"
    train(corpus, run_dir, "train.max_steps=2")
    for change in ([f"data.path={code_corpus}"], ["data.seq_len=16"], ["train.seed=7"]):
        overrides = [*TINY, f"data.path={corpus}", f"train.run_dir={run_dir}", "train.max_steps=4", *change]
        with pytest.raises(CheckpointError, match=r"data differs from the checkpoint's in .*allow_data_change=true"):
            Trainer(make_cfg(*overrides))
    moved = tmp_path / "moved"
    shutil.copytree(corpus, moved)
    assert [m["step"] for m in train(moved, run_dir, "train.max_steps=3")] == [1, 2, 3]
    changed = train(moved, run_dir, "train.max_steps=4", "data.seq_len=16", "train.allow_data_change=true")
    assert [m["step"] for m in changed] == [1, 2, 3, 4]
