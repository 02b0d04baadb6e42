"""How long a checkpoint stops training ("saving or staging", as torchtitan logs it): a synchronous save
(train.async_checkpoint=false: the files written, fsynced, hashed and published) against one written in the
background (training waits only for the snapshot of the state to CPU memory), at `gpt2` shape: 124M
parameters with AdamW's two moments, ~1.5 GB per checkpoint.

Each run is `train.py model=gpt2` in one process, a few short steps (the checkpoint's size does not depend
on the sequence length), a checkpoint every other step. The blocked seconds are the trainer's own (its
"training blocked" line, timed around Trainer.save); the background write's seconds are the writer
thread's. The steps that ran while a write was under way are timed beside the others (their slowdown is
what the background write costs training on the same cores), and each run's training time (steps 2 to the
end, every checkpoint but the last included) says what is gained in all. Runs alternate sync and async.

    python benchmarks/checkpoint_stall.py --out benchmarks/results/checkpoint_stall.json
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

from machine import machine

ROOT = Path(__file__).resolve().parent.parent
SHAPE = ["model=gpt2", "data.seq_len=64", "train.micro_batch_size=1", "train.global_batch_size=1",
         "optim.warmup_steps=1", "train.eval_interval=0", "train.eval_sequences=1", "train.sample_tokens=0",
         "logger.log_interval=1", "logger.backends=[jsonl]"]
BLOCKED = re.compile(r"checkpoint (\S+)(?::| \() ?training blocked ([0-9.]+) s(?: \(([0-9.]+) s of it)?")
WRITTEN = re.compile(r"saved checkpoint (\S+) \(written in the background in ([0-9.]+) s\)")


def run(background: bool, steps: int, interval: int) -> dict:
    """One training run; its checkpoints' blocked and write seconds, sizes, and its step seconds."""
    run_dir = Path(tempfile.mkdtemp(prefix="gpt2dist-ckpt-bench-"))
    try:
        out = subprocess.run([sys.executable, str(ROOT / "train.py"), *SHAPE, f"train.max_steps={steps}",
                              f"train.ckpt_interval={interval}", f"train.async_checkpoint={str(background).lower()}",
                              f"train.run_dir={run_dir}"], capture_output=True, text=True, cwd=ROOT,
                             env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
        if out.returncode:
            raise RuntimeError(f"train.py failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        blocked = [float(m.group(2)) for m in BLOCKED.finditer(out.stdout)]
        waited = [float(m.group(3) or 0) for m in BLOCKED.finditer(out.stdout)]
        written = [float(m.group(2)) for m in WRITTEN.finditer(out.stdout)]
        tags = sorted(p for p in (run_dir / "checkpoints").glob("step_*"))
        size = [sum(f.stat().st_size for f in tag.iterdir()) for tag in tags]
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        # The steps right after a checkpoint ran while an asynchronous one was being written.
        step_s = {m["step"]: 64 / m["tokens_per_s"] for m in metrics}
        after = [s for step, s in step_s.items() if step > 1 and (step - 1) % interval == 0]
        others = [s for step, s in step_s.items() if step > 1 and (step - 1) % interval != 0]
        # Training time from step 2 on, checkpoints but the last (after which the run only ends) included.
        train_s = sum(s for step, s in step_s.items() if step > 1) + sum(blocked[:-1])
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    result = {"async": background, "blocked_s": blocked, "waited_for_previous_write_s": waited,
              "background_write_s": written, "checkpoint_bytes": size,
              "step_s_after_checkpoint": after, "step_s_other": others, "train_s": train_s}
    print(json.dumps(result), flush=True)
    return result


def summarize(runs: dict[bool, list[dict]]) -> dict:
    """The medians over runs and checkpoints. Training is blocked by the snapshot (staging) and, when the
    previous write has not ended yet, by the wait for it: both are given, and the ratio of each."""
    def median(key: str, background: bool) -> float:
        return statistics.median(x for r in runs[background] for x in r[key])

    staging = statistics.median(blocked - waited for r in runs[True]
                                for blocked, waited in zip(r["blocked_s"], r["waited_for_previous_write_s"]))
    sync_s, async_s = median("blocked_s", False), median("blocked_s", True)
    return {"checkpoint_gb": runs[False][0]["checkpoint_bytes"][0] / 1e9,
            "sync_blocked_s": sync_s, "async_blocked_s": async_s, "ratio": async_s / sync_s,
            "async_staging_s": staging, "staging_ratio": staging / sync_s,
            "async_waited_for_previous_write_s": median("waited_for_previous_write_s", True),
            "async_background_write_s": median("background_write_s", True),
            "async_step_s_after_checkpoint": median("step_s_after_checkpoint", True),
            "async_step_s_other": median("step_s_other", True),
            "sync_step_s": median("step_s_other", False),
            "sync_train_s": statistics.median(r["train_s"] for r in runs[False]),
            "async_train_s": statistics.median(r["train_s"] for r in runs[True])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--interval", type=int, default=40, help="steps between checkpoints")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--resummarize", action="store_true", help="recompute the summary of --out's runs, run nothing")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.resummarize:
        result = json.loads(args.out.read_text())
        result.update(summarize({False: result["runs"]["false"], True: result["runs"]["true"]}))
    else:
        runs = {False: [], True: []}
        for i in range(args.repeats):
            for background in ((False, True) if i % 2 == 0 else (True, False)):
                runs[background].append(run(background, args.steps, args.interval))
        result = {"machine": machine(), "shape": SHAPE, "steps": args.steps, "interval": args.interval,
                  "repeats": args.repeats, **summarize(runs), "runs": runs, "seconds": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"checkpoint {result['checkpoint_gb']:.2f} GB: training blocked {result['sync_blocked_s']:.2f} s (sync) vs "
          f"{result['async_blocked_s']:.3f} s (async) = {result['ratio']:.3f}, of which staging "
          f"{result['async_staging_s']:.3f} s = {result['staging_ratio']:.3f}; background write "
          f"{result['async_background_write_s']:.1f} s; training time {result['sync_train_s']:.1f} s (sync) vs "
          f"{result['async_train_s']:.1f} s (async)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
