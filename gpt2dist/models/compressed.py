"""A compressed model directory: what `python -m gpt2dist.compress` writes, and every command loads.

    OUT/compress.json      the method, the source model's path and SHA-256, the network's shape
                           (GPTConfig, with per-block MLP widths), and what pruning zeroed
    OUT/model.safetensors  our parameter names (the tied lm_head left out: it is the token embedding)
    OUT/vocab.json, merges.txt, tokenizer_config.json   GPT-2's tokenizer, as in an exported directory

Nothing is pickled. A torchao-quantized weight is stored as its plain parts (int8 data, fp32
scales, zero points) with its attributes as JSON in the safetensors header; torchao rebuilds it
only from its allow-list of tensor classes.
"""

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from gpt2dist.errors import Gpt2distError
from gpt2dist.data.tokenizer import hf_tokenizer_files
from gpt2dist.fileio import sha256_of
from gpt2dist.models.gpt import GPT, GPTConfig

MANIFEST = "compress.json"
WEIGHTS = "model.safetensors"
FORMAT = "gpt2dist-compressed/1"
QUANTIZED = ("int8-weight", "int4-weight", "int8-dynamic")  # torchao tensors (gpt2dist.models.quantize)
CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class CompressedError(Gpt2distError, RuntimeError):
    """A compressed directory that is unreadable or cannot serve the request (names the file)."""


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


def read_manifest(path: str | Path) -> dict:
    """compress.json of a compressed directory, checked for the keys every reader needs."""
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
        GPTConfig(**manifest["config"])
        assert manifest["format"] == FORMAT, f"format {manifest['format']!r} is not {FORMAT}"
        assert manifest["method"], "no method"
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise CompressedError(f"{file}: not a gpt2dist compressed model ({e!r})") from None
    return manifest


def config_of(manifest: dict) -> GPTConfig:
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


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    file = path / WEIGHTS
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types as well as OSError
        raise CompressedError(f"{file}: unreadable safetensors file ({e})") from None


def load(path: str | Path, device: torch.device | str = "cpu") -> GPT:
    """The GPT of a compressed directory, in eval mode, its weights as stored (quantized, bf16, ...)."""
    path = Path(path)
    manifest = read_manifest(path)
    state, metadata = _read_state(path)
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
    state, _ = _read_state(path)
    return config_of(manifest), ((name, t.float()) for name, t in state.items())
