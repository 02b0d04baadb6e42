"""Trainer overhead: tokens/s of gpt2dist's Trainer (ZeRO 0) against a minimal hand-written
PyTorch loop (benchmarks/worker.py `bare`) of the same model, batch, precision and data.

Each configuration runs both, alternating which goes first, `--repeats` times; the result is
the ratio of the medians (goal: at least 0.97).

    python benchmarks/overhead.py --out benchmarks/results/overhead.json
    python benchmarks/overhead.py --gpu --out ...   # the GPU sizes (benchmarks/gpu_check.sh)
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from machine import machine
from worker import launch

# name -> train.py overrides. On a CPU: the default job's model and batch, and a mid-size model.
CPU_CONFIGS = {
    "gpt2-tiny": ["model=gpt2-tiny", "data.seq_len=256", "train.micro_batch_size=8", "train.global_batch_size=8"],
    "mid (6 x 384)": ["model=gpt2-tiny", "model.n_layer=6", "model.n_head=6", "model.n_embd=384",
                      "data.seq_len=256", "train.micro_batch_size=4", "train.global_batch_size=4"],
}
GPU = ["train.precision=bf16", "data.seq_len=1024", "train.micro_batch_size=16", "train.global_batch_size=16",
       "data.num_workers=2"]
GPU_CONFIGS = {
    "gpt2": ["model=gpt2", *GPU],
    "gpt2 compiled": ["model=gpt2", *GPU, "train.compile=true"],
    "gpt2-medium": ["model=gpt2-medium", *GPU],
    "gpt2-medium compiled": ["model=gpt2-medium", *GPU, "train.compile=true"],
}


def compare(overrides: list[str], repeats: int) -> dict:
    runs = {"bare": [], "trainer": []}
    for i in range(repeats):
        for mode in (("bare", "trainer") if i % 2 == 0 else ("trainer", "bare")):
            runs[mode].append(launch(mode, overrides))
    median = {mode: statistics.median(r["tokens_per_s"] for r in rs) for mode, rs in runs.items()}
    return {"overrides": overrides, "bare_tokens_per_s": median["bare"], "trainer_tokens_per_s": median["trainer"],
            "ratio": median["trainer"] / median["bare"],
            "trainer_mfu": statistics.median(r["mfu"] for r in runs["trainer"]) if runs["trainer"][0]["mfu"] else None,
            "bare_mfu": statistics.median(r["mfu"] for r in runs["bare"]) if runs["bare"][0]["mfu"] else None,
            "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the GPU configurations (gpt2, gpt2-medium, bf16, compile)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default: 12 CPU, 80 GPU)")
    p.add_argument("--log-interval", type=int, default=0, help="steps per timed window (default: 3 CPU, 10 GPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("extra", nargs="*", help="more train.py overrides for every run (after --)")
    args = p.parse_args(argv)
    configs = GPU_CONFIGS if args.gpu else CPU_CONFIGS
    steps = args.steps or (80 if args.gpu else 12)
    interval = args.log_interval or (10 if args.gpu else 3)
    timing = [f"train.max_steps={steps}", f"logger.log_interval={interval}", "optim.warmup_steps=2", *args.extra]
    t0 = time.perf_counter()
    result = {"machine": machine(), "steps": steps, "log_interval": interval, "repeats": args.repeats,
              "configs": {name: compare([*overrides, *timing], args.repeats) for name, overrides in configs.items()
                          if not args.only or name in args.only}}
    result["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result["configs"].items():
        mfus = f" (MFU {100 * r['trainer_mfu']:.1f}% / {100 * r['bare_mfu']:.1f}%)" if r["trainer_mfu"] else ""
        print(f"{name}: trainer {r['trainer_tokens_per_s']:,.0f} / bare {r['bare_tokens_per_s']:,.0f} tokens/s "
              f"= {r['ratio']:.3f}{mfus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
