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

import functools
import http.server
import json
import posixpath
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpt2dist.data.shards import MANIFEST, MAX_MANIFEST_BYTES, shard_bytes
from gpt2dist.safe_json import MAX_LINE_BYTES
from tests.conftest import ROOT, TINY, clean_env, tiny_overrides

PEAK_GROWTH_MIB = 512


class Valid:
    """Valid artifacts, each made on first use and then copied by the rows that damage it."""

    def __init__(self, base: Path, corpus: Path):
        self.base, self._corpus, self._made = base, corpus, {}
        self._servers: list[http.server.ThreadingHTTPServer] = []

    def serve(self, root: Path) -> str:
        """The URL of a web server on 127.0.0.1 serving root, from a thread of this process: it serves
        while the runner runs the rows, until `close`."""
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

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

    def classify(self) -> Path:
        """A tiny classification corpus (data_tools.classify: two labels, each split the same two texts)."""
        def make(out: Path) -> None:
            from data_tools.classify import main as classify_main

            out.mkdir()
            write(out / "in.jsonl", '{"text": "the cat", "label": "animal"}\n{"text": "the red", "label": "color"}\n')
            files = [str(out / "in.jsonl")]
            assert classify_main(["--output", str(out / "cls"), "--seq-len", "8", "--train", *files, "--dev", *files,
                                  "--test", *files]) == 0

        return self._once("classify", make) / "cls"

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

# ---- prepared corpora (gpt2dist.data.shards.read_manifest, by every command that reads one) ----
TRAIN_CORPUS = ["train.py", *TINY, "data.path=corpus", "train.run_dir=run"]
VERIFY = ["-m", "data_tools.verify", "corpus"]


def manifest(change: Callable[[dict], object], command: list[str] = VERIFY,
             text: Callable[[str], str] = lambda t: t) -> Callable[[Path, Valid], list[str]]:
    """A row: the valid corpus copied here, its manifest changed (`change` on its JSON, then `text` on the
    file's text), and `command` run on it, with the user's notes.txt beside it."""
    def make(d: Path, valid: Valid) -> list[str]:
        write(d / "notes.txt", "mine")
        path = edit_json(valid.copy("corpus", d / "corpus") / MANIFEST, change)
        path.write_text(text(path.read_text()))
        return command

    return make


def first_shard(split: str = "train") -> Callable[[dict], dict]:
    return lambda m: m["splits"][split]["shards"][0]


def grow_train_shard(m: dict, blocks: int) -> None:
    """The first train shard claims `blocks` blocks, its sizes and its split's totals consistent."""
    shard, split = m["splits"]["train"]["shards"][0], m["splits"]["train"]
    split["blocks"] += blocks - shard["blocks"]
    split["tokens"] += (blocks - shard["blocks"]) * m["block_tokens"]
    shard.update(blocks=blocks, tokens=blocks * m["block_tokens"], bytes=shard_bytes(blocks, m["block_tokens"]))


def twice(m: dict) -> None:
    split = m["splits"]["train"]
    split["shards"].append(dict(split["shards"][0]))
    split["blocks"], split["tokens"] = 2 * split["blocks"], 2 * split["tokens"]


EVALUATE_HF = ["-m", "gpt2dist.evaluate", "hf"]


def with_hf(make: Callable[[Path, Valid], list[str]]) -> Callable[[Path, Valid], list[str]]:
    """The same row, with the valid Hugging Face directory copied here as `hf` (a model to load)."""
    def made(d: Path, valid: Valid) -> list[str]:
        valid.copy("hf", d / "hf")
        return make(d, valid)

    return made


