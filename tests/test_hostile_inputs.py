"""Hostile inputs, one table: every reader of a file from elsewhere and every writer of an output, each
fed what a careless or malicious source could give it.

Each row (`Case`) builds its inputs in a directory of its own, from valid artifacts made once per
session (`Valid`), then damages them; the command line it returns then runs (all rows in one process,
`tests/hostile_runner.py`, so that Python and torch start once). Every row must:
- exit with status 2, printing exactly one `error:` line that names the file (`names`) and, where one
  is at fault, the key (`key`), and no traceback;
- leave every file and link that was in its directory before byte-identical, and write nothing there
  (only `may_write`, a path the command is allowed to have created before it refused);
- not grow the process's peak memory by more than PEAK_GROWTH_MIB (a header that claims a huge model
  must be refused before anything is allocated).

A new reader or writer adds its rows here: a few lines each.
"""

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, clean_env, tiny_overrides

PEAK_GROWTH_MIB = 512


class Valid:
    """Valid artifacts, each made on first use and then copied by the rows that damage it."""

    def __init__(self, base: Path, corpus: Path):
        self.base, self._corpus, self._made = base, corpus, {}

    def _once(self, name: str, make: Callable[[Path], None]) -> Path:
        if name not in self._made:
            make(self.base / name)
            self._made[name] = self.base / name
        return self._made[name]

    def copy(self, name: str, dest: Path) -> Path:
        """A copy of artifact `name` at dest."""
        shutil.copytree(getattr(self, name)(), dest, symlinks=True)
        return dest

    def corpus(self) -> Path:
        """A prepared pretraining corpus (the suite's pydoc one)."""
        return self._corpus

    def hf(self) -> Path:
        """A tiny Hugging Face GPT-2 directory (config.json, model.safetensors)."""
        def make(out: Path) -> None:
            import torch
            from transformers import GPT2Config, GPT2LMHeadModel

            torch.manual_seed(0)
            GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)).save_pretrained(out)

        return self._once("hf", make)

    def parts(self) -> Path:
        """Inputs (`in/`, two JSON Lines files) and both parts of their preparation in 2 parts (`.out.parts/`),
        made here with relative paths: PARTS_MERGE, run in a copy, merges them."""
        def make(out: Path) -> None:
            (out / "in").mkdir(parents=True)
            for name in ("a", "b"):
                docs = [f"Document {name}{i}: the five boxing wizards jump quickly. " * (1 + i % 4) for i in range(40)]
                (out / "in" / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
            for k in ("0", "1"):
                subprocess.run([sys.executable, "-m", "data_tools.prepare", *PARTS_MERGE[2:-3], "--workers", "1",
                                "--part", k, "--of", "2"], cwd=out, env={**clean_env(), "PYTHONPATH": str(ROOT)},
                               capture_output=True, check=True)

        return self._once("parts", make)


@dataclass(frozen=True)
class Case:
    """One hostile input. `make(d, valid)` writes the inputs under d and returns the command line, as
    `python` takes it (`["-m", "gpt2dist.export", ...]` or `["train.py", ...]`), run with d as the
    working directory; its error line must contain `names` and `key`."""

    id: str
    make: Callable[[Path, Valid], list[str]]
    names: str
    key: str | None = None
    may_write: tuple[str, ...] = ()


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def edit_json(path: Path, change: Callable[[dict], object]) -> Path:
    """Rewrite a JSON file with `change(data)` applied (its return value replaces the data if not None)."""
    data = json.loads(path.read_text())
    changed = change(data)
    path.write_text(json.dumps(data if changed is None else changed))
    return path


GENERATE_HF = ["-m", "gpt2dist.generate", "hf", "--prompt", "The", "--max-new-tokens", "1"]


def hf_config(change: Callable[[dict], object]) -> Callable[[Path, Valid], list[str]]:
    """A row: a Hugging Face directory whose config.json is changed, loaded to generate from."""
    def make(d: Path, valid: Valid) -> list[str]:
        edit_json(valid.copy("hf", d / "hf") / "config.json", change)
        return GENERATE_HF

    return make


# ---- Hugging Face directories (gpt2dist.models.hf) ----
HF_CASES = [
    Case("hf-config-not-json", lambda d, v: (write(v.copy("hf", d / "hf") / "config.json", "{oops"), GENERATE_HF)[1],
         names="hf/config.json"),
    Case("hf-config-other-architecture", hf_config(lambda c: c.update(model_type="llama")), names="hf/config.json",
         key="model_type"),
]

# ---- prepared corpora (gpt2dist.data.shards) ----
CORPUS_CASES = [
    Case("corpus-manifest-missing", lambda d, v: (write(d / "corpus" / "notes.txt", "mine"),
                                                  ["train.py", *TINY, "data.path=corpus", "train.run_dir=run"])[1],
         names="corpus/manifest.json"),
]

# ---- a preparation in parts (data_tools.parts): the merge of damaged or mismatched parts ----
PARTS_MERGE = ["-m", "data_tools.prepare", "in", "--output", "out", "--block-tokens", "16", "--merge", "--of", "2"]


def parts_merge(damage: Callable[[Path], object], *options: str) -> Callable[[Path, Valid], list[str]]:
    """A row: Valid.parts copied here, damage(its parts directory) done, then merged (with `options`)."""
    def make(d: Path, valid: Valid) -> list[str]:
        shutil.copytree(valid.parts(), d, symlinks=True, dirs_exist_ok=True)
        damage(d / ".out.parts")
        return PARTS_MERGE + list(options)

    return make


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-2])


