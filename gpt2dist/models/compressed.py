"""A compressed model directory: what `python -m gpt2dist.compress` writes, and every command loads.

    OUT/compress.json      the method, the source model's path and SHA-256, the network's shape
                           (GPTConfig, with per-block MLP widths), and what pruning zeroed
    OUT/model.safetensors  our parameter names (the tied lm_head left out: it is the token embedding)
    OUT/vocab.json, merges.txt, tokenizer_config.json   GPT-2's tokenizer, as in an exported directory

Nothing is pickled. A torchao-quantized weight is stored as its plain parts (int8 data, fp32
scales, zero points) with its attributes as JSON in the safetensors header; torchao rebuilds it
only from its allow-list of tensor classes.

A compressed directory may come from elsewhere: `read_manifest` is compress.json's one reader (every key
of its type and in range, the network's shape a GPTConfig that can be built), and its shape is checked
against the weights (`_checked_state`) before a model is built for it.
"""

import dataclasses
import hashlib
import json
from typing import NotRequired, TypedDict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from gpt2dist.errors import BadFile, Gpt2distError
from gpt2dist.data.tokenizer import hf_tokenizer_files
from gpt2dist.fileio import sha256_of
from gpt2dist.models.gpt import GPT, LIMITS, GPTConfig, shape_mismatch
from gpt2dist.safe_json import Fields, read_json, shown

MANIFEST = "compress.json"
WEIGHTS = "model.safetensors"
FORMAT = "gpt2dist-compressed/1"
QUANTIZED = ("int8-weight", "int4-weight", "int8-dynamic")  # torchao tensors (gpt2dist.models.quantize)
CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = (*QUANTIZED, *CAST, "prune", "prune-mlp")  # what `method` may say
MAX_MANIFEST_BYTES = 64 * 2**20  # `pruned` names every weight at most: ~100 bytes each


class CompressedError(Gpt2distError, RuntimeError):
    """A compressed directory that is unreadable or cannot serve the request (names the file)."""


class BadCompressManifest(CompressedError, BadFile):
    """A compress.json that does not hold what this version writes, or that its weights contradict (names the key)."""


class Manifest(TypedDict):
    """compress.json, as `read_manifest` returns it, checked (`save` writes more, such as the command line)."""

    format: str  # FORMAT
    method: str  # one of METHODS
    source: str  # the model it was compressed from
    config: dict  # a GPTConfig's fields (`config_of`)
    pruned: NotRequired[list[str]]  # prune: the weights it zeroed


