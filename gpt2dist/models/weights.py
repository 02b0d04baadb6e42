"""Load a GPT from wherever its weights are: the one loader every command uses.

A model path is one of
- a run directory (`<run_dir>/checkpoints/latest` names its newest checkpoint),
- a checkpoint directory (`<run_dir>/checkpoints/step_XXXXXXXX/`, any ZeRO stage, any number of ranks),
- a Hugging Face GPT-2 directory (config.json with model.safetensors or pytorch_model.bin),
- a compressed directory (compress.json; quantized, cast or pruned by `gpt2dist.compress`);
- an adapter directory in PEFT's format (adapter_config.json), on the base it names, or given with
  its base (`adapter=`); a run that trained adapters loads as its base with them (`find_adapter`).

ZeRO-1/2/3 checkpoints hold the fp32 master weights sharded across the ranks' optimizer
files; DeepSpeed's `zero_to_fp32` consolidates them on the CPU without a process group. Stage 0
keeps the module's weights in `mp_rank_00_model_states.pt`. Weights are handed out one tensor
at a time so that loading or exporting never holds the model twice.
"""

import contextlib
import sys
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from gpt2dist.errors import Gpt2distError
from gpt2dist.training import deepspeed_env
from gpt2dist import safe_load
from gpt2dist.training.checkpoint import CHECKPOINTS, complete_tags
from gpt2dist.config import gpt_config
from gpt2dist.models import compressed
from gpt2dist.models.hf import HFError, hf_tensors, read_hf_config
from gpt2dist.models.gpt import GPT, GPTConfig, pad_vocab
from gpt2dist.training.optim import param_groups

STAGE0_STATES = "mp_rank_00_model_states.pt"


class WeightsError(Gpt2distError, RuntimeError):
    """A model path that is missing or holds no weights we can load (names the file)."""


@dataclass
class CheckpointWeights:
    """The fp32 weights of a gpt2dist checkpoint, by our parameter names, materialised on request."""

    config: GPTConfig
    shapes: dict[str, torch.Size]
    tensor: Callable[[str], torch.Tensor]  # name -> fp32 CPU tensor


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint directory a run directory, a checkpoints/ directory or a checkpoint names; None if none."""
    path = Path(path)
    for root in (path / CHECKPOINTS, path):
        if tags := complete_tags(root):
            return root / tags[-1]
    if (path / "config.yaml").is_file() and any(path.glob("*model_states.pt")):
        return path
    return None


def checkpoint_weights(ckpt_dir: str | Path) -> CheckpointWeights:
    """Open a checkpoint's weights without materialising them all (see the module docstring)."""
    ckpt_dir = Path(ckpt_dir)
    saved = _saved_config(ckpt_dir)
    config = gpt_config(saved.model)
    with torch.device("meta"):
        model = GPT(config)
    state = _checkpoint_state(ckpt_dir, saved, model)
    shapes = {name: torch.Size(t.shape) for name, t in state.items()}
    return CheckpointWeights(config, shapes, lambda name: state[name].contiguous().detach().float())


def _saved_config(ckpt_dir: Path):
    config_path = ckpt_dir / "config.yaml"
    if not config_path.is_file():
        raise WeightsError(f"{config_path}: missing; not a complete gpt2dist checkpoint")
    return OmegaConf.load(config_path)


def _checkpoint_state(ckpt_dir: Path, saved, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds (of an adapted model, the adapters only), by name; `model` (on any
    device, meta too) is the one it was saved from, whose parameter order DeepSpeed's stage-0 masters follow."""
    if saved.zero.stage == 0:
        path = ckpt_dir / STAGE0_STATES
        return _stage0_state(model, safe_load.load(path, WeightsError, map_location="cpu", mmap=True), path,
                             saved.optim)
    deepspeed_env.load()  # the accelerator named, not detected with a warning
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        # DeepSpeed's progress notes are not our output.
        with contextlib.redirect_stdout(sys.stderr), safe_load.only_weights(WeightsError):
            # lazy_mode: ZeRO-3 shards are gathered per tensor on request, from memory-mapped files.
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, lazy_mode=True)
    except WeightsError:
        raise
    except Exception as e:  # missing or truncated shards: DeepSpeed and torch.load raise many types
        raise WeightsError(f"{ckpt_dir}: cannot consolidate the ZeRO-{saved.zero.stage} checkpoint ({e})") from None


def _stage0_state(model: torch.nn.Module, states: dict, path: Path, optim_cfg) -> dict[str, torch.Tensor]:
    """A stage-0 checkpoint's weights: the module's, or with bf16/fp16 the optimizer's fp32 master copy.

    DeepSpeed keeps that copy as lists of tensors in the order of the parameter groups of the
    optimizer that saved it (`optim_cfg`), without names.
    """
    module = states["module"]
    groups = (states.get("optimizer") or {}).get("fp32_groups")
    if not groups:
        return module
    names = {id(p): name for name, p in model.named_parameters()}
    ordered = [names[id(p)] for group in param_groups(model, optim_cfg) for p in group["params"]]
    master = [t for group in groups for t in group]
    if len(master) != len(ordered) or any(module[n].shape != t.shape for n, t in zip(ordered, master)):
        raise WeightsError(f"{path}: the fp32 master weights do not match the model's parameters")
    state = dict(zip(ordered, master))
    if "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def is_adapted(ckpt_dir: Path) -> bool:
    """Whether a checkpoint holds adapters (peft.method) rather than a whole model."""
    return _saved_config(ckpt_dir).get("peft", {}).get("method", "none") != "none"


