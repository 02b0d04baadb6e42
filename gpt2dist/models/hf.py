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
downloaded checkpoint cannot run code. A directory comes from elsewhere: `read_hf_config` is its one
reader, which checks config.json key by key (`check_hf_config`), the index of a sharded model
(`weight_files`), and then config.json's shape against the weight files' headers (`weight_shapes`, nothing
loaded), so that a config claiming more than its weights hold is refused before a model is built for it.
"""

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open

from gpt2dist.errors import BadFile, Gpt2distError
from gpt2dist import safe_load
from gpt2dist.models.gpt import GPT, LIMITS, GPTConfig, shape_mismatch
from gpt2dist.safe_json import Fields, read_json, shown
from gpt2dist.data.tokenizer import EOT, hf_tokenizer_files

# Suffixes of the Conv1D weights in Hugging Face's GPT-2.
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_BUFFERS = (".attn.bias", ".attn.masked_bias")
CLASSIFIER = "GPT2ForSequenceClassification"
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model", CLASSIFIER)  # what gpt2dist's GPT holds the weights of
CONFIG, SAFETENSORS, INDEX, BIN = "config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"
MAX_CONFIG_BYTES = 2**20  # a GPT-2 config.json is ~1 kB
MAX_INDEX_BYTES = 64 * 2**20  # an index lists each weight once: ~100 bytes each
# config.json's names for the GPTConfig fields that `shape_mismatch` names.
HF_KEYS = {"block_size": "n_positions", "mlp_hidden": "n_inner", "labels": "id2label"}
# Variants of GPT-2 that config.json may select and gpt2dist does not implement: (key, its default, allowed values).
VARIANTS = (("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh")),
            ("scale_attn_weights", True, (True,)), ("scale_attn_by_inverse_layer_idx", False, (False,)),
            ("tie_word_embeddings", True, (True,)), ("add_cross_attention", False, (False,)))


class HFError(Gpt2distError, RuntimeError):
    """A Hugging Face directory that is missing, unreadable or not a GPT-2 we can load (names the file)."""


class BadHFFile(HFError, BadFile):
    """A file of a Hugging Face directory (config.json, the index, the weights) that does not hold what its
    format promises, or a config.json its weights contradict (names the file and the key)."""


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


def read_hf_config(hf_dir: str | Path) -> GPTConfig:
    """The GPTConfig of a Hugging Face directory, from its config.json (`check_hf_config`), checked against the
    shapes its weight files hold (read from their headers: nothing is loaded or built); a BadHFFile naming the
    file and the key otherwise. The one reader of a Hugging Face directory's config.json."""
    path = Path(hf_dir) / CONFIG
    config = check_hf_config(read_json(path, MAX_CONFIG_BYTES, error=BadHFFile), str(path))
    files = weight_files(hf_dir)
    if mismatch := shape_mismatch(config, weight_shapes(hf_dir, files)):
        field, message = mismatch
        if field is None:  # a tensor missing: the weights' fault
            raise BadHFFile(files[0] if len(files) == 1 else Path(hf_dir) / INDEX, message)
        raise BadHFFile(path, message, HF_KEYS.get(field, field))
    return config