CORPUS_CASES = [
    Case("corpus-manifest-missing", lambda d, v: (write(d / "corpus" / "notes.txt", "mine"), TRAIN_CORPUS)[1],
         names="corpus/manifest.json"),
    Case("corpus-manifest-not-an-object", manifest(lambda m: [m], TRAIN_CORPUS), names="corpus/manifest.json"),
    Case("corpus-manifest-nested-deeply",
         manifest(lambda m: None, TRAIN_CORPUS, lambda t: "[" * 100_000 + "]" * 100_000), names="corpus/manifest.json"),
    Case("corpus-manifest-integer-of-5000-digits",
         manifest(lambda m: m.update(vocab_size=7), TRAIN_CORPUS,
                  lambda t: t.replace('"vocab_size": 7', '"vocab_size": ' + "9" * 5000)), names="corpus/manifest.json"),
    Case("corpus-manifest-too-large", manifest(lambda m: None, VERIFY, lambda t: t + " " * MAX_MANIFEST_BYTES),
         names="corpus/manifest.json"),
    Case("corpus-splits-missing", manifest(lambda m: m.__delitem__("splits"), TRAIN_CORPUS),
         names="corpus/manifest.json", key="splits"),
    Case("corpus-block-tokens-nan", manifest(lambda m: m.update(block_tokens=0.5), TRAIN_CORPUS,
                                             lambda t: t.replace('"block_tokens": 0.5', '"block_tokens": NaN')),
         names="corpus/manifest.json"),
    Case("corpus-block-tokens-a-string", manifest(lambda m: m.update(block_tokens="256"), TRAIN_CORPUS),
         names="corpus/manifest.json", key="block_tokens"),
    Case("corpus-block-tokens-zero", manifest(lambda m: m.update(block_tokens=0)), names="corpus/manifest.json",
         key="block_tokens"),
    Case("corpus-vocab-size-negative", manifest(lambda m: m.update(vocab_size=-5), TRAIN_CORPUS),
         names="corpus/manifest.json", key="vocab_size"),
    Case("corpus-dtype-other", manifest(lambda m: m.update(dtype="<u4")), names="corpus/manifest.json", key="dtype"),
    Case("corpus-task-unknown", manifest(lambda m: m.update(task="pretraining"), TRAIN_CORPUS),
         names="corpus/manifest.json", key="task"),
    Case("corpus-sft-seq-len-beyond-its-blocks", manifest(lambda m: m.update(task="sft", seq_len=1000)),
         names="corpus/manifest.json", key="block_tokens"),
    Case("corpus-classify-labels-not-strings", manifest(lambda m: m.update(task="classify", seq_len=m["block_tokens"],
                                                                            labels=[1, 2])),
         names="corpus/manifest.json", key="labels"),
    Case("corpus-shard-name-parent", manifest(lambda m: first_shard()(m).update(file="../notes.txt"), TRAIN_CORPUS),
         names="corpus/manifest.json", key="splits.train.shards[0].file"),
    Case("corpus-shard-name-absolute", manifest(lambda m: first_shard("val")(m).update(file="/etc/hostname")),
         names="corpus/manifest.json", key="splits.val.shards[0].file"),
    Case("corpus-shard-listed-twice", manifest(twice), names="corpus/manifest.json", key="file"),
    Case("corpus-shard-blocks-a-float", manifest(lambda m: first_shard()(m).update(blocks=1.5)),
         names="corpus/manifest.json", key="blocks"),
    Case("corpus-shard-bytes-negative", manifest(lambda m: first_shard()(m).update(bytes=-1)),
         names="corpus/manifest.json", key="bytes"),
    Case("corpus-shard-sha256-not-hex", manifest(lambda m: first_shard()(m).update(sha256=5)),
         names="corpus/manifest.json", key="sha256"),
    Case("corpus-split-tokens-not-its-shards", manifest(lambda m: m["splits"]["train"].update(tokens=1)),
         names="corpus/manifest.json", key="tokens"),
    Case("corpus-evaluate-shard-name-parent",
         with_hf(manifest(lambda m: first_shard("val")(m).update(file="../notes.txt"),
                          [*EVALUATE_HF, "--corpus", "corpus"])), names="corpus/manifest.json", key="file"),
    Case("corpus-prune-mlp-manifest-not-an-object",
         with_hf(manifest(lambda m: [m], ["-m", "gpt2dist.compress", "prune-mlp", "hf", "out", "--fraction", "0.25",
                                          "--seq-len", "32", "--corpus", "corpus"])),
         names="corpus/manifest.json"),
]

