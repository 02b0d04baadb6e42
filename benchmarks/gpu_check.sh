#!/usr/bin/env bash
# The one prepared GPU check: under 8 minutes on one H200 (each part has its own time limit).
#
#   bash benchmarks/gpu_check.sh [extra train.py overrides for every run]
#
# Prints, and writes to $OUT (default benchmarks/results/gpu), on one GPU at bf16, sequence 1024:
#   1. tokens/s and MFU of the Trainer and of the bare PyTorch loop for gpt2 and gpt2-medium,
#      without and with torch.compile, and their ratio (benchmarks/overhead.py --gpu);
#   2. the Trainer alone: gpt2 at ZeRO 1, and gpt2-xl with ZeRO 2: tokens/s, MFU and peak memory;
# after checking that gpt2's attention runs on PyTorch's flash kernel.
# (Gradient checkpointing on a GPU, if time is left: python3 benchmarks/grad_ckpt.py --gpu --out ...)
#
# A machine without gpt2dist's dependencies gets them from wheels in .whl/ (made by
# benchmarks/gpu_wheels.sh on a machine with a package index); torch must already be there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

if ! $PY -c "import deepspeed, hydra" 2>/dev/null; then
    [ -d .whl ] || { echo "error: deepspeed or hydra missing and no .whl/ (run benchmarks/gpu_wheels.sh)"; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
start=$SECONDS

# 0. gpt2's attention (bf16, causal, head size 64) runs on the flash kernel: this fails if not.
$PY - <<'PY'
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from gpt2dist.config import load_model_preset
from gpt2dist.models.gpt import GPT
model = GPT(load_model_preset("gpt2")).cuda().to(torch.bfloat16)
idx = torch.randint(0, 50257, (2, 1024), device="cuda")
with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
    model(idx, idx)[1].backward()
print("flash attention: gpt2 forward and backward ran on SDPBackend.FLASH_ATTENTION alone")
PY

GPU=(train.precision=bf16 data.seq_len=1024 train.micro_batch_size=16 train.global_batch_size=16 data.num_workers=2
     optim.warmup_steps=2)
# 1. Without compile first: those numbers come back even if compiling runs out of time.
timeout 110 $PY benchmarks/overhead.py --gpu --repeats 1 --only gpt2 gpt2-medium --out "$OUT/overhead.json" -- "$@"
# 2. The Trainer alone. gpt2 at ZeRO 1: DeepSpeed's bf16 optimizer on flat fp32 buffers (ZeRO 0's is per parameter).
timeout 35 $PY benchmarks/worker.py trainer model=gpt2 zero=stage1 "${GPU[@]}" train.max_steps=80 \
    logger.log_interval=10 "$@" | tee "$OUT/gpt2-zero1.txt" | grep RESULT
timeout 85 $PY benchmarks/worker.py trainer model=gpt2-xl zero=stage2 "${GPU[@]}" train.max_steps=20 \
    logger.log_interval=5 "$@" | tee "$OUT/gpt2-xl-zero2.txt" | grep RESULT
# 3. Compiled.
timeout 190 $PY benchmarks/overhead.py --gpu --repeats 1 --only "gpt2 compiled" "gpt2-medium compiled" \
    --out "$OUT/overhead_compiled.json" -- "$@"
echo "gpu_check: $((SECONDS - start)) s"
