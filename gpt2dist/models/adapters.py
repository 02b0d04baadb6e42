"""Parameter-efficient fine-tuning (LoRA, IA3) of our GPT through Hugging Face's `peft`.

The adapters are injected into the GPT in place (`peft.inject_adapter_in_model`), so it stays a
`GPT` that the engine, generation and evaluation use as before; only the adapter weights train.
The frozen base is named by its path and the SHA-256 of its weights (`base_reference`): a
checkpoint holds the adapter weights and their optimizer state only, and resumes on the same base.

Exports:
- `save_adapter`: PEFT's own format (adapter_config.json, adapter_model.safetensors), which
  `peft.PeftModel.from_pretrained` loads onto `transformers.GPT2LMHeadModel`. Our linear layers are
  `nn.Linear` where Hugging Face's are `Conv1D` ((in, out) weights), so the config says
  `fan_in_fan_out`; the adapter tensors themselves have the same shapes on both sides.
- `merge`: the adapters folded into the base weights, a plain GPT for `gpt2dist.models.hf.export_hf`.

Reading: `read_peft_dir` takes a LoRA or IA3 adapter in PEFT's format (ours, or one peft saved on
`transformers.GPT2LMHeadModel`) as peft.* settings and weights; `load_peft_weights` puts them into a
GPT the same adapters were applied to (`gpt2dist.models.weights.find_adapter` joins it to its base).
"""

import hashlib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from gpt2dist.errors import BadFile, Gpt2distError
from gpt2dist.models.gpt import GPT, LIMITS
from gpt2dist.safe_json import Fields, read_json, shown

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how PeftModel names the wrapped model's weights


class PeftMethod(str, Enum):
    none = "none"  # full fine-tuning: every weight trains
    lora = "lora"  # low-rank updates of the target linear layers (Hu et al. 2021)
    ia3 = "ia3"  # learned rescaling of the target layers' activations (Liu et al. 2022)


