"""The optimizer (`optim.name`), its parameter groups, and the learning-rate schedule.

The optimizer is built here and only here, for the DeepSpeed engine and the bare-loop
benchmark alike. Adding one: a member of `Optimizer`, its branch in `build_optimizer` (and in
`param_groups` if it splits the parameters its own way), and `conf/optim/<name>.yaml` with its defaults.

Muon (Jordan et al. 2024) takes the 2-D weight matrices of the transformer blocks; the embeddings
(and the head tied to them), the classifier head, LayerNorms and biases go to an AdamW beside it, as
in modded-nanogpt and Moonlight. Both halves are DeepSpeed's `MuonWithAuxAdam`, which ZeRO 1-3 know:
they orthogonalize each matrix's whole (gathered) momentum before partitioning it. Learning rates
follow Moonlight (Liu et al. 2025): a matrix's orthogonalized update is scaled by 0.2 sqrt(max(m, n)),
which gives it the RMS of a typical AdamW update, so AdamW's `optim.lr` and `optim.weight_decay`
carry over to both halves.

Both shapes start with a linear warmup to the peak (`optim.lr`):
- cosine: cosine decay to `optim.min_lr` at `train.max_steps`;
- constant: constant at the peak, then a linear anneal to `optim.min_lr` over the last
  `optim.decay_steps` (warmup-stable-decay: the "infinite" schedule of Ibrahim et al. 2024
  without its cooldown phase). A run can stop on the plateau and be annealed later, or
  continued on new data without re-warming from a decayed learning rate.
"""

import math
import re
from enum import Enum

import torch


class Optimizer(str, Enum):
    adamw = "adamw"  # AdamW: torch's (fused on GPUs); DeepSpeed's CPU Adam under ZeRO-Offload
    lion = "lion"  # Lion (Chen et al. 2023): DeepSpeed's FusedLion on GPUs, its CPU Lion on CPUs and under offload
    muon = "muon"  # Muon on the blocks' matrices, AdamW on the rest: DeepSpeed's MuonWithAuxAdam (see above)


def build_optimizer(groups: list[dict], optim_cfg, offload: bool, is_main: bool = True) -> torch.optim.Optimizer:
    """The optimizer `optim_cfg.name` over `groups` (see param_groups). `offload`: its state and
    step live on the CPU (ZeRO-Offload), where DeepSpeed needs its own CPU optimizers."""
    from gpt2dist.training import deepspeed_env

    o = optim_cfg
    betas = (o.beta1, o.beta2)
    name = Optimizer(o.name)
    if name == Optimizer.adamw:
        if offload:
            deepspeed_env.announce_build("CPUAdamBuilder", "CPU Adam optimizer", is_main)
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=o.lr, betas=betas, eps=o.eps, weight_decay=o.weight_decay,
                                    adamw_mode=True)
        return torch.optim.AdamW(groups, lr=o.lr, betas=betas, eps=o.eps, weight_decay=o.weight_decay,
                                 fused=True if torch.cuda.is_available() else None)
    if name == Optimizer.lion:  # no eps: Lion's update is the sign of an interpolated momentum
        if offload or not torch.cuda.is_available():
            deepspeed_env.announce_build("CPULionBuilder", "CPU Lion optimizer", is_main)
            from deepspeed.ops.lion import DeepSpeedCPULion

            return DeepSpeedCPULion(groups, lr=o.lr, betas=betas, weight_decay=o.weight_decay)
        from deepspeed.ops.lion import FusedLion

        return FusedLion(groups, lr=o.lr, betas=betas, weight_decay=o.weight_decay)
    if name == Optimizer.muon:
        return _muon(groups, o, offload, is_main)
    raise AssertionError(f"no builder for optimizer {name}")


def _muon(groups: list[dict], o, offload: bool, is_main: bool) -> torch.optim.Optimizer:
    """DeepSpeed's MuonWithAuxAdam over `groups` (muon_groups' split); its AdamW half is torch's AdamW,
    or DeepSpeed's CPU Adam under ZeRO-Offload."""
    from gpt2dist.training import deepspeed_env

    if not torch.cuda.is_available():
        _eager_fp32_newton_schulz()
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    groups = [{**g, "momentum": o.momentum, "ns_method": "gram"} if g["use_muon"] else
              {**g, "betas": (o.beta1, o.beta2), "eps": o.eps} for g in groups]
    if offload:
        deepspeed_env.announce_build("CPUAdamBuilder", "CPU Adam optimizer", is_main)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return MuonWithAuxAdam(groups, adam_optimizer=DeepSpeedCPUAdam, adam_optimizer_kwargs={"adamw_mode": True})
    return MuonWithAuxAdam(groups, adam_optimizer=torch.optim.AdamW,
                           adam_optimizer_kwargs={"fused": True if torch.cuda.is_available() else None})


