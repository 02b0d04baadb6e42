"""Pruning a GPT: unstructured (zeroed weights, masks kept through recovery training) and structured
(whole MLP neurons removed, so the matrices really shrink).

Unstructured global magnitude pruning zeroes the smallest |w| of all the blocks' linear weights
together, so layers lose different shares. Recovery training (`train.py train.init_from=<pruned>`)
keeps the zeros: `keep_masks` multiplies those weights' gradients by their masks, and with a new
optimizer a weight whose gradient is always zero never moves (Adam's moments stay zero, decoupled
weight decay of zero is zero, gradient clipping scales zero to zero), at any ZeRO stage or precision.

Structured pruning removes the MLP neurons (rows of c_fc, columns of c_proj) of least importance,
importance measured on data: the mean |activation| of the neuron times the norm of its output
weights, i.e. how much it adds to the residual stream on average. Every block keeps the same number
of neurons, so the model still fits Hugging Face's GPT-2 (`n_inner`).
"""

import math
from collections.abc import Iterable
from pathlib import Path

import torch

from gpt2dist.models import compressed
from gpt2dist.models.gpt import GPT, GPTConfig

PRUNABLE = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def prunable(model: GPT) -> dict[str, torch.nn.Parameter]:
    """The blocks' linear weights, by name: what unstructured pruning zeroes."""
    return {name: p for name, p in model.named_parameters() if name.endswith(PRUNABLE)}


@torch.no_grad()
def magnitude_prune(model: GPT, sparsity: float) -> list[str]:
    """Zero the round(sparsity x total) smallest-magnitude weights of `prunable`, all layers ranked together;
    returns the names of the pruned weights."""
    weights = prunable(model)
    flat = torch.cat([p.abs().flatten() for p in weights.values()])
    n_zero = round(sparsity * flat.numel())
    # Exactly n_zero, ties at the threshold included: zero the positions of the n_zero smallest.
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask[torch.topk(flat, n_zero, largest=False).indices] = False
    offset = 0
    for p in weights.values():
        p.mul_(mask[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return list(weights)


def sparsity(model: GPT, names: Iterable[str]) -> float:
    """Share of exact zeros in the named weights."""
    params = dict(model.named_parameters())
    zeros = total = 0
    for name in names:
        zeros += int((params[name] == 0).sum())
        total += params[name].numel()
    return zeros / total


def fixed_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Masks (True: weight kept) of the weights unstructured pruning zeroed in the model at `path`;
    empty unless it is a compressed directory made by `prune`."""
    if not compressed.is_compressed(path):
        return {}
    names = compressed.read_manifest(path).get("pruned", [])
    if not names:
        return {}
    _, tensors = compressed.plain_tensors(path)
    return {name: tensor != 0 for name, tensor in tensors if name in names}


def keep_masks(model: GPT, masks: dict[str, torch.Tensor]) -> None:
    """From now on, the named weights' gradients are multiplied by their masks (see the module docstring)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        mask = mask.to(params[name].device)
        params[name].register_hook(lambda grad, mask=mask: grad * mask)


@torch.no_grad()
def mlp_importance(model: GPT, batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Per distinct block, each MLP neuron's importance (n_hidden,): mean |GELU output| over the tokens of
    `batches` (B, T) times the L2 norm of its column of c_proj."""
    blocks = model.transformer.h
    sums = [torch.zeros(b.mlp.c_proj.in_features, dtype=torch.float64) for b in blocks]
    tokens = 0

    def hook(i):
        def add(module, inputs):
            sums[i] += inputs[0].abs().double().sum(dim=(0, 1)).cpu()  # c_proj's input: (B, T, hidden)
        return add

    handles = [b.mlp.c_proj.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        for idx in batches:
            model(idx)
            tokens += idx.numel() * model.config.share_layers  # a shared block sees every token once per layer
    finally:
        for h in handles:
            h.remove()
    return [(s / tokens).float() * b.mlp.c_proj.weight.norm(dim=0).cpu() for s, b in zip(sums, blocks)]


@torch.no_grad()
def prune_mlp(model: GPT, fraction: float, importance: list[torch.Tensor]) -> GPT:
    """A new GPT whose MLPs keep, in every block, the (1 - fraction) most important neurons (in their order)."""
    config = model.config
    widths = [config.mlp_width(b) for b in range(config.n_blocks)]
    keep = math.ceil(min(widths) * (1 - fraction))
    kept = [scores.topk(keep).indices.sort().values for scores in importance]
    small = GPT(GPTConfig(**{**config.__dict__, "mlp_hidden": (keep,) * config.n_blocks}))
    state = model.state_dict()
    for b, rows in enumerate(kept):
        for key, select in (("c_fc.weight", lambda t: t[rows]), ("c_fc.bias", lambda t: t[rows]),
                            ("c_proj.weight", lambda t: t[:, rows])):
            name = f"transformer.h.{b}.mlp.{key}"
            state[name] = select(state[name])
    small.load_state_dict(state)
    return small.eval()
