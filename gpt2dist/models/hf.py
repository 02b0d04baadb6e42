"""Weight mapping between gpt2dist's GPT and Hugging Face's `GPT2LMHeadModel`, and Hugging Face
model directories (config.json + model.safetensors, and on the way out the tokenizer files) in and out.

Names are the same on both sides; Hugging Face keeps the four linear layers of each block as
`Conv1D`, whose weights are stored (in, out), so those are transposed. Attention masks
(`attn.bias`, `attn.masked_bias`) that old Hugging Face checkpoints carry are buffers, not
weights, and are skipped. A model with narrower MLPs (structured pruning) maps to `n_inner` when
every block has the same width; a model whose layers share blocks (`share_layers`) is written with
each shared block repeated, as a plain GPT-2 of n_layer layers. A classifier (`GPTConfig.labels`)
is `GPT2ForSequenceClassification`: its `score` head (a plain linear layer) under the same name,
and its labels as `id2label`/`label2id`, with `pad_token_id`, in config.json.

Directories are read and written without transformers: config.json is plain JSON, and weights
are read from safetensors, or from `pytorch_model.bin` through `gpt2dist.safe_load`, so a
downloaded checkpoint cannot run code.
"""

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open

from gpt2dist.errors import Gpt2distError
from gpt2dist import safe_load
from gpt2dist.models.gpt import GPT, GPTConfig
from gpt2dist.data.tokenizer import EOT, hf_tokenizer_files

# Suffixes of the Conv1D weights in Hugging Face's GPT-2.
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_BUFFERS = (".attn.bias", ".attn.masked_bias")
CLASSIFIER = "GPT2ForSequenceClassification"


class HFError(Gpt2distError, RuntimeError):
    """A Hugging Face directory that is missing, unreadable or not a GPT-2 we can load (names the file)."""


def config_from_hf(hf_config) -> GPTConfig:
    """A GPTConfig with the shape of a `transformers.GPT2Config` (or its config.json as a namespace)."""
    n_inner = getattr(hf_config, "n_inner", None)
    return GPTConfig(
        mlp_hidden=None if n_inner in (None, 4 * hf_config.n_embd) else (n_inner,) * hf_config.n_layer,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=hf_config.n_embd,
        block_size=hf_config.n_positions,
        vocab_size=hf_config.vocab_size,
        dropout=0.0,
        layer_norm_epsilon=hf_config.layer_norm_epsilon,
        labels=hf_labels(hf_config),
    )


def hf_labels(hf_config) -> tuple[str, ...]:
    """A sequence classifier's class names, in id order; () for a language model."""
    if CLASSIFIER not in (getattr(hf_config, "architectures", None) or []):
        return ()
    id2label = hf_config.id2label
    return tuple(id2label[k] for k in sorted(id2label, key=int))  # keys are strings in config.json