def check_hf_config(raw: object, where: str) -> GPTConfig:
    """`raw`, the JSON of a config.json read from `where`, as a GPTConfig: a GPT-2 (model_type, architectures
    and the variant keys) of sizes that are integers in range (LIMITS), n_head dividing n_embd, a classifier's
    labels an id2label of ids 0..n-1 (label2id, if given, its inverse). Raises BadHFFile naming the key."""
    c = Fields(where, raw, error=BadHFFile)
    if (model_type := c.get("model_type", str)) != "gpt2":
        raise c.bad("model_type", f"{shown(model_type)} is not gpt2, the architecture gpt2dist implements")
    architectures = c.strings("architectures", optional=True) or []
    if [a for a in architectures if a not in ARCHITECTURES] or len(architectures) > 1:
        raise c.bad("architectures", f"{shown(architectures)}: gpt2dist loads one of {', '.join(ARCHITECTURES)}")
    for key, default, allowed in VARIANTS:
        value = c.get(key, type(default), optional=True)
        if value is not None and value not in allowed:
            raise c.bad(key, f"{value!r} is not the GPT-2 architecture gpt2dist implements")
    sizes = {key: c.count(key, 1, LIMITS[ours]) for key, ours in (
        ("n_layer", "n_layer"), ("n_head", "n_head"), ("n_embd", "n_embd"), ("n_positions", "block_size"),
        ("vocab_size", "vocab_size"))}
    if sizes["n_embd"] % sizes["n_head"]:
        raise c.bad("n_head", f"{sizes['n_head']:,} does not divide n_embd {sizes['n_embd']:,}")
    if c.get("n_inner", (int, type(None)), optional=True) is not None:
        sizes["n_inner"] = c.count("n_inner", 1, LIMITS["mlp_width"])
    epsilon = c.number("layer_norm_epsilon", 0, 1, optional=True, open_low=True)
    id2label = _id2label(c)
    if CLASSIFIER in architectures:
        if not id2label:
            raise c.bad("id2label", "missing: a classifier's config names its labels")
        if c.get("pad_token_id", (int, type(None)), optional=True) != EOT:  # our classifier pads with <|endoftext|>
            raise c.bad("pad_token_id", f"{shown(raw.get('pad_token_id'))}: gpt2dist's classifier pads with "
                                        f"<|endoftext|> ({EOT})")
    return config_from_hf(SimpleNamespace(**sizes, layer_norm_epsilon=1e-5 if epsilon is None else epsilon,
                                          architectures=architectures, id2label=id2label))


def _id2label(c: Fields) -> dict[str, str]:
    """config.json's id2label, checked: ids "0" to "n-1", each a distinct string label; label2id, if given,
    maps each label back to its id."""
    labels = c.fields("id2label", optional=True)
    if labels is None:
        return {}
    ids = labels.value
    if not 0 < len(ids) <= LIMITS["labels"] or set(ids) != {str(i) for i in range(len(ids))}:
        raise c.bad("id2label", f"ids {shown(sorted(ids))}: the ids of n labels are \"0\" to \"n-1\"")
    names = [labels.get(str(i), str) for i in range(len(ids))]
    if len(set(names)) != len(names):
        raise c.bad("id2label", f"{shown(names)}: a label is named twice")
    inverse = c.fields("label2id", optional=True)
    if inverse is not None and inverse.value != {name: i for i, name in enumerate(names)}:
        raise c.bad("label2id", f"{shown(inverse.value)} is not the inverse of id2label")
    return ids


def _our_name(name: str) -> str | None:
    """A Hugging Face weight's name on our side; None for buffers and the tied head. `GPT2Model` checkpoints
    (OpenAI's `gpt2` files) lack the `transformer.` prefix."""
    if name.endswith(_BUFFERS) or name == "lm_head.weight":
        return None
    return name if name.startswith("transformer.") or name == "score.weight" else "transformer." + name