# ---- a remote corpus in stream mode (gpt2dist.data.stream.ShardStore) ----
def streamed(change: Callable[[dict, Path], object]) -> Callable[[Path, Valid], list[str]]:
    """A row: the valid corpus served over HTTP on 127.0.0.1 from `site/served/`, changed by
    change(its manifest, the site) (which may add files to the site), and trained on in stream mode,
    with the user's notes.txt here."""
    def make(d: Path, valid: Valid) -> list[str]:
        write(d / "notes.txt", "mine")
        site = d / "site"
        edit_json(valid.copy("corpus", site / "served") / MANIFEST, lambda m: change(m, site))
        return ["train.py", *TINY, f"data.path={valid.serve(site)}served/", "data.cache_dir=cache",
                "data.stream.retries=0", "train.run_dir=run"]

    return make


def val_shard_named(name: Callable[[Path], str]) -> Callable[[dict, Path], None]:
    """The served val shard listed under another name (`name(the row's directory)`), and served under it
    (the server resolves ../ at its root), so that only the name is hostile."""
    def change(m: dict, site: Path) -> None:
        shard = first_shard("val")(m)
        real, shard["file"] = site / "served" / shard["file"], name(site.parent)
        there = site / posixpath.normpath(f"/served/{shard['file']}").lstrip("/")
        there.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(real, there)

    return change


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


STREAM_CASES = [
    Case("stream-shard-name-parent", streamed(val_shard_named(lambda d: "../../../notes.txt")),
         names="served/manifest.json", key="splits.val.shards[0].file", may_write=("cache",)),
    Case("stream-shard-name-absolute", streamed(val_shard_named(lambda d: str(d / "notes.txt"))),
         names="served/manifest.json", key="splits.val.shards[0].file", may_write=("cache",)),
    Case("stream-val-shard-longer-than-declared",
         streamed(lambda m, site: append(site / "served" / first_shard("val")(m)["file"], bytes(2**20))),
         names="served/val-000000.tar", key="bytes", may_write=("cache",)),
    Case("stream-manifest-too-large", streamed(lambda m, site: m.update(padding=" " * MAX_MANIFEST_BYTES)),
         names="served/manifest.json", key="bytes", may_write=("cache",)),
    Case("stream-train-shard-claims-terabytes", streamed(lambda m, site: grow_train_shard(m, 2 * 10**9)),
         names="served/train-000000.tar", key="data.stream.cache_gb", may_write=("cache",)),
]

# ---- JSON Lines rows (gpt2dist.safe_json.row) of every command that reads them ----
DEEP = '{"text": "a", "prompt": "a", "response": "b", "label": "x", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
HUGE_INT = '{"text": "a", "prompt": "a", "response": "b", "label": "x", "n": ' + "9" * 5000 + "}"
NAN = '{"text": "a", "prompt": "a", "response": "b", "label": "x", "score": NaN}'
GOOD = '{"text": "Alice likes red.", "prompt": "Alice likes", "response": " red.", "label": "color"}'
PREPARE = ["-m", "data_tools.prepare", "in.jsonl", "--output", "out", "--block-tokens", "16"]
SFT = ["-m", "data_tools.sft", "in.jsonl", "--output", "out", "--seq-len", "32"]
CLASSIFY = ["-m", "data_tools.classify", "in.jsonl", "--output", "out", "--seq-len", "32"]


def jsonl(command: list[str], *rows: str, name: str = "in.jsonl",
          good: str = GOOD) -> Callable[[Path, Valid], list[str]]:
    """A row: a JSON Lines file `name` of a good row, then `rows`, given to `command`."""
    def make(d: Path, valid: Valid) -> list[str]:
        write(d / name, "".join(row + "\n" for row in (good, *rows)))
        return command

    return make


