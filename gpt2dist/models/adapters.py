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
"""

import hashlib
import json
from enum import Enum
from pathlib import Path

import torch

from gpt2dist.models.gpt import GPT

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


def read_adapter_config(adapter_dir: Path) -> dict:
    return json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
