"""Gradient checkpointing: the memory it saves and the time it costs, Trainer against Trainer.

Each block recomputes its forward pass in backward instead of keeping its activations, so
memory falls by the blocks' activations (benchmarks/activation_memory.py counts them) and a
step costs about one more forward pass of the blocks. A deep, narrow model with long sequences
makes the blocks' share visible next to the LM head. Peak memory: allocated GPU memory, or on
a CPU the growth of resident memory during the run.

    python benchmarks/grad_ckpt.py --out benchmarks/results/grad_ckpt.json
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from machine import machine
from worker import launch

CPU = ["model=gpt2-tiny", "model.n_layer=12", "model.n_head=4", "model.n_embd=256", "model.block_size=1024",
       "data.seq_len=1024", "train.micro_batch_size=4", "train.global_batch_size=4", "optim.warmup_steps=2"]
GPU = ["model=gpt2-medium", "train.precision=bf16", "data.seq_len=1024", "train.micro_batch_size=16",
       "train.global_batch_size=16", "optim.warmup_steps=2"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="gpt2-medium at bf16, micro-batch 16")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--log-interval", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("extra", nargs="*", help="more train.py overrides for every run (after --)")
    args = p.parse_args(argv)
    base = [*(GPU if args.gpu else CPU), f"train.max_steps={args.steps}", f"logger.log_interval={args.log_interval}",
            *args.extra]
    t0 = time.perf_counter()
    runs = {False: [], True: []}
    for i in range(args.repeats):
        for ckpt in ((False, True) if i % 2 == 0 else (True, False)):
            runs[ckpt].append(launch("trainer", [*base, f"train.gradient_checkpointing={str(ckpt).lower()}"]))

    def peak(r: dict) -> float:
        return r["ranks"][0]["gpu_peak_gib"] or r["ranks"][0]["rss_peak_growth_gib"]

    summary = {ckpt: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                      "peak_gib": statistics.median(peak(r) for r in rs)} for ckpt, rs in runs.items()}
    plain, ckpt = summary[False], summary[True]
    result = {"machine": machine(), "overrides": base, "plain": plain, "checkpointed": ckpt,
              "memory_saved_gib": plain["peak_gib"] - ckpt["peak_gib"],
              "memory_ratio": ckpt["peak_gib"] / plain["peak_gib"],
              "time_ratio": plain["tokens_per_s"] / ckpt["tokens_per_s"],
              "runs": {"plain": runs[False], "checkpointed": runs[True]}, "seconds": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"peak memory {plain['peak_gib']:.2f} -> {ckpt['peak_gib']:.2f} GiB (saved {result['memory_saved_gib']:.2f}); "
          f"step time x{result['time_ratio']:.2f} ({plain['tokens_per_s']:,.0f} -> {ckpt['tokens_per_s']:,.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