def _eager_fp32_newton_schulz() -> None:
    """On a CPU, run DeepSpeed's Newton-Schulz eagerly and in fp32. It torch.compiles it, which costs
    a CPU about a minute of inductor compilation per run, and picks fp16 (or bf16) wherever the
    accelerator claims them, which a CPU without half-precision matrix units runs 3-8x slower than
    fp32 (measured on this repository's 2-core Xeon: a 768x256 update 0.47 s in fp16, 0.06 s in fp32).
    ZeRO 1-3 look both up in DeepSpeed's module at each step, so they are replaced there."""
    from deepspeed.runtime.zero.muon import muon_optimizer, original_muon

    for name in ("muon_update", "zeropower_via_gram_newtonschulz", "zeropower_via_newtonschulz5"):
        fn = getattr(original_muon, name)
        setattr(original_muon, name, getattr(fn, "_torchdynamo_orig_callable", fn))
    muon_optimizer.muon_update = original_muon.muon_update
    original_muon.ns_compute_dtype = lambda ns_method="gram": torch.float32


# A weight matrix of a transformer block, by name: Muon's share (peft's wrapper adds a prefix).
_BLOCK_MATRIX = re.compile(r"(^|\.)transformer\.h\.\d+\.")


def param_groups(model: torch.nn.Module, optim_cfg) -> list[dict]:
    """The optimizer's parameter groups: weight decay on matrices (linear and embedding weights),
    none on biases and LayerNorms; for Muon, that split again by `muon_groups`."""
    if Optimizer(optim_cfg.get("name", "adamw")) == Optimizer.muon:
        return muon_groups(model, optim_cfg.lr, optim_cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim_cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def muon_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Muon's groups: the blocks' weight matrices by their number of columns n (inputs), then AdamW's,
    decayed (embeddings, heads) and not (biases, LayerNorms). Each parameter is tagged `use_muon`,
    which DeepSpeed's ZeRO stages read.

    DeepSpeed scales an orthogonalized (m, n) update by sqrt(max(1, m/n)) (Keller Jordan's rule);
    Moonlight's 0.2 sqrt(max(m, n)) is that times 0.2 sqrt(n) for every shape, so a group of n
    columns gets lr x 0.2 sqrt(n), and its weight decay / (0.2 sqrt(n)), so that the decay per step
    (lr x weight_decay) is AdamW's. The schedule multiplies every group's lr alike.
    """
    muon: dict[int, list] = {}
    adam_decay, adam_flat = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        p.use_muon = p.dim() == 2 and bool(_BLOCK_MATRIX.search(name))
        if p.use_muon:
            muon.setdefault(p.shape[1], []).append(p)
        else:
            (adam_decay if p.dim() >= 2 else adam_flat).append(p)
    groups = []
    for n, params in sorted(muon.items()):
        scale = 0.2 * math.sqrt(n)
        # Largest first, as MuonWithAuxAdam would sort them (stable): the order checkpoints keep.
        groups.append({"params": sorted(params, key=lambda p: p.size(), reverse=True), "use_muon": True,
                       "lr": lr * scale, "weight_decay": weight_decay / scale})
    groups += [{"params": adam_decay, "use_muon": False, "lr": lr, "weight_decay": weight_decay},
               {"params": adam_flat, "use_muon": False, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, optim_cfg, max_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    min_ratio = optim_cfg.min_lr / optim_cfg.lr
    warmup = optim_cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if optim_cfg.schedule == "constant":
        decay_start = max_steps - optim_cfg.decay_steps
        if step < decay_start or optim_cfg.decay_steps == 0:
            return 1.0
        progress = min(1.0, (step - decay_start) / optim_cfg.decay_steps)
        return 1.0 - progress * (1.0 - min_ratio)
    if step >= max_steps:
        return min_ratio
    progress = (step - warmup) / max(1, max_steps - warmup)
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


def lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim_cfg, max_steps))
