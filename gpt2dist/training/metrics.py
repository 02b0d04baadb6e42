"""Metrics: computed once here, sent to every backend of `logger.backends` (console, metrics.jsonl,
W&B, TensorBoard; see gpt2dist/training/metric_backends.py).

Only rank 0 builds a `Metrics`; other ranks get `None` and log nothing.
"""

import math
import time
from pathlib import Path

import torch

from gpt2dist.training.metric_backends import BACKENDS

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
    recomputation, not padding) use; None without a known peak (unlisted GPUs)."""
    return tokens_per_s_per_device * flops_per_token / peak_flops if peak_flops else None


def peak_gpu_memory_gib() -> float | None:
    """Most GPU memory this process's tensors have held at once, GiB; None without a GPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


MM_SIZE = 1024  # the square matrices of mm_peak_flops: 2.1 GFLOP a product, ~20 ms on a 2-core CPU in fp32
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def mm_peak_flops(dtype: torch.dtype = torch.float32, repeats: int = 10, n: int = MM_SIZE) -> float:
    """This CPU's matrix-multiply peak as torch reaches it: the FLOP/s of the fastest of `repeats`
    (n x n) @ (n x n) torch.mm of `dtype` (after one warm-up), on all of torch's threads, as training
    runs. The default takes a fifth of a second on a 2-core CPU."""
    generator = torch.Generator().manual_seed(0)  # its own: the run's random stream (dropout) stays untouched
    a, b = (torch.randn(n, n, generator=generator).to(dtype) for _ in range(2))
    out = torch.mm(a, b)  # warm-up: the first call picks and loads the kernel
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def device_peak_flops(override_tflops: float | None, precision: str = "fp32") -> float | None:
    """Peak FLOP/s of this rank's device: the override (logger.peak_tflops); a GPU's dense bf16 peak from the
    table (None for unlisted GPUs); on a CPU, its torch.mm peak at the training precision, measured now
    (mm_peak_flops)."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return mm_peak_flops(PRECISION_DTYPES[precision])
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


class Metrics:
    """Sends each logged step's numbers to every backend named in `logger.backends`
    (gpt2dist/training/metric_backends.py)."""

    def __init__(self, cfg, run_dir: Path, resume_step: int, name: str):
        self.backends = [BACKENDS[b](cfg, run_dir, resume_step, name) for b in cfg.logger.backends]

    def log(self, step: int, values: dict) -> None:
        values = {k: v for k, v in values.items() if v is not None}
        for backend in self.backends:
            backend.log(step, values)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
