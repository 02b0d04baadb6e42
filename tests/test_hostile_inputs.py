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
import hashlib
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
INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


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

    def adapter(self) -> Path:
        """A LoRA adapter of r=2 on `hf`'s c_attn, saved by peft itself (adapter_config.json,
        adapter_model.safetensors)."""
        def make(out: Path) -> None:
            import peft
            import torch
            from transformers import GPT2LMHeadModel

            torch.manual_seed(0)
            model = GPT2LMHeadModel.from_pretrained(self.hf())
            peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                       fan_in_fan_out=True)).save_pretrained(out)

        return self._once("adapter", make)

    def pruned(self) -> Path:
        """`hf` compressed by `prune --sparsity 0.5` (compress.json names the weights it zeroed)."""
        def make(out: Path) -> None:
            from gpt2dist.commands.compress import main

            assert main(["prune", str(self.hf()), str(out), "--sparsity", "0.5"]) == 0

        return self._once("pruned", make)

    def sharded(self) -> Path:
        """`hf` with its weights in two safetensors shards and model.safetensors.index.json."""
        def make(out: Path) -> None:
            from safetensors.torch import load_file, save_file

            shutil.copytree(self.hf(), out)
            state = load_file(out / "model.safetensors")
            (out / "model.safetensors").unlink()
            names, weight_map = sorted(state), {}
            for i, half in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
                save_file({n: state[n] for n in half}, out / SHARDS[i], metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(half, SHARDS[i]))
            (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

        return self._once("sharded", make)

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
EVALUATE_HF = ["-m", "gpt2dist.evaluate", "hf"]
EVALUATE_TEXT = [*EVALUATE_HF, "--text", "hf/config.json"]  # a model that loads would score its config's text


# ---- Hugging Face directories (gpt2dist.models.hf.read_hf_config, by every command that loads one) ----
CLASSIFIER = {"architectures": ["GPT2ForSequenceClassification"], "pad_token_id": 50256}


def hf_row(change: Callable[[dict], object], command: list[str] = GENERATE_HF,
           artifact: str = "hf") -> Callable[[Path, Valid], list[str]]:
    """A row: a copy of the valid Hugging Face directory `artifact` (hf, or sharded), `change` applied to its
    config.json, loaded by `command` (run with the valid corpus beside it)."""
    def make(d: Path, valid: Valid) -> list[str]:
        edit_json(valid.copy(artifact, d / "hf") / "config.json", change)
        if "data.path=corpus" in command:
            valid.copy("corpus", d / "corpus")
        return command

    return make


def weights_row(change: Callable[[Path], object], artifact: str = "sharded") -> Callable[[Path, Valid], list[str]]:
    """A row: a copy of `artifact` whose weight files `change(the directory)` rewrites, loaded to generate from."""
    def make(d: Path, valid: Valid) -> list[str]:
        change(valid.copy(artifact, d / "hf"))
        return GENERATE_HF

    return make


def index_row(change: Callable[[dict], object]) -> Callable[[Path, Valid], list[str]]:
    """A row: the sharded directory, `change` applied to its index's JSON."""
    return weights_row(lambda hf: edit_json(hf / INDEX, change))


def first_weight(index: dict) -> str:
    return min(index["weight_map"])


def both_shards_hold_every_weight(hf: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = {**load_file(hf / SHARDS[0]), **load_file(hf / SHARDS[1])}
    for shard in SHARDS:
        save_file(state, hf / shard, metadata={"format": "pt"})


def torch_bin(value: Callable[[dict], object]) -> Callable[[Path], None]:
    """The directory's weights replaced by pytorch_model.bin holding `value(its weights)`."""
    def change(hf: Path) -> None:
        import torch
        from safetensors.torch import load_file

        state = load_file(hf / "model.safetensors")
        (hf / "model.safetensors").unlink()
        torch.save(value(state), hf / "pytorch_model.bin")

    return change


TRAIN_INIT_HF = ["train.py", *TINY, "data.path=corpus", "train.run_dir=run", "train.init_from=hf"]
COMPRESS_HF = ["-m", "gpt2dist.compress", "quantize", "hf", "out", "--method", "bf16"]
HF_CASES = [
    Case("hf-config-not-json", lambda d, v: (write(v.copy("hf", d / "hf") / "config.json", "{oops"), GENERATE_HF)[1],
         names="hf/config.json"),
    Case("hf-config-nested-deeply",
         lambda d, v: (write(v.copy("hf", d / "hf") / "config.json", "[" * 100_000 + "]" * 100_000), GENERATE_HF)[1],
         names="hf/config.json"),
    Case("hf-config-not-an-object", hf_row(lambda c: [c]), names="hf/config.json"),
    Case("hf-config-other-architecture", hf_row(lambda c: c.update(model_type="llama")), names="hf/config.json",
         key="model_type"),
    Case("hf-config-architectures-of-another-model", hf_row(lambda c: c.update(architectures=["LlamaForCausalLM"])),
         names="hf/config.json", key="architectures"),
    Case("hf-config-architectures-a-string", hf_row(lambda c: c.update(architectures="GPT2LMHeadModel")),
         names="hf/config.json", key="architectures"),
    Case("hf-config-n-layer-missing", hf_row(lambda c: c.__delitem__("n_layer")), names="hf/config.json",
         key="n_layer"),
    Case("hf-config-n-embd-zero", hf_row(lambda c: c.update(n_embd=0)), names="hf/config.json", key="n_embd"),
    Case("hf-config-n-head-negative", hf_row(lambda c: c.update(n_head=-2)), names="hf/config.json", key="n_head"),
    Case("hf-config-n-head-not-dividing-n-embd", hf_row(lambda c: c.update(n_head=3), COMPRESS_HF),
         names="hf/config.json", key="n_head"),
    Case("hf-config-n-layer-a-float", hf_row(lambda c: c.update(n_layer=2.0)), names="hf/config.json", key="n_layer"),
    Case("hf-config-n-embd-a-string", hf_row(lambda c: c.update(n_embd="32"), EVALUATE_TEXT), names="hf/config.json",
         key="n_embd"),
    Case("hf-config-n-layer-a-bool", hf_row(lambda c: c.update(n_layer=True)), names="hf/config.json", key="n_layer"),
    Case("hf-config-n-layer-absurd", hf_row(lambda c: c.update(n_layer=10**6)), names="hf/config.json",
         key="n_layer"),
    Case("hf-config-vocab-size-absurd", hf_row(lambda c: c.update(vocab_size=10**12)), names="hf/config.json",
         key="vocab_size"),
    Case("hf-config-n-positions-absurd", hf_row(lambda c: c.update(n_positions=10**9), TRAIN_INIT_HF),
         names="hf/config.json", key="n_positions"),
    Case("hf-config-layer-norm-epsilon-negative", hf_row(lambda c: c.update(layer_norm_epsilon=-1e-5)),
         names="hf/config.json", key="layer_norm_epsilon"),
    Case("hf-config-scale-attn-weights-an-integer", hf_row(lambda c: c.update(scale_attn_weights=0)),
         names="hf/config.json", key="scale_attn_weights"),
    # Sizes in range, but more than the weights hold: refused from the weight files' headers, before a model
    # of 4,000 layers (or 4 million tokens' embedding) is built.
    Case("hf-config-far-more-layers-than-its-weights", hf_row(lambda c: c.update(n_layer=4000), TRAIN_INIT_HF),
         names="hf/config.json", key="n_layer"),
    Case("hf-config-far-more-layers-than-its-shards", hf_row(lambda c: c.update(n_layer=4000), artifact="sharded"),
         names="hf/config.json", key="n_layer"),
    Case("hf-config-vocabulary-beyond-its-weights", hf_row(lambda c: c.update(vocab_size=4_000_000), EVALUATE_TEXT),
         names="hf/config.json", key="vocab_size"),
    Case("hf-config-wider-than-its-weights", hf_row(lambda c: c.update(n_embd=4096, n_head=2)),
         names="hf/config.json", key="n_embd"),
    Case("hf-config-n-inner-not-its-weights", hf_row(lambda c: c.update(n_inner=10)), names="hf/config.json",
         key="n_inner"),
    Case("hf-config-n-positions-not-its-weights", hf_row(lambda c: c.update(n_positions=1000)),
         names="hf/config.json", key="n_positions"),
    Case("hf-config-id2label-not-an-object", hf_row(lambda c: c.update(CLASSIFIER, id2label=["a", "b"])),
         names="hf/config.json", key="id2label"),
    Case("hf-config-id2label-ids-not-0-to-n", hf_row(lambda c: c.update(CLASSIFIER, id2label={"0": "a", "5": "b"})),
         names="hf/config.json", key="id2label"),
    Case("hf-config-id2label-a-label-twice", hf_row(lambda c: c.update(CLASSIFIER, id2label={"0": "a", "1": "a"})),
         names="hf/config.json", key="id2label"),
    Case("hf-config-id2label-labels-not-strings", hf_row(lambda c: c.update(CLASSIFIER, id2label={"0": 1, "1": 2})),
         names="hf/config.json", key="id2label.0"),
    Case("hf-config-label2id-not-its-inverse",
         hf_row(lambda c: c.update(CLASSIFIER, id2label={"0": "a", "1": "b"}, label2id={"a": 1, "b": 0})),
         names="hf/config.json", key="label2id"),
    Case("hf-config-classifier-without-its-head", hf_row(lambda c: c.update(CLASSIFIER, id2label={"0": "a"})),
         names="hf/model.safetensors", key="score.weight"),
    Case("hf-weights-not-safetensors", weights_row(lambda hf: write(hf / "model.safetensors", b"\xff" * 64), "hf"),
         names="hf/model.safetensors"),
    Case("hf-index-not-json", weights_row(lambda hf: write(hf / INDEX, "{oops")), names=f"hf/{INDEX}"),
    Case("hf-index-weight-map-a-list", index_row(lambda i: i.update(weight_map=list(i["weight_map"]))),
         names=f"hf/{INDEX}", key="weight_map"),
    Case("hf-index-file-not-a-string", index_row(lambda i: i["weight_map"].update({first_weight(i): 5})),
         names=f"hf/{INDEX}", key="weight_map.transformer."),
    Case("hf-index-file-outside-the-directory",
         index_row(lambda i: i["weight_map"].update({first_weight(i): f"../{SHARDS[0]}"})), names=f"hf/{INDEX}",
         key="weight_map.transformer."),
    Case("hf-index-file-absolute", index_row(lambda i: i["weight_map"].update({first_weight(i): "/etc/hostname"})),
         names=f"hf/{INDEX}", key="weight_map.transformer."),
    Case("hf-index-shard-missing",
         index_row(lambda i: i["weight_map"].update({first_weight(i): "model-00003-of-00003.safetensors"})),
         names=f"hf/{INDEX}", key="weight_map.transformer."),
    Case("hf-index-two-shards-hold-every-weight", weights_row(both_shards_hold_every_weight), names=f"hf/{INDEX}",
         key="weight_map.transformer."),
    Case("hf-bin-a-list-of-tensors", weights_row(torch_bin(lambda s: list(s.values())), "hf"),
         names="hf/pytorch_model.bin"),
    Case("hf-bin-a-weight-not-a-tensor", weights_row(torch_bin(lambda s: {**s, "transformer.ln_f.bias": [1.0]}), "hf"),
         names="hf/pytorch_model.bin", key="transformer.ln_f.bias"),
]

# ---- adapters in PEFT's format (gpt2dist.models.adapters.read_adapter_config) ----
GENERATE_ADAPTER = [*GENERATE_HF, "--adapter", "adapter"]


def adapter_row(change: Callable[[dict], object], command: list[str] = GENERATE_ADAPTER,
                corpus: bool = False) -> Callable[[Path, Valid], list[str]]:
    """A row: the valid adapter copied here (as adapter/, its base as hf/), `change` applied to its
    adapter_config.json, then `command` run (with the valid corpus here if `corpus`)."""
    def make(d: Path, valid: Valid) -> list[str]:
        valid.copy("hf", d / "hf")
        edit_json(valid.copy("adapter", d / "adapter") / "adapter_config.json", change)
        if corpus:
            valid.copy("corpus", d / "corpus")
        return command

    return make


TRAIN_INIT_ADAPTER = [*TRAIN_INIT_HF, "train.init_adapter=adapter", "peft=lora", "peft.r=2", "peft.alpha=4",
                      "peft.target_modules=[c_attn]"]
ADAPTER_CONFIG = "adapter/adapter_config.json"
ADAPTER_CASES = [
    Case("adapter-config-not-json", lambda d, v: (write(v.copy("adapter", d / "adapter") / "adapter_config.json", "{"),
                                                  v.copy("hf", d / "hf"), GENERATE_ADAPTER)[2], names=ADAPTER_CONFIG),
    Case("adapter-config-not-an-object", adapter_row(lambda c: [c]), names=ADAPTER_CONFIG),
    Case("adapter-peft-type-unknown", adapter_row(lambda c: c.update(peft_type="PREFIX_TUNING")), names=ADAPTER_CONFIG,
         key="peft_type"),
    Case("adapter-peft-type-missing", adapter_row(lambda c: c.__delitem__("peft_type")), names=ADAPTER_CONFIG,
         key="peft_type"),
    Case("adapter-target-modules-not-strings", adapter_row(lambda c: c.update(target_modules=[1, 2])),
         names=ADAPTER_CONFIG, key="target_modules"),
    Case("adapter-target-modules-a-number", adapter_row(lambda c: c.update(target_modules=5)), names=ADAPTER_CONFIG,
         key="target_modules"),
    Case("adapter-target-modules-empty", adapter_row(lambda c: c.update(target_modules=[])), names=ADAPTER_CONFIG,
         key="target_modules"),
    Case("adapter-r-zero", adapter_row(lambda c: c.update(r=0)), names=ADAPTER_CONFIG, key="r"),
    Case("adapter-r-a-bool", adapter_row(lambda c: c.update(r=True), [*EVALUATE_TEXT, "--adapter", "adapter"]),
         names=ADAPTER_CONFIG, key="r"),
    Case("adapter-r-a-string", adapter_row(lambda c: c.update(r="2")), names=ADAPTER_CONFIG, key="r"),
    Case("adapter-r-a-float", adapter_row(lambda c: c.update(r=2.5), TRAIN_INIT_ADAPTER, corpus=True),
         names=ADAPTER_CONFIG, key="r"),
    Case("adapter-r-not-its-weights", adapter_row(lambda c: c.update(r=4)), names=ADAPTER_CONFIG, key="r"),
    Case("adapter-r-absurd", adapter_row(lambda c: c.update(r=10**9)), names=ADAPTER_CONFIG, key="r"),
    Case("adapter-lora-alpha-a-bool", adapter_row(lambda c: c.update(lora_alpha=True)), names=ADAPTER_CONFIG,
         key="lora_alpha"),
    Case("adapter-lora-alpha-a-string", adapter_row(lambda c: c.update(lora_alpha="4")), names=ADAPTER_CONFIG,
         key="lora_alpha"),
    Case("adapter-lora-alpha-negative", adapter_row(lambda c: c.update(lora_alpha=-4)), names=ADAPTER_CONFIG,
         key="lora_alpha"),
    Case("adapter-lora-dropout-above-one", adapter_row(lambda c: c.update(lora_dropout=1.5)), names=ADAPTER_CONFIG,
         key="lora_dropout"),
    Case("adapter-ia3-feedforward-outside-targets",
         adapter_row(lambda c: c.update(peft_type="IA3", feedforward_modules=["c_fc"])), names=ADAPTER_CONFIG,
         key="feedforward_modules"),
    Case("adapter-weights-not-safetensors",
         lambda d, v: (adapter_row(lambda c: None)(d, v), write(d / "adapter/adapter_model.safetensors", "{}"))[0],
         names="adapter/adapter_model.safetensors"),
    Case("adapter-uses-dora", adapter_row(lambda c: c.update(use_dora=True)), names=ADAPTER_CONFIG, key="use_dora"),
    Case("adapter-base-not-a-string", adapter_row(lambda c: c.update(base_model_name_or_path=["hf"]),
                                                  [*GENERATE_HF[:2], "adapter", *GENERATE_HF[3:]]),
         names=ADAPTER_CONFIG, key="base_model_name_or_path"),
]

# ---- compressed directories (gpt2dist.models.compressed.read_manifest) ----
EXPORT_PRUNED = ["-m", "gpt2dist.export", "pruned", "out"]
GENERATE_PRUNED = ["-m", "gpt2dist.generate", "pruned", "--prompt", "The", "--max-new-tokens", "1"]
COMPRESS_PRUNED = ["-m", "gpt2dist.compress", "quantize", "pruned", "out", "--method", "bf16"]


def compressed_row(change: Callable[[dict], object],
                   command: list[str] = GENERATE_PRUNED) -> Callable[[Path, Valid], list[str]]:
    """A row: the valid pruned directory copied here, `change` applied to its compress.json, then `command`
    (with the valid corpus here for train.py)."""
    def make(d: Path, valid: Valid) -> list[str]:
        edit_json(valid.copy("pruned", d / "pruned") / "compress.json", change)
        if "data.path=corpus" in command:
            valid.copy("corpus", d / "corpus")
        return command

    return make


def model_config(**fields) -> Callable[[dict], object]:
    return lambda m: m["config"].update(fields)


COMPRESS_JSON = "pruned/compress.json"
COMPRESSED_CASES = [
    Case("compressed-manifest-not-an-object", compressed_row(lambda m: [m]), names=COMPRESS_JSON),
    Case("compressed-format-other", compressed_row(lambda m: m.update(format="other/1")), names=COMPRESS_JSON,
         key="format"),
    Case("compressed-method-unknown", compressed_row(lambda m: m.update(method="int2"), COMPRESS_PRUNED),
         names=COMPRESS_JSON, key="method"),
    Case("compressed-config-missing", compressed_row(lambda m: m.__delitem__("config"), EXPORT_PRUNED),
         names=COMPRESS_JSON, key="config"),
    Case("compressed-n-layer-zero", compressed_row(model_config(n_layer=0)), names=COMPRESS_JSON,
         key="config.n_layer"),
    Case("compressed-n-embd-negative", compressed_row(model_config(n_embd=-32), EXPORT_PRUNED), names=COMPRESS_JSON,
         key="config.n_embd"),
    Case("compressed-share-layers-zero", compressed_row(model_config(share_layers=0)), names=COMPRESS_JSON,
         key="config.share_layers"),
    Case("compressed-share-layers-not-dividing", compressed_row(model_config(share_layers=3)), names=COMPRESS_JSON,
         key="config.share_layers"),
    Case("compressed-mlp-hidden-of-other-length", compressed_row(model_config(mlp_hidden=[128])), names=COMPRESS_JSON,
         key="config.mlp_hidden"),
    Case("compressed-labels-not-strings", compressed_row(model_config(labels=[1, 2])), names=COMPRESS_JSON,
         key="config.labels"),
    Case("compressed-config-unknown-field", compressed_row(model_config(n_experts=8)), names=COMPRESS_JSON,
         key="config.n_experts"),
    Case("compressed-dropout-above-one", compressed_row(model_config(dropout=2.0)), names=COMPRESS_JSON,
         key="config.dropout"),
    Case("compressed-pruned-a-string", compressed_row(lambda m: m.update(pruned="all")), names=COMPRESS_JSON,
         key="pruned"),
    Case("compressed-pruned-not-its-weights", compressed_row(lambda m: m.update(pruned=["transformer.h.9.mlp"]),
                                                             TRAIN_INIT_HF[:-1] + ["train.init_from=pruned"]),
         names=COMPRESS_JSON, key="pruned"),
    Case("compressed-far-more-layers-than-its-weights", compressed_row(model_config(n_layer=4000), EXPORT_PRUNED),
         names=COMPRESS_JSON, key="config.n_layer"),
    Case("compressed-wider-than-its-weights", compressed_row(model_config(n_embd=4096)), names=COMPRESS_JSON,
         key="config.n_embd"),
    Case("compressed-vocabulary-beyond-its-weights", compressed_row(model_config(vocab_size=4_000_000), COMPRESS_PRUNED),
         names=COMPRESS_JSON, key="config.vocab_size"),
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

# ---- outputs (gpt2dist.outputs, the one writer): what a command may not write into or replace ----
def files(*names: str, then: Callable[[Path, Valid], list[str]]) -> Callable[[Path, Valid], list[str]]:
    """A row: the user's files `names` (a name ending in / is a directory), then `then`'s inputs and command."""
    def make(d: Path, valid: Valid) -> list[str]:
        for name in names:
            (d / name).mkdir(parents=True, exist_ok=True) if name.endswith("/") else write(d / name, f"{name}: mine")
        return then(d, valid)

    return make


def copies(*artifacts: tuple[str, str], argv: list[str]) -> Callable[[Path, Valid], list[str]]:
    """`then` for `files`: valid artifacts (name, where) copied here, and argv."""
    def make(d: Path, valid: Valid) -> list[str]:
        for name, where in artifacts:
            valid.copy(name, d / where)
        return argv

    return make


def linked(link: str, to: str, then: Callable[[Path, Valid], list[str]]) -> Callable[[Path, Valid], list[str]]:
    def make(d: Path, valid: Valid) -> list[str]:
        (d / link).symlink_to(to)
        return then(d, valid)

    return make


def stream_cache_not_ours(d: Path, valid: Valid) -> list[str]:
    """The stream cache directory of the served corpus already holds the user's files."""
    url = valid.serve(valid.copy("corpus", d / "site" / "served").parent) + "served/"
    write(d / "cache" / "stream" / hashlib.sha256(url.encode()).hexdigest()[:16] / "notes.txt", "mine")
    return ["train.py", *TINY, f"data.path={url}", "data.cache_dir=cache", "train.run_dir=run"]


QUANTIZE = ["-m", "gpt2dist.compress", "quantize", "hf", "out", "--method", "bf16"]
NOT_OURS = "out: not an output gpt2dist wrote"
OUTPUT_CASES = [
    Case("compress-overwrite-thesis-beside-compress-json",
         files("out/compress.json", "out/thesis.tex", then=copies(("hf", "hf"), argv=[*QUANTIZE, "--overwrite"])),
         names=NOT_OURS),
    Case("compress-output-a-link-to-theirs",
         files("theirs/notes.txt", then=linked("out", "theirs", copies(("hf", "hf"), argv=[*QUANTIZE, "--overwrite"]))),
         names=NOT_OURS),
    Case("compress-output-exists", files("out/notes.txt", then=copies(("hf", "hf"), argv=QUANTIZE)),
         names="out: exists and is not empty", key="--overwrite"),
    Case("prepare-overwrite-another-programs-manifest",
         files("out/manifest.json", "out/data.bin", then=jsonl([*PREPARE, "--overwrite"])), names=NOT_OURS),
    Case("sft-overwrite-a-directory-named-like-a-shard",
         files("out/manifest.json", "out/train-000000.tar/notes.txt", then=jsonl([*SFT, "--overwrite"])),
         names=NOT_OURS),
    Case("classify-output-the-working-directory", jsonl([*CLASSIFY[:-4], "--output", ".", "--seq-len", "32"]),
         names=".: is the working directory"),
    Case("prepare-output-a-parent-of-the-working-directory", jsonl([*PREPARE[:-4], "--output", "..", "--overwrite"]),
         names="..: is the working directory or holds it"),
    Case("prepare-output-holds-its-input",
         jsonl(["-m", "data_tools.prepare", "data/in.jsonl", "--output", "data"], name="data/in.jsonl"),
         names="data: holds an input"),
    Case("prepare-output-inside-its-input",
         files("texts/a.txt", then=lambda d, v: ["-m", "data_tools.prepare", "texts", "--output", "texts/corpus"]),
         names="texts/corpus: is inside an input"),
    Case("export-compressed-onto-itself",
         copies(("pruned", "comp"), argv=["-m", "gpt2dist.export", "comp", "comp"]),
         names="comp: is an input"),
    Case("export-over-their-hf-directory",
         copies(("pruned", "comp"), ("hf", "out"), argv=["-m", "gpt2dist.export", "comp", "out"]),
         names="out: exists and is not empty", key="--overwrite"),
    Case("export-overwrite-their-hf-directory",
         copies(("pruned", "comp"), ("hf", "out"), argv=["-m", "gpt2dist.export", "comp", "out", "--overwrite"]),
         names=NOT_OURS),
    Case("export-adapter-over-their-files",
         files("out/adapter_config.json", then=copies(("pruned", "comp"),
                                                      argv=["-m", "gpt2dist.export", "comp", "out", "--adapter"])),
         names="out: exists and is not empty"),
    Case("train-run-dir-inside-the-corpus",
         copies(("corpus", "corpus"), argv=[*TRAIN_CORPUS[:-1], "train.run_dir=corpus/run"]),
         names="corpus/run: is inside an input"),
    Case("train-run-dir-theirs", files("run/notes.txt", then=copies(("corpus", "corpus"), argv=TRAIN_CORPUS)),
         names="train.run_dir=", key="holds files gpt2dist did not write (notes.txt)"),
    Case("stream-cache-theirs", stream_cache_not_ours, names="the stream cache of", key="notes.txt"),
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

CASES = [*HF_CASES, *ADAPTER_CASES, *COMPRESSED_CASES, *CORPUS_CASES, *STREAM_CASES, *JSONL_CASES, *PARTS_CASES,
         *OUTPUT_CASES, *CONFIG_CASES, *ARGUMENT_CASES]


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