@dataclass
class Adapter:
    """Adapters to put on a base model: where they are, the base they were trained on, their peft.* settings,
    and `load`, which puts their weights into that base once the same adapters are applied to it."""

    source: Path  # a checkpoint of a peft run, or a directory in PEFT's format
    base: Path
    base_sha256: str | None  # as a peft run records it (`adapters.weights_sha256`); PEFT's format has none
    settings: DictConfig
    load: Callable[[GPT], None]
    config: GPTConfig | None = None  # the adapted model's shape where it differs from the base's (a classifier's head)


def find_adapter(path: str | Path, adapter_dir: str | Path | None = None) -> Adapter | None:
    """The adapters of a peft run (or checkpoint) at `path`, or those of `adapter_dir`, a directory in PEFT's
    format, on the base `path`; `path` itself such a directory: on the base it names, a local directory.
    None when `path` is a whole model and no adapter_dir is given."""
    from gpt2dist.models import adapters
    from gpt2dist.training.checkpoint import read_manifest

    if adapter_dir is None and adapters.is_peft_dir(path):
        with _as_weights_error(adapters.AdapterError):
            base = adapters.recorded_base(path)
        if not base or not Path(base).is_dir():
            raise WeightsError(f"{path}: its base_model_name_or_path {base!r} is not a local directory: give the base "
                               "model's path, and this directory as the adapter (--adapter, train.init_adapter)")
        return find_adapter(base, path)
    if adapter_dir is not None:
        with _as_weights_error(adapters.AdapterError):
            settings, state = adapters.read_peft_dir(adapter_dir)
        return Adapter(Path(adapter_dir), Path(path), None, OmegaConf.create(settings),
                       lambda model: adapters.load_peft_weights(model, state, adapter_dir))
    ckpt_dir = None if (Path(path) / "config.json").is_file() else find_checkpoint(path)
    if ckpt_dir is None or not is_adapted(ckpt_dir):
        return None
    saved = _saved_config(ckpt_dir)
    base = read_manifest(ckpt_dir)["train_state"]["base"]

    def load(model: GPT) -> None:
        state = _checkpoint_state(ckpt_dir, saved, model)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if set(state) != trainable:
            raise WeightsError(f"{ckpt_dir}: its weights are not the adapters of peft.method={saved.peft.method} "
                               f"({len(state)} tensors, {len(trainable)} expected)")
        # ZeRO-3 checkpoints give tensors gathered from the ranks' shards here (contiguous()).
        model.load_state_dict({k: v.contiguous().float() for k, v in state.items()}, strict=False)

    return Adapter(ckpt_dir, Path(base["path"]), base["sha256"], saved.peft, load, gpt_config(saved.model))


def check_base(adapter: Adapter, model: GPT) -> str:
    """Refuse a base whose weights changed since the adapters were trained on it; returns its SHA-256."""
    from gpt2dist.models import adapters

    sha256 = adapters.weights_sha256(model)
    if adapter.base_sha256 and sha256 != adapter.base_sha256:
        raise WeightsError(f"{adapter.source}: its adapters were trained on {adapter.base}, whose weights have changed "
                           f"since (SHA-256 {adapter.base_sha256[:12]} expected, {sha256[:12]} found)")
    return sha256


def attach(model: GPT, adapter: Adapter, settings=None) -> GPT:
    """Apply the adapters (with `settings`, by default theirs: a run may change their dropout) to the base
    `model` in place and load their weights; adapters that do not fit the base are refused."""
    from gpt2dist.models import adapters

    try:
        adapters.apply(model, settings or adapter.settings)
    except ValueError as e:  # peft: a target module the base does not have
        raise WeightsError(f"{adapter.source}: its adapters do not fit the base {adapter.base} ({e})") from None
    with _as_weights_error(adapters.AdapterError):
        adapter.load(model)
    return model


def load_adapted(adapter: Adapter, device: torch.device | str = "cpu", base: str | Path | None = None) -> GPT:
    """A GPT with its adapters (unmerged), in eval mode: the frozen base (`base`, by default the one the
    adapters record), checked against the SHA-256 a peft run recorded, then the adapters."""
    base = base or adapter.base
    if find_adapter(base) is not None:
        raise WeightsError(f"{base}: a run that trained adapters is no base for other adapters: "
                           "export it merged first (python -m gpt2dist.export)")
    if adapter.config is not None and adapter.config.labels:
        # A classifier's head trained with its adapters: the base holds the rest (see adapters.weights_sha256).
        model = load_into(empty_model(adapter.config, device), base)
    else:
        model = load_model(base, device, quiet=True)
    check_base(adapter, model)
    return attach(model, adapter).eval()