def hf_config_dict(config: GPTConfig) -> dict:
    """config.json of a `GPT2LMHeadModel` (a classifier: `GPT2ForSequenceClassification`) with our shape
    (dropout off: exported models are for use)."""
    widths = {config.mlp_width(b) for b in range(config.n_blocks)}
    if len(widths) > 1:
        raise HFError(f"MLP widths {config.mlp_hidden} differ between blocks; Hugging Face's GPT-2 has one n_inner")
    (width,) = widths
    classifier = {"id2label": dict(enumerate(config.labels)),
                  "label2id": {label: i for i, label in enumerate(config.labels)},
                  "pad_token_id": config.pad_token_id} if config.labels else {}
    return {
        "n_inner": None if width == 4 * config.n_embd else width,
        "architectures": [CLASSIFIER if config.labels else "GPT2LMHeadModel"],
        **classifier,
        "model_type": "gpt2",
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_positions": config.block_size,
        "vocab_size": config.vocab_size,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": EOT,
        "eos_token_id": EOT,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def read_hf_config(hf_dir: Path) -> GPTConfig:
    """The GPTConfig of a Hugging Face directory's config.json; refuses GPT-2 variants we do not implement."""
    path = hf_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFError(f"{path}: unreadable ({e})") from None
    differences = {
        "model_type": (raw.get("model_type"), "gpt2"),
        "activation_function": (raw.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "scale_attn_weights": (raw.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (raw.get("scale_attn_by_inverse_layer_idx", False), False),
        "tie_word_embeddings": (raw.get("tie_word_embeddings", True), True),
    }
    if CLASSIFIER in (raw.get("architectures") or []):  # our classifier pads with <|endoftext|>
        differences["pad_token_id"] = (raw.get("pad_token_id"), EOT)
    for key, (value, allowed) in differences.items():
        if value != allowed and not (isinstance(allowed, tuple) and value in allowed):
            raise HFError(f"{path}: {key}={value!r} is not the GPT-2 architecture gpt2dist implements")
    try:
        return config_from_hf(SimpleNamespace(**{"layer_norm_epsilon": 1e-5, **raw}))
    except AttributeError as e:
        raise HFError(f"{path}: incomplete GPT-2 config ({e})") from None


def from_hf_tensor(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """One Hugging Face tensor under our name and layout; None for buffers and the tied head.

    `GPT2Model` checkpoints (OpenAI's `gpt2` files) lack the `transformer.` prefix.
    """
    if name.endswith(_BUFFERS) or name == "lm_head.weight":
        return None
    if not name.startswith("transformer.") and name != "score.weight":
        name = "transformer." + name
    return name, (tensor.t() if name.endswith(_TRANSPOSED) else tensor)


def to_hf_tensor(name: str, tensor: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """One of our tensors in Hugging Face's layout (the vocabulary unpadded)."""
    if name in ("transformer.wte.weight", "lm_head.weight"):
        tensor = tensor[: config.vocab_size]
    return (tensor.t() if name.endswith(_TRANSPOSED) else tensor).contiguous()


def hf_tensors(hf_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, fp32 tensor) for each weight of a Hugging Face directory, one at a time, so a
    large model is never held twice: model.safetensors, its sharded index, or pytorch_model.bin.
    """
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    elif index.is_file():
        try:
            files = [hf_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise HFError(f"{index}: unreadable ({e})") from None
    elif (hf_dir / "pytorch_model.bin").is_file():
        path = hf_dir / "pytorch_model.bin"
        for name, tensor in safe_load.load(path, HFError, map_location="cpu", mmap=True).items():
            mapped = from_hf_tensor(name, tensor)
            if mapped:
                yield mapped[0], mapped[1].float()
        return
    else:
        raise HFError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    for path in files:
        try:
            f = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types as well as OSError
            raise HFError(f"{path}: unreadable safetensors file ({e})") from None
        for name in f.keys():
            mapped = from_hf_tensor(name, f.get_tensor(name))
            if mapped:
                yield mapped[0], mapped[1].float()


def write_safetensors(path: Path, shapes: dict[str, torch.Size], tensor: Callable[[str], torch.Tensor]) -> None:
    """A safetensors file of fp32 tensors, asking `tensor(name)` for one tensor at a time.

    safetensors' own `save_file` needs every tensor in memory at once; a consolidated ZeRO
    checkpoint converted whole would be a second copy of the model. The format is an 8-byte
    header length, a JSON header (dtype, shape, byte range of each tensor), then the data.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 4 * shape.numel()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape in shapes.items():
            t = tensor(name).to(torch.float32).contiguous()
            assert t.shape == shape, (name, t.shape, shape)
            f.write(t.detach().numpy().data)


def save_hf_dir(config: GPTConfig, shapes: dict[str, torch.Size], tensor: Callable[[str], torch.Tensor],
                out_dir: str | Path) -> Path:
    """Write a Hugging Face directory from our weights: `shapes` and `tensor(name)` give each of
    our parameters (lm_head.weight excluded: it is the token embedding, and from_pretrained ties it),
    and GPT-2's tokenizer files, so that AutoTokenizer loads from the same directory.
    """
    out_dir = Path(out_dir)
    hf_config = hf_config_dict(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = dict(_hf_layer_names(config, [name for name in shapes if name != "lm_head.weight"]))  # HF name -> ours
    hf_shapes = {hf: torch.Size(to_hf_tensor(name, torch.empty(shapes[name], device="meta"), config).shape)
                 for hf, name in ours.items()}
    write_safetensors(out_dir / "model.safetensors", hf_shapes,
                      lambda hf: to_hf_tensor(ours[hf], tensor(ours[hf]), config))
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for name, text in hf_tokenizer_files(config.block_size).items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return out_dir


def _hf_layer_names(config: GPTConfig, names: list[str]) -> Iterator[tuple[str, str]]:
    """(Hugging Face name, our name) pairs: block b's weights serve layers b * share_layers ... (b + 1) * share_layers - 1."""
    for name in names:
        if not name.startswith("transformer.h."):
            yield name, name
            continue
        block, rest = name.removeprefix("transformer.h.").split(".", 1)
        for layer in range(int(block) * config.share_layers, (int(block) + 1) * config.share_layers):
            yield f"transformer.h.{layer}.{rest}", name


def export_hf(model: GPT, out_dir: str | Path) -> Path:
    """Write a GPT in memory as a Hugging Face directory."""
    state = model.state_dict()
    return save_hf_dir(model.config, {k: v.shape for k, v in state.items()}, state.__getitem__, out_dir)
