"""`python train.py` end to end, as a user runs it: the built-in corpus prepared on first use."""

import json

import pytest

from gpt2dist.checkpoint import latest_tag
from tests.conftest import TINY, run_train


@pytest.mark.parametrize("nproc", [0, 2], ids=["plain", "torchrun-2"])
def test_train_on_builtin_corpus(tmp_path, nproc):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    result = run_train([*TINY, f"train.run_dir={run_dir}", f"data.cache_dir={cache}", "data.builtin=pydoc",
                        "train.sample_tokens=8"], nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "tokenizing builtin:pydoc" in result.stderr  # progress while preparing
    assert "model gpt2-tiny: 1,635,744 parameters" in out
    assert out.count("step 4/4") == 1 and "sample: 'The" in out
    assert len(list(cache.glob("builtin-pydoc-py*/manifest.json"))) == 1
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and "val_loss" in metrics[-1]
    assert latest_tag(run_dir) == "step_00000004"
    assert "seq_len: 32" in (run_dir / "config.yaml").read_text()
