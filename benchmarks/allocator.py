"""The CPU allocator under the default training job: glibc malloc as it comes, glibc told to keep
freed memory (gpt2dist's default, train.retain_freed_memory; or the same through MALLOC_* variables),
and jemalloc (Debian's libjemalloc2), each a whole `python train.py` run, alternating.

Large tensors (logits and their gradients: 8 x 128 x 50304 fp32 = 206 MB at the default batch)
are above glibc's mmap threshold, so each one is mapped from the OS and unmapped again every
step; touching the fresh pages costs a minor page fault per 4 KiB. The script reports, per
allocator, minor page faults and system (kernel) CPU time of the run, and the trainer's tokens/s.

    python benchmarks/allocator.py --repeats 3 --out benchmarks/results/allocator.json
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import machine

from gpt2dist.training import malloc

ROOT = Path(__file__).resolve().parent.parent
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
# name -> (environment, train.py overrides)
ALLOCATORS = {
    "glibc": ({}, ["train.retain_freed_memory=false"]),
    # gpt2dist's default: glibc keeps freed memory (gpt2dist/training/malloc.py, through mallopt)
    "glibc, retain_freed_memory": ({}, []),
    # the same settings given to glibc through its environment, before the process starts
    "glibc, MALLOC_* environment": (malloc.environment(), []),
    "jemalloc": ({"LD_PRELOAD": JEMALLOC}, []),
}


def run(env_extra: dict, overrides: list[str]) -> dict:
    """One training run in a child process; its page faults and CPU times from getrusage."""
    with tempfile.TemporaryDirectory() as run_dir:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([sys.executable, str(ROOT / "train.py"), f"train.run_dir={run_dir}", *overrides],
                             cwd=ROOT, env={**os.environ, **env_extra}, capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if out.returncode:
            sys.exit(f"error: train.py failed:\n{out.stderr[-2000:]}")
        rates = [json.loads(line)["tokens_per_s"] for line in open(Path(run_dir) / "metrics.jsonl")
                 if "tokens_per_s" in line]
    return {"minor_faults": after.ru_minflt - before.ru_minflt, "sys_s": after.ru_stime - before.ru_stime,
            "user_s": after.ru_utime - before.ru_utime, "tokens_per_s": statistics.median(rates[1:] or rates)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not Path(JEMALLOC).exists():
        sys.exit(f"error: {JEMALLOC} not found: apt-get install libjemalloc2")
    # The default job (gpt2-tiny, built-in corpus, batch 16 x 128), shorter, without W&B or checkpoints.
    overrides = [f"train.max_steps={args.steps}", "train.eval_interval=0", "train.ckpt_interval=0",
                 "logger.wandb=disabled", "train.sample_tokens=0", "logger.log_interval=5"]
    runs = {name: [] for name in ALLOCATORS}
    for i in range(args.repeats):
        order = list(ALLOCATORS) if i % 2 == 0 else list(reversed(ALLOCATORS))
        for name in order:
            env, extra = ALLOCATORS[name]
            runs[name].append(run(env, [*overrides, *extra]))
            print(name, runs[name][-1], flush=True)
    base = statistics.median(r["tokens_per_s"] for r in runs["glibc"])
    summary = {name: {"minor_faults": statistics.median(r["minor_faults"] for r in rs),
                      "sys_s": statistics.median(r["sys_s"] for r in rs),
                      "user_s": statistics.median(r["user_s"] for r in rs),
                      "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                      "tokens_per_s_vs_glibc": statistics.median(r["tokens_per_s"] for r in rs) / base}
               for name, rs in runs.items()}
    result = {"machine": machine(), "steps": args.steps, "repeats": args.repeats, "summary": summary, "runs": runs}
    for name, s in summary.items():
        print(f"{name}: {s['minor_faults']:,.0f} minor faults, sys {s['sys_s']:.1f} s, user {s['user_s']:.1f} s, "
              f"{s['tokens_per_s']:,.0f} tokens/s ({s['tokens_per_s_vs_glibc']:.2f}x glibc)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
