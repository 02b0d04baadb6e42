"""train.compile=true against eager: steady tokens/s of the Trainer at two shapes, and the first
step's time beside it (where the compilation happens), in one run.

Each run is a fresh process (benchmarks/worker.py) with an empty inductor cache of its own, so the
first compiled step pays the whole compilation as a new machine would. Steady tokens/s leave the
first step out; runs alternate compiled and eager. Medians over the repeats, and the fastest
step of each side.

    python benchmarks/compile.py --out benchmarks/results/compile.json
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from machine import machine
from worker import launch

COMMON = ["data.seq_len=256", "train.micro_batch_size=4", "train.global_batch_size=4", "optim.warmup_steps=2",
          "logger.log_interval=1"]
SHAPES = {
    "gpt2-tiny (2 x 128)": ["model=gpt2-tiny"],
    "6 x 384": ["model=gpt2-tiny", "model.n_layer=6", "model.n_head=6", "model.n_embd=384"],
}


def timed(overrides: list[str], compiled: bool) -> dict:
    """One worker run; returns its steady tokens/s and the seconds of its first step."""
    cache = tempfile.mkdtemp(prefix="gpt2dist-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # the worker inherits it: nothing compiled before
    try:
        result = launch("trainer", [*overrides, f"train.compile={str(compiled).lower()}"])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    tokens_per_step = 4 * 256
    return {"tokens_per_s": result["tokens_per_s"], "first_step_s": tokens_per_step / result["window_tokens_per_s"][0],
            "window_tokens_per_s": result["window_tokens_per_s"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    shapes = {}
    for name, shape in SHAPES.items():
        overrides = [*shape, *COMMON, f"train.max_steps={args.steps}"]
        runs = {False: [], True: []}
        for i in range(args.repeats):
            for compiled in ((True, False) if i % 2 == 0 else (False, True)):
                runs[compiled].append(timed(overrides, compiled))
        # On a machine other work shares, the fastest step of each side is the steadier figure.
        median = {c: {**{k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "first_step_s")},
                      "best_step_tokens_per_s": max(w for r in rs for w in r["window_tokens_per_s"][1:])}
                  for c, rs in runs.items()}
        eager, compiled = median[False], median[True]
        shapes[name] = {"overrides": overrides, "eager": eager, "compiled": compiled,
                        "speedup": compiled["tokens_per_s"] / eager["tokens_per_s"],
                        "best_step_speedup": compiled["best_step_tokens_per_s"] / eager["best_step_tokens_per_s"],
                        "compile_s": compiled["first_step_s"] - eager["first_step_s"],
                        "first_step_ratio": compiled["first_step_s"] / eager["first_step_s"],
                        "runs": {"eager": runs[False], "compiled": runs[True]}}
        s = shapes[name]
        print(f"{name}: compiled {compiled['tokens_per_s']:,.0f} vs eager {eager['tokens_per_s']:,.0f} tokens/s "
              f"(x{s['speedup']:.2f}; fastest steps x{s['best_step_speedup']:.2f}); "
              f"first step {compiled['first_step_s']:.1f} s vs {eager['first_step_s']:.2f} s "
              f"(compilation {s['compile_s']:.1f} s)", flush=True)
    result = {"machine": machine(), "steps": args.steps, "repeats": args.repeats, "shapes": shapes,
              "seconds": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
