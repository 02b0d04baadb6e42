"""Golden curves: a few steps of each task on a fixed corpus, every logged number (and the test split's
scores) compared with a file in tests/assets/.

- pretrain: the default configuration (gpt2-tiny, fp32, ZeRO 0, one process) on the test corpus;
- sft: full fine-tuning of a tiny Hugging Face GPT-2 on reverse-a-word examples (loss, val_loss,
  val_bleu, val_chrf, test.json);
- classify: the same base fine-tuned to name a word's kind (loss, val_loss, val_accuracy, val_macro_f1,
  test.json).

Anything that changes numerics (initialisation, data order, schedule, optimizer, loss, the scores)
fails here. Update the files only on purpose, in a commit of its own:

    GPT2DIST_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

Tolerance: relative 1e-5. The runs are deterministic on one machine, but CPUs differ (the matmul
kernels, hence the order of summation, depend on the instruction set), which moves fp32 results in
the 6th-7th digit; a real change of numerics moves them in the 2nd-4th.
"""

import json
import os
from pathlib import Path

import pytest

from tests.conftest import train_cfg
from tests.test_classify import cls_corpus, cls_overrides  # noqa: F401 (fixtures)
from tests.test_finetune import hf_base, sft_corpus, sft_overrides  # noqa: F401 (fixtures)

ASSETS = Path(__file__).resolve().parent / "assets"
RELATIVE = 1e-5
UPDATE = os.environ.get("GPT2DIST_UPDATE_GOLDEN") == "1"

# Only what a test must change: the length, and what is logged. (The corpus, base and run directory come
# from the fixtures.)
GOLDEN = {
    "pretrain": {"asset": "golden_loss.json", "keys": ("loss", "lr", "grad_norm", "val_loss"),
                 "overrides": ["train.max_steps=6", "optim.warmup_steps=2", "train.eval_interval=3",
                               "train.ckpt_interval=0", "logger.log_interval=1", "logger.wandb=disabled",
                               "train.sample_tokens=0"]},
    "sft": {"asset": "golden_sft.json", "keys": ("loss", "lr", "grad_norm", "val_loss", "val_bleu", "val_chrf"),
            "overrides": ["train.max_steps=4", "train.eval_interval=2", "train.ckpt_interval=0",
                          "optim.lr=3e-3", "optim.warmup_steps=1"]},
    "classify": {"asset": "golden_classify.json",
                 "keys": ("loss", "lr", "grad_norm", "val_loss", "val_accuracy", "val_macro_f1"),
                 "overrides": ["train.max_steps=4", "train.eval_interval=2", "train.ckpt_interval=0"]},
}


def golden_run(task: str, request, run_dir: Path) -> dict:
    """The task's run: its logged keys by step, and test.json where the task writes one."""
    spec = GOLDEN[task]
    if task == "pretrain":
        overrides = [f"data.path={request.getfixturevalue('corpus')}", f"train.run_dir={run_dir}"]
    elif task == "sft":
        overrides = sft_overrides(request.getfixturevalue("sft_corpus"), request.getfixturevalue("hf_base"), run_dir)
    else:
        overrides = cls_overrides(request.getfixturevalue("cls_corpus"), request.getfixturevalue("hf_base"), run_dir)
    metrics = train_cfg([*overrides, *spec["overrides"]], run_dir)
    test = run_dir / "test.json"
    return {"overrides": spec["overrides"],
            "metrics": [{"step": m["step"], **{k: m[k] for k in spec["keys"] if k in m}} for m in metrics
                        if any(k in m for k in spec["keys"])],
            **({"test": json.loads(test.read_text())} if test.is_file() else {})}


def assert_close(got, expected, where: str) -> None:
    """Numbers within RELATIVE, everything else equal, key for key."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_close(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_close(g, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=RELATIVE), where
    else:
        assert got == expected, where


@pytest.mark.parametrize("task", GOLDEN)
def test_golden_curve(task, request, tmp_path):
    asset = ASSETS / GOLDEN[task]["asset"]
    got = golden_run(task, request, tmp_path / "run")
    if UPDATE:
        asset.write_text(json.dumps(got, indent=1) + "\n")
        pytest.skip(f"wrote {asset}")
    expected = json.loads(asset.read_text())
    assert expected["overrides"] == GOLDEN[task]["overrides"], "the asset was made with other overrides: update it on purpose"
    assert_close(got, expected, task)
