"""Post-training quantization of a GPT's linear layers with torchao, and casts to bf16/fp16.

Methods (`python -m gpt2dist.compress quantize --method ...`):
- int8-weight: int8 weights, one scale per output row; activations stay fp32 (torchao Int8WeightOnlyConfig).
- int4-weight: int4 weights in groups of INT4_GROUP input columns, each group with a scale and zero point
  (torchao IntxWeightOnlyConfig). On a CPU torchao keeps each int4 value in an int8 (its only CPU int4
  weight-only format), so memory and disk are those of int8, with int4's precision.
- int8-dynamic: int8 weights and int8 activations, quantized per token as they arrive
  (Int8DynamicActivationInt8WeightConfig): integer matrix multiplies.
- bf16 / fp16: every weight cast.

Only the blocks' linear layers are quantized: the token embedding is also the (tied) LM head, and
quantizing the head alone would untie them; embeddings and LayerNorms are a small part of GPT-2's
weights beyond the smallest models.
"""

import torch

from gpt2dist.models.compressed import CAST, QUANTIZED
from gpt2dist.models.gpt import GPT

METHODS = (*QUANTIZED, *CAST)
INT4_GROUP = 32  # input columns per int4 scale: 32 keeps quality close to int8's at 1/16 more storage


def _torchao_config(method: str):
    from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                      IntxWeightOnlyConfig, PerGroup)

    return {
        "int8-weight": Int8WeightOnlyConfig,
        "int4-weight": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP)),
        "int8-dynamic": Int8DynamicActivationInt8WeightConfig,
    }[method]()


def _block_linear(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and name.startswith("transformer.h.")


def quantize(model: GPT, method: str) -> GPT:
    """Quantize (or cast) `model` in place with `method` (one of METHODS); returns it, in eval mode."""
    model.eval().requires_grad_(False)
    if method in CAST:
        return model.to(CAST[method])
    if method == "int4-weight":
        for name, module in model.named_modules():
            if _block_linear(module, name) and module.in_features % INT4_GROUP:
                raise ValueError(f"{name}: {module.in_features} inputs are not a multiple of the int4 group "
                                 f"size {INT4_GROUP}")
    from torchao.quantization import quantize_

    quantize_(model, _torchao_config(method), filter_fn=_block_linear)
    return model


def linear_weight_bytes(model: GPT) -> int:
    """Bytes the blocks' linear weights take as stored (quantized data, scales and zero points)."""
    total = 0
    for name, module in model.named_modules():
        if _block_linear(module, name):
            w = module.weight
            names = [*getattr(w, "tensor_data_names", ()), *getattr(w, "optional_tensor_data_names", ())]
            parts = [getattr(w, n) for n in names] or [w]
            total += sum(p.numel() * p.element_size() for p in parts if p is not None)
    return total