def from_hf_tensor(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """One Hugging Face tensor under our name and layout; None for buffers and the tied head."""
    ours = _our_name(name)
    if ours is None:
        return None
    return ours, (tensor.t() if ours.endswith(_TRANSPOSED) else tensor)


def to_hf_tensor(name: str, tensor: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """One of our tensors in Hugging Face's layout (the vocabulary unpadded)."""
    if name in ("transformer.wte.weight", "lm_head.weight"):
        tensor = tensor[: config.vocab_size]
    return (tensor.t() if name.endswith(_TRANSPOSED) else tensor).contiguous()


def weight_files(hf_dir: str | Path) -> list[Path]:
    """The weight files of a Hugging Face directory: model.safetensors, the shards its index lists (checked:
    a weight_map of weight names to file names of this directory, each file present), or pytorch_model.bin."""
    hf_dir = Path(hf_dir)
    if (hf_dir / SAFETENSORS).is_file():
        return [hf_dir / SAFETENSORS]
    if (hf_dir / INDEX).is_file():
        return sorted(set(_index(hf_dir).values()))
    if (hf_dir / BIN).is_file():
        return [hf_dir / BIN]
    raise HFError(f"{hf_dir}: no {SAFETENSORS}, {INDEX} or {BIN}")


def _index(hf_dir: Path) -> dict[str, Path]:
    """model.safetensors.index.json's weight_map: each weight's file, checked to be a file of hf_dir."""
    where = str(hf_dir / INDEX)
    weight_map = Fields(where, read_json(hf_dir / INDEX, MAX_INDEX_BYTES, error=BadHFFile),
                        error=BadHFFile).fields("weight_map")
    files = {}
    for name in weight_map.value:
        file = weight_map.get(name, str)
        if Path(file).name != file or file in (".", "..") or not file.endswith(".safetensors"):
            raise weight_map.bad(name, f"{shown(file)} is not the name of a .safetensors file in {hf_dir}")
        if not (hf_dir / file).is_file():
            raise weight_map.bad(name, f"{file} is missing from {hf_dir}")
        files[name] = hf_dir / file
    if not files:
        raise BadHFFile(where, "names no weights", "weight_map")
    return files


def _bin_state(path: Path) -> dict[str, torch.Tensor]:
    """pytorch_model.bin, loaded weights-only and memory-mapped: a mapping of weight names to tensors, or a
    BadHFFile saying what it holds instead."""
    state = safe_load.load(path, HFError, map_location="cpu", mmap=True)
    if not isinstance(state, dict):
        raise BadHFFile(path, f"holds a {type(state).__name__}, not a mapping of weight names to tensors")
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise BadHFFile(path, f"holds {type(tensor).__name__} {shown(tensor)}, not a tensor",
                            name if isinstance(name, str) else shown(name))
    return state


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types as well as OSError
        raise HFError(f"{path}: unreadable safetensors file ({e})") from None


def weight_shapes(hf_dir: str | Path, files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Each weight's shape, by our name and in our layout, from the headers of `files` (`weight_files`):
    nothing is loaded. Refuses a weight held twice (in two files, or under both of its names), and a shard
    that holds other weights than the index assigns it."""
    hf_dir, shapes, held, seen = Path(hf_dir), {}, {}, set()
    assigned = _index(hf_dir) if files != [hf_dir / SAFETENSORS] and (hf_dir / INDEX).is_file() else None
    for path in files:
        if path.name == BIN:
            names = {name: tuple(t.shape) for name, t in _bin_state(path).items()}
        else:
            f = _open_safetensors(path)
            names = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        for name, shape in names.items():
            if assigned is not None and assigned.get(name) != path:
                also = f" (the index puts it in {assigned[name].name})" if name in assigned else " (not in the index)"
                raise BadHFFile(hf_dir / INDEX, f"{path.name} holds it{also}", f"weight_map.{name}")
            seen.add(name)
            ours = _our_name(name)
            if ours is None:
                continue
            if ours in held:
                raise BadHFFile(path, f"holds {ours} twice (as {held[ours]} and {name})")
            held[ours] = name
            shapes[ours] = shape[::-1] if ours.endswith(_TRANSPOSED) else shape
    if assigned is not None and (missing := sorted(set(assigned) - seen)):
        raise BadHFFile(hf_dir / INDEX, f"not in {assigned[missing[0]].name}", f"weight_map.{missing[0]}")
    return shapes


def hf_tensors(hf_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, fp32 tensor) for each weight of a Hugging Face directory (`weight_files`; checked by
    `read_hf_config`), one at a time, so a large model is never held twice."""
    for path in weight_files(hf_dir):
        if path.name == BIN:
            items = _bin_state(path).items()
        else:
            f = _open_safetensors(path)
            items = ((name, f.get_tensor(name)) for name in f.keys())
        for name, tensor in items:
            mapped = from_hf_tensor(name, tensor)
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
    write_safetensors(out_dir / SAFETENSORS, hf_shapes,
                      lambda hf: to_hf_tensor(ours[hf], tensor(ours[hf]), config))
    (out_dir / CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
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