def question(**fields) -> str:
    return json.dumps({"ctx": "Alice likes", "endings": [" red.", " blue."], "label": 0, **fields})


def choices(*rows: str, command: tuple[str, ...] = ("--choices", "q.jsonl")) -> Callable[[Path, Valid], list[str]]:
    """A row: a multiple-choice file q.jsonl of a good question, then `rows`, scored with the valid Hugging
    Face model (`command`: its options), a good questions file beside it."""
    def make(d: Path, valid: Valid) -> list[str]:
        write(d / "good.jsonl", question() + "\n")
        return jsonl([*EVALUATE_HF, *command], *rows, name="q.jsonl", good=question())(d, valid)

    return with_hf(make)


JSONL_CASES = [
    Case("prepare-row-nested-deeply", jsonl(PREPARE, DEEP), names="in.jsonl:2"),
    Case("prepare-row-integer-of-5000-digits", jsonl(PREPARE, HUGE_INT), names="in.jsonl:2"),
    Case("prepare-row-nan", jsonl(PREPARE, NAN), names="in.jsonl:2", key="NaN"),
    Case("prepare-row-not-an-object", jsonl(PREPARE, '["a"]'), names="in.jsonl:2"),
    Case("prepare-row-longer-than-32-mib", jsonl(PREPARE, json.dumps({"text": "word " * (MAX_LINE_BYTES // 5)})),
         names="in.jsonl:2"),
    Case("sft-row-nested-deeply", jsonl(SFT, DEEP), names="in.jsonl:2"),
    Case("sft-row-integer-of-5000-digits", jsonl(SFT, HUGE_INT), names="in.jsonl:2"),
    Case("sft-row-not-an-object", jsonl(SFT, '"a"'), names="in.jsonl:2"),
    Case("sft-row-longer-than-32-mib",
         jsonl(SFT, json.dumps({"prompt": "a", "response": "word " * (MAX_LINE_BYTES // 5)})), names="in.jsonl:2"),
    Case("classify-row-nested-deeply", jsonl(CLASSIFY, DEEP), names="in.jsonl:2"),
    Case("classify-row-integer-of-5000-digits", jsonl(CLASSIFY, HUGE_INT), names="in.jsonl:2"),
    Case("classify-label-a-float", jsonl(CLASSIFY, '{"text": "b", "label": 1.5}'), names="in.jsonl:2", key="label"),
    Case("classify-labels-integer-and-string", jsonl(CLASSIFY, '{"text": "b", "label": 1}'), names="in.jsonl:2",
         key="in.jsonl:1"),
    Case("choices-row-nested-deeply", choices(DEEP), names="q.jsonl:2"),
    Case("choices-label-a-bool", choices(question(label=True)), names="q.jsonl:2", key="label"),
    Case("choices-label-a-float", choices(question(label=0.7)), names="q.jsonl:2", key="label"),
    Case("choices-endings-a-string", choices(question(endings="abc")), names="q.jsonl:2", key="endings"),
    Case("choices-endings-not-strings", choices(question(endings=[1, 2])), names="q.jsonl:2", key="endings"),
    Case("fewshot-label-a-bool", choices(question(label=True), command=("--choices", "good.jsonl", "--fewshot-file",
                                                                        "q.jsonl", "--fewshot-k", "1")),
         names="q.jsonl:2", key="label"),
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

# ---- config values (gpt2dist.config.check) that peft, torch or math would end in a traceback, or that one
# value would silently override ----
def config(*overrides: str) -> Callable[[Path, Valid], list[str]]:
    """A row: train.py on the valid corpus from the valid Hugging Face directory (`hf`), with `overrides`."""
    def make(d: Path, valid: Valid) -> list[str]:
        valid.copy("hf", d / "hf")
        return ["train.py", *TINY, f"data.path={valid.corpus()}", "train.run_dir=run", "train.init_from=hf", *overrides]

    return make


CONFIG_CASES = [
    Case("config-epochs-beside-max-steps", config("train.epochs=1"), names="train.max_steps=4", key="train.epochs=1"),
    Case("config-epochs-inf", config("train.epochs=inf"), names="train.epochs=inf"),
    Case("config-lora-dropout-above-1", config("peft=lora", "peft.dropout=1.5"), names="peft.dropout=1.5"),
    Case("config-lora-target-modules-empty", config("peft=lora", "peft.target_modules=[]"),
         names="peft.target_modules is empty"),
    Case("config-lora-target-module-unmatched", config("peft=lora", "peft.target_modules=[c_attn,q_proj]"),
         names="peft.target_modules[1]=q_proj"),
    Case("config-ia3-feedforward-outside-targets", config("peft=ia3", "peft.feedforward_modules=[mlp.c_fc]"),
         names="peft.feedforward_modules", key="mlp.c_fc"),
]

# ---- command-line arguments (gpt2dist.arguments: every command's types) and inputs of the wrong kind ----
PRUNE_MLP = ["-m", "gpt2dist.compress", "prune-mlp", "hf", "out", "--fraction", "0.25", "--seq-len", "32",
             "--sequences", "8"]


def with_corpus(command: list[str], corpus: str = "corpus") -> Callable[[Path, Valid], list[str]]:
    """A row: `command`, with the valid Hugging Face directory copied here as `hf` and the valid corpus of
    that kind (`corpus` or `classify`) as its name."""
    def make(d: Path, valid: Valid) -> list[str]:
        shutil.copytree(getattr(valid, corpus)(), d / corpus)
        return command

    return with_hf(make)


MANY_LABELS = ["color", *(f"label{i}" for i in range(50_257))]  # one more than a classification corpus holds
ARGUMENT_CASES = [
    Case("prune-mlp-sequences-0", with_corpus([*PRUNE_MLP, "--corpus", "corpus", "--sequences", "0"]),
         names="--sequences", key="0 is not a positive integer"),
    Case("prune-mlp-seq-len-0", with_corpus([*PRUNE_MLP, "--corpus", "corpus", "--seq-len", "0"]), names="--seq-len"),
    Case("sft-dev-fraction-nan", jsonl([*SFT, "--dev-fraction", "nan"]), names="--dev-fraction", key="nan"),
    Case("classify-test-fraction-above-1", jsonl([*CLASSIFY, "--test-fraction", "1.5"]), names="--test-fraction"),
    Case("classify-dev-and-test-fractions-leave-no-train", jsonl([*CLASSIFY, "--dev-fraction", "0.5",
                                                                  "--test-fraction", "0.5"]),
         names="--dev-fraction 0.5 + --test-fraction 0.5"),
    Case("classify-more-labels-than-ids", jsonl([*CLASSIFY, "--labels", *MANY_LABELS]), names="--labels",
         key="50,258 labels"),
    Case("evaluate-sft-on-a-classification-corpus", with_corpus([*EVALUATE_HF, "--sft", "classify"], "classify"),
         names="classify: holds classification examples"),
    Case("evaluate-sft-on-a-pretraining-corpus", with_corpus([*EVALUATE_HF, "--sft", "corpus"]),
         names="corpus: holds a pretraining corpus"),
    Case("evaluate-loss-on-a-classification-corpus", with_corpus([*EVALUATE_HF, "--corpus", "classify"], "classify"),
         names="classify: holds classification examples"),
]

CASES = [*HF_CASES, *CORPUS_CASES, *STREAM_CASES, *JSONL_CASES, *PARTS_CASES, *CONFIG_CASES, *ARGUMENT_CASES]


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
    try:
        subprocess.run([sys.executable, str(ROOT / "tests" / "hostile_runner.py"), str(base / "cases.json"),
                        str(base / "results.json")], cwd=ROOT, env=clean_env(), check=True, timeout=1800)
    finally:
        valid.close()
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
