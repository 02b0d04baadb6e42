"""Speed against nanoGPT itself: nanoGPT's own train.py (a checkout you provide; nothing of it is
copied here) and gpt2dist's train.py (the Trainer, through benchmarks/worker.py) on the same
shape, data and settings, rotating which runs first; the ratio gpt2dist / nanoGPT of the
median tokens/s, and the ratio of each round for the spread. nanoGPT runs twice per round: as it
comes, and with the glibc allocator settings gpt2dist gives itself (train.retain_freed_memory,
here through MALLOC_* variables), so the speed-up that is only the allocator shows apart.

    git clone <nanoGPT's repository> /tmp/nanogpt
    python benchmarks/vs_nanogpt.py --nanogpt /tmp/nanogpt --out benchmarks/results/vs_nanogpt.json

Both sides: one process on the CPU, fp32, no compile, no dropout, GPT-2's biases, the
vocabulary padded to 50304, one micro-batch per step, AdamW with gradient clipping at 1.0, a
short warmup, and the tokens of our built-in corpus (written as nanoGPT's train.bin / val.bin,
uint16, into a temporary directory). Both are timed the same way: `--steps` steps; the first
`--window` steps (start-up, nanoGPT's evaluation at step 0) are left out; tokens/s is the tokens
of the other steps over their time (nanoGPT's `time ...ms` per iteration, our log windows).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from machine import machine
from worker import launch, source_windows

from gpt2dist.config import CONF_DIR, register
from gpt2dist.data.shards import TokenBlocks
from gpt2dist.training import malloc

# name -> (n_layer, n_head, n_embd, micro-batch); sequences of --seq-len tokens.
SHAPES = {"4 x 256": (4, 4, 256, 8), "mid (6 x 384)": (6, 6, 384, 8)}
ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", re.M)


def ours_overrides(shape: tuple, seq_len: int, steps: int, window: int) -> list[str]:
    n_layer, n_head, n_embd, batch = shape
    return ["model=gpt2-tiny", f"model.n_layer={n_layer}", f"model.n_head={n_head}", f"model.n_embd={n_embd}",
            f"model.block_size={seq_len}", f"data.seq_len={seq_len}", f"train.micro_batch_size={batch}",
            f"train.global_batch_size={batch}", "train.precision=fp32", f"train.max_steps={steps}",
            f"logger.log_interval={window}", "optim.warmup_steps=2", "optim.grad_clip=1.0"]


def write_nanogpt_data(overrides: list[str], out: Path) -> None:
    """The corpus the gpt2dist runs train on, as nanoGPT's data/<dataset>/{train,val}.bin."""
    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    corpus = source_windows(cfg)[0][0].blocks.dir
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        blocks = TokenBlocks(corpus, split)
        tokens = [blocks.read(b, 0, blocks.block_tokens) for b in range(len(blocks))]
        np.concatenate(tokens).astype(np.uint16).tofile(out / f"{split}.bin")


def run_nanogpt(nanogpt: Path, data: Path, shape: tuple, seq_len: int, steps: int, window: int,
                env: dict[str, str]) -> dict:
    """One nanoGPT train.py run (its configurator's --key=value overrides), with `env` added to
    its environment; steady tokens/s."""
    n_layer, n_head, n_embd, batch = shape
    with tempfile.TemporaryDirectory(prefix="nanogpt-out-") as out_dir:
        args = [f"--out_dir={out_dir}", f"--dataset={data}",  # data/<dataset> with an absolute path is that path
                "--device=cpu", "--compile=False", "--dtype=float32", f"--batch_size={batch}",
                f"--block_size={seq_len}", f"--n_layer={n_layer}", f"--n_head={n_head}", f"--n_embd={n_embd}",
                "--bias=True", "--dropout=0.0", "--gradient_accumulation_steps=1", f"--max_iters={steps - 1}",
                f"--lr_decay_iters={steps}", "--warmup_iters=2", "--grad_clip=1.0", "--eval_interval=1000000",
                "--eval_iters=1", "--log_interval=1", "--always_save_checkpoint=False", "--wandb_log=False"]
        run = subprocess.run([sys.executable, "train.py", *args], cwd=nanogpt, capture_output=True, text=True,
                             env={**os.environ, **env})
    if run.returncode:
        raise RuntimeError(f"nanoGPT train.py failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    times = {int(i): float(ms) / 1000 for i, ms in ITER.findall(run.stdout)}  # iteration i is step i + 1
    assert sorted(times) == list(range(steps)), f"nanoGPT ran iterations {sorted(times)}"
    steady = [times[i] for i in range(window, steps)]
    tokens_per_s = len(steady) * batch * seq_len / sum(steady)
    print(f"nanogpt {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(args[2:])}: {tokens_per_s:,.0f} tokens/s",
          flush=True)
    return {"tokens_per_s": tokens_per_s, "step_seconds": steady}


def compare(nanogpt: Path, data: Path, shape: tuple, args) -> dict:
    """Each side `args.repeats` times, rotating which goes first; ratios of medians and per round."""
    overrides = ours_overrides(shape, args.seq_len, args.steps, args.window)
    sides = {
        "nanogpt": lambda: run_nanogpt(nanogpt, data, shape, args.seq_len, args.steps, args.window, {}),
        # nanoGPT with the allocator settings gpt2dist applies to itself (train.retain_freed_memory)
        "nanogpt, glibc keeping freed memory":
            lambda: run_nanogpt(nanogpt, data, shape, args.seq_len, args.steps, args.window, malloc.environment()),
        "gpt2dist": lambda: launch("trainer", overrides),
    }
    names = list(sides)
    runs = {name: [] for name in names}
    for i in range(args.repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            runs[name].append(sides[name]())
    speeds = {name: [r["tokens_per_s"] for r in rs] for name, rs in runs.items()}
    median = {name: statistics.median(s) for name, s in speeds.items()}
    ours = speeds["gpt2dist"]
    return {"gpt2dist_overrides": overrides, "tokens_per_s": speeds, "median": median,
            "ratio": {name: median["gpt2dist"] / median[name] for name in names[:2]},
            "ratio_per_round": {name: [a / b for a, b in zip(ours, speeds[name])] for name in names[:2]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", type=Path, required=True, help="a checkout of nanoGPT (its train.py and model.py)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--window", type=int, default=3, help="first steps left out (and our log interval)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", nargs="*", help="shape names to run (default: all)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not (args.nanogpt / "train.py").is_file():
        print(f"error: {args.nanogpt}: no train.py (give a checkout of nanoGPT)", file=sys.stderr)
        return 2
    if args.steps % args.window or args.steps <= args.window:
        print("error: --steps must be a multiple of --window, and larger", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nanogpt-data-") as tmp:
        data = Path(tmp)
        write_nanogpt_data(ours_overrides(SHAPES["4 x 256"], args.seq_len, args.steps, args.window), data)
        result = {"machine": machine(), "steps": args.steps, "window": args.window, "seq_len": args.seq_len,
                  "repeats": args.repeats,
                  "nanogpt_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.nanogpt, capture_output=True,
                                                   text=True).stdout.strip() or None,
                  "shapes": {name: compare(args.nanogpt, data, shape, args) for name, shape in SHAPES.items()
                             if not args.only or name in args.only}}
    result["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result["shapes"].items():
        for baseline, ratio in r["ratio"].items():
            pairs = r["ratio_per_round"][baseline]
            print(f"{name}: gpt2dist {r['median']['gpt2dist']:,.0f} / {baseline} {r['median'][baseline]:,.0f} tokens/s"
                  f" = {ratio:.3f} (rounds {min(pairs):.3f}-{max(pairs):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