def peft_config(cfg, fan_in_fan_out: bool = False):
    """The `peft` config of `peft.*` (a PeftConfig of this schema); `fan_in_fan_out` for Hugging Face's Conv1D."""
    import peft

    method = PeftMethod(cfg.method)
    targets = list(cfg.target_modules)
    if method == PeftMethod.lora:
        return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                               fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM")
    return peft.IA3Config(target_modules=targets, feedforward_modules=list(cfg.feedforward_modules),
                          fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM")


def apply(model: GPT, cfg) -> GPT:
    """Inject the adapters of `cfg` (`peft.*`) into the model in place and freeze everything else.

    From then on the model's state_dict holds the trainable weights only, so that DeepSpeed's
    checkpoints do too: its `exclude_frozen_parameters` misses the tied LM head, which
    `named_parameters` lists once, as the token embedding. A classifier's head trains in full
    (what peft's `modules_to_save` does): it is new, and no adapter of the body can stand in for it."""
    import peft

    peft.inject_adapter_in_model(peft_config(cfg), model)
    if model.config.labels:
        model.score.requires_grad_(True)
    model.register_state_dict_post_hook(_drop_frozen)
    return model


def _drop_frozen(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name, p in module.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            state_dict.pop(prefix + name, None)


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def weights_sha256(model: GPT) -> str:
    """SHA-256 of the model's weights (names, shapes, dtypes and bytes), whatever file they came from; of a
    classifier, all but its head, which trains with the adapters (so is no part of the frozen base)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.startswith("score."):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights, by PEFT's names (no adapter name: `transformer.h.0.attn.c_attn.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def save_adapter(model: GPT, cfg, out_dir: str | Path, base: str) -> Path:
    """Write the adapters in PEFT's format; `base` is recorded as base_model_name_or_path."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = peft_config(cfg, fan_in_fan_out=True)
    config.base_model_name_or_path = str(base)
    config.save_pretrained(str(out_dir))
    state = {PEFT_PREFIX + name: t.detach().float().cpu().contiguous() for name, t in adapter_state(model).items()}
    save_file(state, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out_dir


def merge(model: GPT) -> GPT:
    """Fold the adapters into the weights they adapt and take them out: a plain GPT again (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


class AdapterError(Gpt2distError, ValueError):
    """An adapter directory we cannot read, or adapters that do not fit a model (names the directory)."""


class BadAdapterFile(AdapterError, BadFile):
    """An adapter_config.json (or its weights) that does not hold what PEFT's format promises (names the key)."""


# PEFT options that peft.* cannot express, with the value that means "not used".
UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "modules_to_save": None,
               "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0}  # LoraConfig's, for the keys a file leaves out
MAX_ADAPTER_CONFIG_BYTES = 2**20  # peft writes ~1 kB


@dataclass(frozen=True)
class AdapterConfig:
    """adapter_config.json, checked (`read_adapter_config`): the adapters as peft.* settings, and their base."""

    method: PeftMethod
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    feedforward_modules: tuple[str, ...]
    base: str | None  # base_model_name_or_path

    def settings(self) -> dict:
        """As peft.* settings (gpt2dist.config.PeftConfig)."""
        return {"method": self.method.value, "r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.target_modules), "feedforward_modules": list(self.feedforward_modules)}


def is_peft_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(adapter_dir: str | Path) -> AdapterConfig:
    """An adapter directory's adapter_config.json, checked: a LoRA or IA3 config of peft on a list of target
    module names, r a positive integer, lora_alpha and lora_dropout numbers in range (peft's defaults for the
    keys left out only: an explicit value is never replaced), feedforward_modules among the targets, no option
    peft.* cannot express; a BadAdapterFile naming the key otherwise. The one reader of adapter_config.json."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    c = Fields(path, read_json(path, MAX_ADAPTER_CONFIG_BYTES, error=BadAdapterFile), error=BadAdapterFile)
    peft_type = c.get("peft_type", str)
    try:
        method = PeftMethod(peft_type.lower())
    except ValueError:
        method = PeftMethod.none
    if method == PeftMethod.none:
        raise c.bad("peft_type", f"{shown(peft_type)}: gpt2dist reads LORA or IA3 adapters")
    if isinstance(c.value.get("target_modules"), str):
        raise c.bad("target_modules", f"{shown(c.value['target_modules'])} is a regular expression, which "
                                      "peft.target_modules does not express: list the module names")
    targets = c.strings("target_modules", nonempty=True)
    for key, unused in UNSUPPORTED.items():
        if c.value.get(key) and c.value[key] != unused:
            raise c.bad(key, f"{shown(c.value[key])}, which gpt2dist's peft.* settings do not express (supported: "
                             "LoRA or IA3 on a list of target_modules)")
    lora = method == PeftMethod.lora
    r = c.count("r", 1, LIMITS["n_embd"], optional=True) if lora else None
    alpha = c.number("lora_alpha", 0, 2**16, optional=True) if lora else None
    dropout = c.number("lora_dropout", 0, 1, optional=True, open_high=True) if lora else None
    feedforward = []
    if not lora and c.value.get("feedforward_modules") is not None:  # peft writes null for none
        feedforward = c.strings("feedforward_modules")
    if outside := sorted(set(feedforward) - set(targets)):
        raise c.bad("feedforward_modules", f"{shown(outside[0])} is not among target_modules {shown(targets)}")
    base = c.get("base_model_name_or_path", (str, type(None)), optional=True)
    return AdapterConfig(method, PEFT_DEFAULTS["r"] if r is None else r,
                         float(PEFT_DEFAULTS["lora_alpha"] if alpha is None else alpha),
                         PEFT_DEFAULTS["lora_dropout"] if dropout is None else dropout,
                         tuple(targets), tuple(feedforward), base)


def read_peft_dir(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The peft.* settings (`read_adapter_config`) and the weights (PEFT's names, no prefix or adapter name) of
    an adapter directory in PEFT's format, as `save_adapter` or peft's `save_pretrained` write it; LoRA weights
    whose rank is not the config's r are refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    try:
        state = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise AdapterError(f"{adapter_dir / ADAPTER_WEIGHTS}: unreadable ({e}); peft writes it with "
                           "save_pretrained(safe_serialization=True), its default") from None
    for name, t in state.items():
        rank = t.shape[0] if name.endswith("lora_A.weight") else t.shape[-1] if name.endswith("lora_B.weight") else None
        if rank is not None and (t.dim() != 2 or rank != config.r):
            raise BadAdapterFile(adapter_dir / ADAPTER_CONFIG, f"{config.r}, but {ADAPTER_WEIGHTS} holds {name} "
                                                               f"{tuple(t.shape)}", "r")
    return config.settings(), {name.removeprefix(PEFT_PREFIX): t for name, t in state.items()}


def recorded_base(adapter_dir: str | Path) -> str | None:
    """The base model an adapter directory in PEFT's format names (base_model_name_or_path)."""
    return read_adapter_config(adapter_dir).base


def load_peft_weights(model: GPT, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Put adapter weights by PEFT's names (`read_peft_dir`) into a model the same adapters were applied to."""
    from peft import set_peft_model_state_dict

    expected = {name: tuple(t.shape) for name, t in adapter_state(model).items()}
    given = {name: tuple(t.shape) for name, t in state.items()}
    if given != expected:
        name = next(iter(sorted(set(given) ^ set(expected)) or [n for n in given if given[n] != expected[n]]))
        raise AdapterError(f"{source}: the adapter weights do not fit this base model: {name} is "
                           f"{given.get(name, 'missing')} in the adapter, {expected.get(name, 'absent')} in the model")
    set_peft_model_state_dict(model, {name: t.float() for name, t in state.items()})


def same_adapters(a, b) -> bool:
    """Whether two peft.* settings make the same adapters (dropout, a training setting, aside)."""
    def key(s) -> tuple:
        method = PeftMethod(s.method)
        lora = (s.r, float(s.alpha)) if method == PeftMethod.lora else ()
        ia3 = s.feedforward_modules if method == PeftMethod.ia3 else []
        return method, sorted(s.target_modules), lora, sorted(ia3)  # peft saves them as sets: in any order

    return key(a) == key(b)
