"""The machine's own limit as the bar: the trainer's model FLOP/s (PaLM formula) against this CPU's fp32
matrix-multiply peak, torch.mm at its best of 40, in the same run; and the `mfu` the trainer logs itself
(against the peak it measured at start-up in a fifth of a second, metrics.mm_peak_flops) beside it.

`gpt2` shape (124M), sequence 512, fp32, no compile, one process, a few steps (the first, start-up, left
out). The reference peak is the best of 40 square products (metrics.MM_SIZE, as the trainer's probe)
taken before and after the training run, and once more at twice the size, to show the size is not what
limits it.

    python benchmarks/mfu.py --out benchmarks/results/mfu.json
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from machine import machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt2dist.config import CONF_DIR, gpt_config, register  # noqa: E402
from gpt2dist.models.gpt import GPT  # noqa: E402
from gpt2dist.training.metrics import MM_SIZE, flops_per_token, mm_peak_flops  # noqa: E402

SHAPE = ["model=gpt2", "data.seq_len=512", "train.precision=fp32", "train.compile=false", "optim.warmup_steps=1",
         "train.eval_interval=0", "train.eval_sequences=16", "train.ckpt_interval=0", "train.sample_tokens=0",
         "logger.log_interval=1", "logger.backends=[jsonl]"]
PROBE = re.compile(r"torch\.mm peak, measured now: ([0-9.,]+) GFLOP/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    overrides = [*SHAPE, f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}",
                 f"train.global_batch_size={args.batch}"]
    register()
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with torch.device("meta"):
        n_params = GPT(gpt_config(cfg.model)).num_params()
    per_token = flops_per_token(n_params, cfg.model.n_layer, cfg.model.n_embd, cfg.data.seq_len)

    before = mm_peak_flops(torch.float32, repeats=40)
    run_dir = Path(tempfile.mkdtemp(prefix="gpt2dist-mfu-bench-"))
    try:
        out = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, f"train.run_dir={run_dir}"],
                             capture_output=True, text=True, cwd=ROOT,
                             env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
        if out.returncode:
            raise RuntimeError(f"train.py failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    after = mm_peak_flops(torch.float32, repeats=40)
    double = mm_peak_flops(torch.float32, repeats=10, n=2 * MM_SIZE)
    steady = [m for m in metrics if m["step"] > 1]
    tokens_per_s = len(steady) / sum(1 / m["tokens_per_s"] for m in steady)  # equal-token steps: harmonic mean
    model_flops = tokens_per_s * per_token
    peak = max(before, after)
    startup_peak = float(PROBE.search(out.stdout).group(1).replace(",", "")) * 1e9
    result = {"machine": machine(), "overrides": overrides, "n_params": n_params, "flops_per_token": per_token,
              "tokens_per_s": tokens_per_s, "model_flops": model_flops,
              "mm_peak_flops_before": before, "mm_peak_flops_after": after, "mm_peak_flops_2x_size": double,
              "model_flops_over_mm_peak": model_flops / peak,
              "trainer_startup_peak_flops": startup_peak, "startup_peak_over_best_of_40": startup_peak / peak,
              "trainer_logged_mfu": statistics.median(m["mfu"] for m in steady),
              "trainer_logged_mfu_per_step": [m["mfu"] for m in steady],
              "seconds": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"model {model_flops / 1e9:.1f} GFLOP/s against torch.mm's {peak / 1e9:.1f} GFLOP/s (best of 40) = "
          f"{result['model_flops_over_mm_peak']:.3f}; the trainer logged mfu {result['trainer_logged_mfu']:.3f} "
          f"against its start-up probe of {startup_peak / 1e9:.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
