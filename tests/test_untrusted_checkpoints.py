"""A checkpoint file that holds pickled code is refused, wherever gpt2dist or DeepSpeed reads it.

Each test poisons one file of a real checkpoint as an attacker would (the file and checkpoint.json's
size and SHA-256 for it) with an object whose unpickling writes a marker file, then runs one command
on it: the command must exit 2 with one `error:` line naming the file, and the marker must not appear.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from gpt2dist import safe_load
from gpt2dist.training.checkpoint import CHECKPOINTS, MANIFEST, CheckpointError
from gpt2dist.commands.evaluate import main as evaluate_main
from gpt2dist.commands.export import main as export_main
from gpt2dist.commands.generate import main as generate_main
from gpt2dist.commands.lmeval import main as lmeval_main
from gpt2dist.fileio import sha256_of
from gpt2dist.models.weights import find_checkpoint
from gpt2dist.training.trainer import Trainer
from tests.conftest import make_cfg, run_train, tiny_overrides, train

MODEL_STATES = "mp_rank_00_model_states.pt"
RANK1_OPTIM_STATES = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


class WritesMarker:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    """Two-step runs: ZeRO 0 in this process, ZeRO 2 on 2 ranks (each rank's optimizer shard in its own file)."""
    dirs = {"stage0": tmp_path_factory.mktemp("stage0"), "stage2": tmp_path_factory.mktemp("stage2")}
    train(corpus, dirs["stage0"], "train.max_steps=2", "train.sample_tokens=0")
    result = run_train(tiny_overrides(corpus, dirs["stage2"], "train.max_steps=2", "train.sample_tokens=0",
                                      "zero=stage2"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return dirs


def poison(run: Path, name: str, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a run whose file `name` also holds a WritesMarker; returns (run copy, that file)."""
    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    ckpt = find_checkpoint(run_dir)
    path = ckpt / name
    state = safe_load.load(path, RuntimeError)
    state["extra"] = WritesMarker(tmp_path / "marker")
    torch.save(state, path)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][name] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    return run_dir, path


def assert_refused(status: int, stderr: str, path: Path, tmp_path: Path, nproc: int = 0) -> None:
    """Refused with one `error:` line naming the file and exit 2 (under torchrun: by each rank that got to say
    so before torchrun stopped the others), and the marker is absent."""
    assert not (tmp_path / "marker").exists(), "the pickled code ran"
    expected = (f"error: {path}: refused: it holds builtins.exec, which is neither a tensor nor part of a DeepSpeed "
                "checkpoint; loading it could run code")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if nproc:
        assert status != 0 and "(exitcode: 2)" in stderr and 1 <= len(errors) <= nproc, stderr[-3000:]
    else:
        assert status == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert set(errors) == {expected}


@pytest.mark.parametrize("run,name,nproc", [
    ("stage0", MODEL_STATES, 0),
    ("stage2", RANK1_OPTIM_STATES, 2),  # rank 0's files are clean: every rank must still refuse, none hang
    ("stage2", "rng_rank0.pt", 2),
])
def test_resume_refuses(corpus, runs, tmp_path, run, name, nproc):
    run_dir, path = poison(runs[run], name, tmp_path)
    zero = ["zero=stage2"] if run == "stage2" else []
    result = run_train(tiny_overrides(corpus, run_dir, "train.max_steps=4", *zero), nproc=nproc, timeout=300)
    assert_refused(result.returncode, result.stderr, path, tmp_path, nproc)
    assert "step 3/4" not in result.stdout


@pytest.mark.parametrize("run,name,extra", [
    ("stage0", MODEL_STATES, []),
    ("stage2", RANK1_OPTIM_STATES, []),
    ("stage2", MODEL_STATES, ["train.init_optimizer=true", "zero=stage2"]),
], ids=["init_from-stage0", "init_from-stage2", "init_optimizer-stage2"])
def test_init_from_refuses(corpus, runs, tmp_path, run, name, extra):
    source, path = poison(runs[run], name, tmp_path)
    nproc = 2 if extra else 0  # the same world size as the checkpoint, to take its optimizer state
    result = run_train(tiny_overrides(corpus, tmp_path / "new", f"train.init_from={source}", *extra),
                       nproc=nproc, timeout=300)
    assert_refused(result.returncode, result.stderr, path, tmp_path, nproc)


COMMANDS = {
    "export": lambda model, tmp_path, corpus: export_main([model, str(tmp_path / "exported")]),
    "generate": lambda model, tmp_path, corpus: generate_main([model, "--prompt", "x", "--device", "cpu"]),
    "evaluate": lambda model, tmp_path, corpus: evaluate_main([model, "--corpus", str(corpus), "--device", "cpu"]),
    # a task lm-eval knows (names are checked first); the model is refused before any of its data is read
    "lmeval": lambda model, tmp_path, corpus: lmeval_main([model, "--tasks", "hellaswag", "--device", "cpu"]),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("run,name", [("stage0", MODEL_STATES), ("stage2", MODEL_STATES),
                                      ("stage2", RANK1_OPTIM_STATES)])
def test_commands_refuse(corpus, runs, tmp_path, capsys, command, run, name):
    run_dir, path = poison(runs[run], name, tmp_path)
    status = COMMANDS[command](str(run_dir), tmp_path, corpus)
    assert_refused(status, capsys.readouterr().err, path, tmp_path)
    assert not (tmp_path / "exported").exists()


def test_deepspeed_reads_a_checkpoint_only_as_weights(corpus, tmp_path):
    """Behind the check of every file on resume, DeepSpeed's own reads are held to weights_only as well."""
    trainer = Trainer(make_cfg(*tiny_overrides(corpus, tmp_path / "genuine", "train.max_steps=2", "zero=stage1")))
    try:
        trainer.train()
        run_dir, path = poison(tmp_path / "genuine", "zero_pp_rank_0_mp_rank_00_optim_states.pt", tmp_path)
        with pytest.raises(CheckpointError, match=f"{path}: refused: it holds builtins.exec"):
            with safe_load.only_weights(CheckpointError):
                trainer.engine.load_checkpoint(str(run_dir / CHECKPOINTS), tag=path.parent.name)
    finally:
        trainer.close()
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("zero", [["zero=stage1"], ["zero=stage3", "train.precision=bf16"], ["zero=offload"]],
                         ids=["stage1", "stage3-bf16", "offload"])
def test_genuine_checkpoints_still_resume(corpus, tmp_path, zero):
    """Every DeepSpeed class a real checkpoint holds is allowed (stage 0 resumes in test_train and test_faults;
    stage 2 saves through the same optimizer as stage 1)."""
    train(corpus, tmp_path, "train.max_steps=2", "train.sample_tokens=0", *zero)
    metrics = train(corpus, tmp_path, "train.max_steps=3", "train.sample_tokens=0", *zero)
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
