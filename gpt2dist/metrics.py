"""Metrics: computed once here, sent to every backend (console, metrics.jsonl, W&B).

Only rank 0 builds a `Metrics`; other ranks get `None` and log nothing.
"""

import json
import os
import uuid
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gpt2dist.config import WandbMode

WANDB_INIT_TIMEOUT_S = 60  # an unreachable W&B server costs at most this once, at start-up

# Dense bf16 tensor-core peak of one device, FLOP/s (without sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "L40S": 362e12,
    "RTX 4090": 165e12,
    "V100": 125e12,
}


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> int:
    """Training FLOPs per token, PaLM appendix B: 6N + 12 * L * H * Q * T (H * Q = n_embd)."""
    return 6 * n_params + 12 * n_layer * n_embd * seq_len


def mfu(tokens_per_s_per_device: float, flops_per_token: int, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: the share of the device's peak that the model's FLOPs (not
    recomputation, not padding) use; None without a known peak (CPUs, unlisted GPUs)."""
    return tokens_per_s_per_device * flops_per_token / peak_flops if peak_flops else None


def peak_gpu_memory_gib() -> float | None:
    """Most GPU memory this process's tensors have held at once, GiB; None without a GPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def device_peak_flops(override_tflops: float | None) -> float | None:
    """Peak FLOP/s of this rank's GPU from the table (or the override); None on CPU or unknown GPUs."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def _format(key: str, value) -> str:
    if isinstance(value, float):
        if key == "lr":
            return f"{key} {value:.2e}"
        if key == "mfu":
            return f"{key} {100 * value:.1f}%"
        if key in ("tokens_per_s", "tokens"):
            return f"{key} {value:,.0f}"
        return f"{key} {value:.4f}"
    if isinstance(value, int):
        return f"{key} {value:,}"
    return f"{key} {value}"


class Metrics:
    def __init__(self, cfg, run_dir: Path, resume_step: int, name: str):
        self.max_steps = cfg.train.max_steps
        self.jsonl = None
        if cfg.logger.jsonl:
            path = run_dir / "metrics.jsonl"
            _truncate_after(path, resume_step)
            self.jsonl = open(path, "a")
        self.wandb = None
        mode = WandbMode(cfg.logger.wandb)
        if mode != WandbMode.disabled:
            import wandb

            id_file = run_dir / "wandb_id"  # the same W&B run across resumes
            if not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:8])
            init = dict(project=cfg.logger.wandb_project, name=name, id=id_file.read_text().strip(),
                        resume="allow", dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=True),
                        settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, silent=True))
            try:
                self.wandb = wandb.init(mode=mode.value, **init)
            except Exception as e:  # no network, no API key, a server error: never stop training for W&B
                if mode != WandbMode.online:
                    raise
                print(f"warning: W&B online failed ({type(e).__name__}: {e}); logging offline instead "
                      f"(upload later with `wandb sync`)", flush=True)
                self.wandb = wandb.init(mode=WandbMode.offline.value, **init)
            print(f"W&B: {self.wandb.settings.mode} run {name!r} (id {self.wandb.id}) under {run_dir / 'wandb'}",
                  flush=True)

    def log(self, step: int, values: dict) -> None:
        values = {k: v for k, v in values.items() if v is not None}
        print(f"step {step}/{self.max_steps} | " + " | ".join(_format(k, v) for k, v in values.items()), flush=True)
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()
        if self.wandb:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.wandb:
            self.wandb.finish()


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # a line cut short by a crash


def _truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after `step` (a resumed run logs those steps again) and any line a
    crash cut short."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if (s := _step_of(line)) is not None and s <= step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