def empty_model(config: GPTConfig, device: torch.device | str = "cpu") -> GPT:
    """A GPT with uninitialised weights: no time spent on a random init that is overwritten."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.lm_head.weight = model.transformer.wte.weight  # to_empty unties them
    return model


def fill(model: GPT, tensors: Iterable[tuple[str, torch.Tensor]], source: Path, fresh: Collection[str] = ()) -> GPT:
    """Copy (name, tensor) pairs into the model, checking that every weight is given exactly once; the
    weights named in `fresh` may be missing (they keep their values)."""
    targets = model.state_dict()
    loaded = set()
    with torch.no_grad():
        for name, tensor in tensors:
            if name == "lm_head.weight":  # the token embedding, tied
                continue
            if name == "transformer.wte.weight" and tensor.shape[0] >= model.config.vocab_size:
                tensor = pad_vocab(tensor[: model.config.vocab_size], model.config)  # whatever padding it had
            if name not in targets or targets[name].shape != tensor.shape:
                expected = tuple(targets[name].shape) if name in targets else "no such weight"
                raise WeightsError(f"{source}: {name} {tuple(tensor.shape)} does not fit the model ({expected})")
            targets[name].copy_(tensor)
            loaded.add(name)
    missing = sorted(set(targets) - loaded - {"lm_head.weight", *fresh})
    if missing:
        raise WeightsError(f"{source}: {len(missing)} weights missing, such as {missing[0]}")
    return model


def open_weights(path: str | Path) -> tuple[GPTConfig, Iterator[tuple[str, torch.Tensor]], Path]:
    """(shape, (name, fp32 tensor) one at a time, the file or directory they come from) of a model path."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file or directory")
    if compressed.is_compressed(path):
        with _as_weights_error(compressed.CompressedError):
            config, tensors = compressed.plain_tensors(path)
        return config, tensors, path
    if (path / "config.json").is_file():
        try:
            return read_hf_config(path), _hf_checked(path), path
        except HFError as e:
            raise WeightsError(str(e)) from None
    ckpt_dir = find_checkpoint(path)
    if ckpt_dir is None:
        raise WeightsError(f"{path}: not a gpt2dist run directory (no complete checkpoint in {CHECKPOINTS}/), checkpoint "
                           "directory or Hugging Face directory (no config.json)")
    weights = checkpoint_weights(ckpt_dir)
    return weights.config, ((name, weights.tensor(name)) for name in weights.shapes), ckpt_dir


def _hf_checked(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        yield from hf_tensors(path)
    except HFError as e:
        raise WeightsError(str(e)) from None


@contextlib.contextmanager
def _as_weights_error(error_cls: type[Exception]):
    try:
        yield
    except error_cls as e:
        raise WeightsError(str(e)) from None


def load_model(path: str | Path, device: torch.device | str = "cpu", quiet: bool = False,
               adapter: str | Path | None = None, language_model: bool = False) -> GPT:
    """A GPT in eval mode, from a run, checkpoint, Hugging Face or compressed directory (see the module
    docstring); of a run that trained adapters, its base with the adapters; with `adapter`, a directory in
    PEFT's format, that adapter on the model at `path` (`load_adapted`). `language_model`: refuse a
    classifier (for the commands that predict tokens). Prints (to stderr, unless quiet) what it loaded: the
    commands' outputs say which model spoke."""
    found = find_adapter(path, adapter) if adapter is not None or not compressed.is_compressed(path) else None
    if found is not None:
        model = load_adapted(found, device, base=path if adapter is not None else None)
    elif compressed.is_compressed(path):
        with _as_weights_error(compressed.CompressedError):
            model = compressed.load(path, device)
    else:
        config, tensors, source = open_weights(path)
        model = fill(empty_model(config, device), tensors, source).eval()
    if language_model and model.config.labels:
        raise WeightsError(f"{path}: a classifier (task=classify, labels {', '.join(model.config.labels)}) scores "
                           "texts and predicts no tokens: export it (python -m gpt2dist.export) to use it")
    if not quiet:
        print(f"loaded {describe(path, model)}" + (f" with the adapter {adapter}" if adapter else ""), file=sys.stderr)
    return model


def describe(path: str | Path, model: GPT) -> str:
    """One line naming a loaded model: its path, size, and how it was compressed if it was."""
    what = f"{path}: {model.num_params():,} parameters, {model.config.n_layer} layers"
    if compressed.is_compressed(path):
        what += f", compressed: {compressed.read_manifest(path)['method']}"
    return what


def load_into(model: GPT, path: str | Path) -> GPT:
    """Overwrite a model's weights with those at `path` (to start training from them); the shapes must match
    (the vocabulary's padding may differ). A language model's weights start a classifier, whose head
    keeps its values (a new head)."""
    config, tensors, source = open_weights(path)
    theirs, ours = config.shape(), model.config.shape()
    fresh = {"score.weight"} if model.config.labels and not config.labels else set()
    if fresh:
        theirs["labels"] = ours["labels"]
    if theirs != ours:
        raise WeightsError(f"{source}: model {theirs} does not match {ours}")
    return fill(model, tensors, source, fresh)
