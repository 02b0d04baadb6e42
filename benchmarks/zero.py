"""ZeRO on 2 ranks: speed against PyTorch DDP, and memory per rank against the ZeRO paper.

1. Speed: tokens/s of the Trainer at ZeRO 1, 2 and 3 against a hand-written DDP loop
   (benchmarks/worker.py `bare`), same model, global batch and data; goal at least 0.9 for
   ZeRO 1 and 2.
2. Memory: peak per rank for ZeRO 0-3 and offload (and DDP) at bf16, against the model-state
   bytes of Rajbhandari et al. (2020): mixed-precision Adam keeps 2 (bf16 weights) + 2 (bf16
   gradients) + 12 (fp32 master weights, momentum, variance) = 16 bytes per parameter; stage 1
   partitions the 12 across the N ranks, stage 2 also the gradients, stage 3 also the weights.
   The model (gpt2, 124M) and a 64-token micro-batch make model states most of the memory.
   Measured: the tensors alive after the last step, per rank, and the peak (allocated GPU memory,
   or on a CPU the growth of resident memory, which also holds start-up copies and freed pages).
   On a CPU, offload moves state within the same memory.

    python benchmarks/zero.py --out benchmarks/results/zero.json
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from machine import machine
from worker import launch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpt2dist.config import load_model_preset  # noqa: E402
from gpt2dist.models.gpt import GPT  # noqa: E402

RANKS = 2
SPEED = ["model=gpt2-tiny", "data.seq_len=256", "train.micro_batch_size=8", "train.global_batch_size=16",
         "optim.warmup_steps=2"]
MEMORY = ["model=gpt2", "train.precision=bf16", "data.seq_len=64", "train.micro_batch_size=1",
          "train.global_batch_size=2", "train.max_steps=4", "logger.log_interval=2", "optim.warmup_steps=2"]
# name -> (worker mode, overrides, model-state bytes per parameter per rank from the ZeRO paper)
MEMORY_RUNS = {
    "DDP (autocast: fp32 weights, gradients, Adam)": ("bare", [], 4 + 4 + 8),
    "ZeRO 0": ("trainer", ["zero=stage0"], 2 + 2 + 12),
    "ZeRO 1": ("trainer", ["zero=stage1"], 2 + 2 + 12 / RANKS),
    "ZeRO 2": ("trainer", ["zero=stage2"], 2 + (2 + 12) / RANKS),
    "ZeRO 3": ("trainer", ["zero=stage3"], 16 / RANKS),
    "ZeRO 3 + offload": ("trainer", ["zero=offload"], 16 / RANKS),
}


def speed(steps: int, interval: int, repeats: int) -> dict:
    timing = [f"train.max_steps={steps}", f"logger.log_interval={interval}"]
    runs = {name: [] for name in ("DDP", "ZeRO 1", "ZeRO 2", "ZeRO 3")}
    for _ in range(repeats):
        runs["DDP"].append(launch("bare", [*SPEED, *timing], RANKS))
        for stage in (1, 2, 3):
            runs[f"ZeRO {stage}"].append(launch("trainer", [*SPEED, *timing, f"zero=stage{stage}"], RANKS))
    median = {name: statistics.median(r["tokens_per_s"] for r in rs) for name, rs in runs.items()}
    return {"overrides": [*SPEED, *timing], "tokens_per_s": median,
            "ratio_to_ddp": {name: median[name] / median["DDP"] for name in median if name != "DDP"}, "runs": runs}


def memory() -> dict:
    with torch.device("meta"):
        n = sum(p.numel() for p in GPT(load_model_preset("gpt2")).parameters())  # padded: the tensors held
    rows = {}
    for name, (mode, extra, bytes_per_param) in MEMORY_RUNS.items():
        r = launch(mode, [*MEMORY, *extra], RANKS)
        predicted = n * bytes_per_param / 2**30
        live = max(rank["live_tensors_gib"] for rank in r["ranks"])
        rows[name] = {"predicted_model_states_gib": predicted, "live_tensors_gib": live, "ratio": live / predicted,
                      "peak_gib": max(rank["gpu_peak_gib"] or rank["rss_peak_growth_gib"] for rank in r["ranks"]),
                      "run": r}
    return {"overrides": MEMORY, "parameters": n, "ranks": RANKS, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--log-interval", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--parts", nargs="+", choices=["speed", "memory"], default=["speed", "memory"])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    # Each part replaces its own entry of an existing result file.
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["machine"] = machine()
    if "speed" in args.parts:
        result["speed"] = speed(args.steps, args.log_interval, args.repeats)
    if "memory" in args.parts:
        result["memory"] = memory()
    result[f"seconds_{'_'.join(args.parts)}"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, ratio in result.get("speed", {}).get("ratio_to_ddp", {}).items():
        print(f"{name}: {ratio:.3f} of DDP's tokens/s")
    for name, row in result.get("memory", {}).get("rows", {}).items():
        print(f"{name}: tensors after a step {row['live_tensors_gib']:.2f} GiB per rank, by the formula "
              f"{row['predicted_model_states_gib']:.2f} GiB ({row['ratio']:.2f}x); peak {row['peak_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
