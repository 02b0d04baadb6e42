"""What a benchmark ran on, for its JSON result and BENCHMARKS.md."""

import os
import platform
import subprocess

import torch


def machine() -> str:
    """CPU model and cores, GPU, Python and torch versions."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
               platform.processor())
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, Python {platform.python_version()}, torch {torch.__version__}"
