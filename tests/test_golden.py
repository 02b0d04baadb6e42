"""The golden loss curve: the default configuration (gpt2-tiny, fp32, ZeRO 0, one process) on the
test corpus for a few steps, every logged number compared with tests/assets/golden_loss.json.

Anything that changes numerics (initialisation, data order, schedule, optimizer, loss) fails
here. Update the file only on purpose, in a commit of its own:

    python -m tests.test_golden --update

Tolerance: relative 1e-5. The run is deterministic on one machine, but CPUs differ (the
matmul kernels, hence the order of summation, depend on the instruction set), which moves fp32
results in the 6th-7th digit; a real change of numerics moves them in the 2nd-4th.
"""

import json
import sys
from pathlib import Path

import pytest

ASSET = Path(__file__).resolve().parent / "assets" / "golden_loss.json"
# Only what a test must change: the corpus, the run directory, the length, and what is logged.
OVERRIDES = ["train.max_steps=6", "optim.warmup_steps=2", "train.eval_interval=3", "train.ckpt_interval=0", "logger.log_interval=1",
             "logger.wandb=disabled", "train.sample_tokens=0"]
KEYS = ("loss", "lr", "grad_norm", "val_loss")
RELATIVE = 1e-5


def golden_run(corpus: Path, run_dir: Path) -> list[dict]:
    from tests.conftest import train_cfg

    metrics = train_cfg([f"data.path={corpus}", f"train.run_dir={run_dir}", *OVERRIDES], run_dir)
    return [{"step": m["step"], **{k: m[k] for k in KEYS if k in m}} for m in metrics]


def test_golden_loss_curve(corpus, tmp_path):
    expected = json.loads(ASSET.read_text())
    assert expected["overrides"] == OVERRIDES, "the asset was made with other overrides: update it on purpose"
    got = golden_run(corpus, tmp_path)
    assert [m["step"] for m in got] == [m["step"] for m in expected["metrics"]]
    for g, e in zip(got, expected["metrics"]):
        assert g.keys() == e.keys(), g["step"]
        for key in KEYS:
            if key in e:
                assert g[key] == pytest.approx(e[key], rel=RELATIVE), (g["step"], key)


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    import tempfile

    from gpt2dist.data.builtin_corpus import documents
    from gpt2dist.data.prepare import prepare_corpus

    with tempfile.TemporaryDirectory() as tmp:
        # The same corpus as tests/conftest.py's `corpus` fixture.
        corpus = Path(tmp) / "pydoc"
        prepare_corpus(documents("pydoc"), corpus, source="pydoc", val_fraction=0.1, block_tokens=256, progress=False)
        metrics = golden_run(corpus, Path(tmp) / "run")
    ASSET.write_text(json.dumps({"overrides": OVERRIDES, "metrics": metrics}, indent=1) + "\n")
    print(f"wrote {ASSET}")