def altered(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(bytes([data[0] ^ 1]) + data[1:])


PART0, PART1 = "part-00000-of-00002", "part-00001-of-00002"
PARTS_CASES = [
    Case("parts-part-missing", parts_merge(lambda p: shutil.rmtree(p / PART1)), names=".out.parts: 1 of 2 parts",
         key="(part 1)"),
    Case("parts-manifest-not-json", parts_merge(lambda p: write(p / PART0 / "part.json", "{oops")),
         names=f"{PART0}/part.json"),
    Case("parts-manifest-without-splits", parts_merge(lambda p: edit_json(p / PART1 / "part.json",
                                                                          lambda m: m.__delitem__("splits"))),
         names=f"{PART1}/part.json", key="splits"),
    Case("parts-other-settings", parts_merge(lambda p: None, "--val-fraction", "0.5"), names=f"{PART0}/part.json",
         key="settings.val_fraction"),
    Case("parts-tokens-truncated", parts_merge(lambda p: truncate(p / PART1 / "train.tokens")),
         names=f"{PART1}/train.tokens", key="splits.train.tokens"),
    Case("parts-tokens-altered", parts_merge(lambda p: altered(p / PART1 / "train.tokens")),
         names=f"{PART1}/train.tokens", key="splits.train.sha256"),
]

CASES = [*HF_CASES, *CORPUS_CASES, *PARTS_CASES]


@pytest.fixture(scope="module")
def outcomes(corpus, tmp_path_factory) -> dict[str, dict]:
    """Every row built, then run in one process; the runner's results by row id."""
    base = tmp_path_factory.mktemp("hostile")
    valid = Valid(base / "valid", corpus)
    (base / "valid").mkdir()
    specs = []
    for case in CASES:
        d = base / case.id
        d.mkdir()
        specs.append({"id": case.id, "cwd": str(d), "root": str(d), "argv": case.make(d, valid)})
    (base / "cases.json").write_text(json.dumps(specs))
    subprocess.run([sys.executable, str(ROOT / "tests" / "hostile_runner.py"), str(base / "cases.json"),
                    str(base / "results.json")], cwd=ROOT, env=clean_env(), check=True, timeout=1800)
    return json.loads((base / "results.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_one_line_and_harms_nothing(case, outcomes):
    got = outcomes[case.id]
    shown = f"stdout:\n{got['stdout'][-2000:]}\nstderr:\n{got['stderr'][-3000:]}"
    assert "Traceback" not in got["stderr"], shown
    errors = [line for line in got["stderr"].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, shown
    assert case.names in errors[0], errors[0]
    if case.key:
        assert case.key in errors[0], errors[0]
    assert got["status"] == 2, shown
    changed = {path for path in got["before"].keys() | got["after"].keys()
               if got["before"].get(path) != got["after"].get(path)}
    allowed = {p for p in changed if any(p == w or p.startswith(w + "/") for w in case.may_write)}
    assert changed == allowed, f"changed or created: {sorted(changed - allowed)}"
    assert got["peak_growth_mib"] < PEAK_GROWTH_MIB, f"peak memory grew {got['peak_growth_mib']:.0f} MiB"
