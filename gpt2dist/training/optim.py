"""The optimizer (`optim.name`), its parameter groups, and the learning-rate schedule.

The optimizer is built here and only here, for the DeepSpeed engine and the bare-loop
benchmark alike. Adding one: a member of `Optimizer`, its branch in `build_optimizer`, and
`conf/optim/<name>.yaml` with its defaults.

Both shapes start with a linear warmup to the peak (`optim.lr`):
- cosine: cosine decay to `optim.min_lr` at `train.max_steps`;
- constant: constant at the peak, then a linear anneal to `optim.min_lr` over the last
  `optim.decay_steps` (warmup-stable-decay: the "infinite" schedule of Ibrahim et al. 2024
  without its cooldown phase). A run can stop on the plateau and be annealed later, or
  continued on new data without re-warming from a decayed learning rate.
"""

import math
from enum import Enum

import torch


class Optimizer(str, Enum):
    adamw = "adamw"  # AdamW: torch's (fused on GPUs); DeepSpeed's CPU Adam under ZeRO-Offload
    lion = "lion"  # Lion (Chen et al. 2023): DeepSpeed's FusedLion on GPUs, its CPU Lion on CPUs and under offload


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
    raise AssertionError(f"no builder for optimizer {name}")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights); none on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


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