def is_compressed(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def torchao():
    """torchao's safetensors support, imported on first use: the import takes seconds (gpt2dist/__init__.py
    quiets its notes)."""
    from torchao.prototype.safetensors import safetensors_support

    return safetensors_support


def source_sha256(path: Path) -> str:
    """SHA-256 of a weights file, or of a directory's files (each one's relative path and SHA-256, sorted)."""
    if path.is_file():
        return sha256_of(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{sha256_of(f)}\n".encode())
    return h.hexdigest()


def read_manifest(path: str | Path) -> Manifest:
    """compress.json of a compressed directory, checked: its format and method, and a network shape that
    `config_of` can build (`check_config`); a BadCompressManifest naming the key otherwise. The one reader
    of compress.json."""
    file = Path(path) / MANIFEST
    m = Fields(file, read_json(file, MAX_MANIFEST_BYTES, error=BadCompressManifest), error=BadCompressManifest)
    if (format_ := m.get("format", str)) != FORMAT:
        raise m.bad("format", f"{shown(format_)} is not {FORMAT}: not a model compressed by this version")
    if (method := m.get("method", str)) not in METHODS:
        raise m.bad("method", f"{shown(method)} is none of {', '.join(METHODS)}")
    m.get("source", str)
    m.strings("pruned", optional=True)
    check_config(m.fields("config"))
    return m.value


def check_config(c: Fields) -> GPTConfig:
    """A GPTConfig from its fields as `save` writes them (dataclasses.asdict), each of its type and range."""
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    if unknown := sorted(set(c.value) - known):
        raise c.bad(unknown[0], "not a field of gpt2dist's model")
    sizes = {key: c.count(key, 1, LIMITS[key]) for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
    if sizes["n_embd"] % sizes["n_head"]:
        raise c.bad("n_head", f"{sizes['n_head']:,} does not divide n_embd {sizes['n_embd']:,}")
    share = c.count("share_layers", 1, sizes["n_layer"])
    if sizes["n_layer"] % share:
        raise c.bad("share_layers", f"{share:,} does not divide n_layer {sizes['n_layer']:,}")
    widths = c.get("mlp_hidden", (list, type(None)))
    if widths is not None and (len(widths) != sizes["n_layer"] // share or not all(
            isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= LIMITS["mlp_width"] for w in widths)):
        raise c.bad("mlp_hidden", f"{shown(widths)} is not one width (1 to {LIMITS['mlp_width']:,}) per block "
                                  f"({sizes['n_layer'] // share})")
    labels = c.strings("labels")
    if len(labels) > LIMITS["labels"] or len(set(labels)) != len(labels):
        raise c.bad("labels", f"{shown(labels)} is not a list of distinct labels")
    return GPTConfig(**sizes, share_layers=share, mlp_hidden=widths, labels=tuple(labels),
                     dropout=c.number("dropout", 0, 1, open_high=True),
                     layer_norm_epsilon=c.number("layer_norm_epsilon", 0, 1, open_low=True),
                     pad_vocab_multiple=c.count("pad_vocab_multiple", 1, 2**16),
                     pad_token_id=c.count("pad_token_id", 0, sizes["vocab_size"] - 1))


def config_of(manifest: Manifest) -> GPTConfig:
    return GPTConfig(**manifest["config"])


def save(model: GPT, out_dir: Path, manifest: dict) -> None:
    """Write `model` and its manifest (method, source, ...; the config is added) into the existing out_dir."""
    state = {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    metadata = None
    if manifest["method"] in QUANTIZED:
        state, metadata = torchao().flatten_tensor_state_dict(state)
    # Bytes written by us, not save_file, so that the file gets the umask's permissions like the others.
    (out_dir / WEIGHTS).write_bytes(safetensors_bytes({k: v.contiguous() for k, v in state.items()}, metadata))
    manifest = {"format": FORMAT, **manifest, "config": dataclasses.asdict(model.config)}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    for name, text in hf_tokenizer_files(model.config.block_size).items():
        (out_dir / name).write_text(text, encoding="utf-8")


def _checked_state(path: Path, manifest: Manifest) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of model.safetensors and its metadata, checked against compress.json: the shape it claims
    (before any model is built for it) and the weights `pruned` names."""
    file = path / WEIGHTS
    try:
        with safe_open(str(file), framework="pt") as f:
            state, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types as well as OSError
        raise CompressedError(f"{file}: unreadable safetensors file ({e})") from None
    if mismatch := shape_mismatch(config_of(manifest), {name: t.shape for name, t in state.items()}):
        field, message = mismatch
        if field is None:
            raise CompressedError(f"{file}: {message}")
        raise BadCompressManifest(path / MANIFEST, message, f"config.{field}")
    if odd := sorted(set(manifest.get("pruned", [])) - set(state)):
        raise BadCompressManifest(path / MANIFEST, f"{shown(odd[0])} is not a weight of {WEIGHTS}", "pruned")
    return state, metadata


def load(path: str | Path, device: torch.device | str = "cpu") -> GPT:
    """The GPT of a compressed directory, in eval mode, its weights as stored (quantized, bf16, ...)."""
    path = Path(path)
    manifest = read_manifest(path)
    state, metadata = _checked_state(path, manifest)
    if manifest["method"] in QUANTIZED:
        try:
            state = torchao().unflatten_tensor_state_dict(state, metadata)[0]
        except Exception as e:  # a damaged header: torchao raises ValueError, KeyError, json errors...
            raise CompressedError(f"{path / WEIGHTS}: cannot rebuild the quantized tensors ({e!r})") from None
    with torch.device("meta"):
        model = GPT(config_of(manifest))
    _check_names(path, model, state)
    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the tied parameter
    return model.to(device).eval()


def _check_names(path: Path, model: GPT, state: dict) -> None:
    expected = set(model.state_dict()) - {"lm_head.weight"}
    if set(state) != expected:
        odd = sorted(expected ^ set(state))[0]
        raise CompressedError(f"{path / WEIGHTS}: {odd} is missing or does not belong to the model in {MANIFEST}")
    for name, tensor in model.state_dict().items():
        if name in state and state[name].shape != tensor.shape:
            raise CompressedError(f"{path / WEIGHTS}: {name} {tuple(state[name].shape)} does not fit the model "
                                  f"({tuple(tensor.shape)})")


def plain_tensors(path: str | Path) -> tuple[GPTConfig, Iterator[tuple[str, torch.Tensor]]]:
    """(shape, (name, fp32 tensor) pairs) of a compressed directory that holds plain weights (pruned or cast),
    to train or export from; a quantized one is refused."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest["method"] in QUANTIZED:
        raise CompressedError(f"{path}: holds {manifest['method']}-quantized weights, which cannot be trained or "
                              f"exported; use the model it was quantized from ({manifest['source']})")
    state, _ = _checked_state(path, manifest)
    return config_of(manifest), ((name, t.float()) for name, t in state.items())
