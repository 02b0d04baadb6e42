"""Tokens and wall time to a fixed validation loss: AdamW against Muon (optim=muon), each at the best
of a learning-rate sweep, several seeds, on the built-in corpus, through train.py.

    python benchmarks/muon.py --out benchmarks/results/muon.json --plot benchmarks/results/muon.png

The sweep runs seed 0 at each learning rate, all runs side by side (one torch thread each, so
AdamW and Muon see the same load on a shared machine); the lower final validation loss picks each
optimizer's rate, and the other seeds run at it, side by side again. The target is AdamW's final validation loss at its rate,
averaged over the seeds; "tokens to target" is where the seeds' mean validation curve first
reaches it (linear between evaluations; each seed's beside it), and its wall time is the training time to there (evaluation left
out: the trainer's log windows, which restart after each evaluation). Both optimizers share the
shape, data order, batch, warmup and cosine schedule, and `optim.lr` (Muon's is matched to AdamW's
as in Moonlight, so one grid serves both); AdamW clips gradients at 1.0, Muon does not (see
conf/optim/muon.yaml).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

from machine import machine
from worker import source_windows

from gpt2dist.config import CONF_DIR, register

ROOT = Path(__file__).resolve().parent.parent


def overrides(args, optim: str, lr: float, seed: int) -> list[str]:
    return ["model=gpt2-tiny", f"model.n_layer={args.layers}", f"model.n_head={args.width // 64}",
            f"model.n_embd={args.width}", f"model.block_size={args.seq_len}", f"data.seq_len={args.seq_len}",
            f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}",
            "train.precision=fp32", f"train.max_steps={args.steps}", f"train.seed={seed}",
            f"train.eval_interval={args.eval_every}", f"logger.log_interval={args.eval_every}",
            f"train.eval_sequences={args.eval_sequences}", "train.ckpt_interval=0", "train.sample_tokens=0",
            "logger.wandb=disabled", f"optim={optim}", f"optim.lr={lr}", f"optim.min_lr={lr / 10}",
            f"optim.warmup_steps={args.warmup}"]


def run_all(args, jobs: list[tuple[str, float, int]]) -> list[dict]:
    """Training runs (optimizer, lr, seed) side by side, one torch thread each, so that AdamW and Muon
    share the machine's load as it comes; their validation curves (tokens, training seconds, val_loss)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="gpt2dist-muon-") as tmp:
        procs = []
        for i, (optim, lr, seed) in enumerate(jobs):
            run_dir = Path(tmp) / str(i)
            procs.append((run_dir, subprocess.Popen(
                [sys.executable, "train.py", *overrides(args, optim, lr, seed), f"train.run_dir={run_dir}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)))
        results = []
        for (run_dir, proc), (optim, lr, seed) in zip(procs, jobs, strict=True):
            _, err = proc.communicate()
            if proc.returncode:
                raise RuntimeError(f"{optim} lr={lr} seed={seed} failed:\n{err[-3000:]}")
            lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            tokens_per_window = args.eval_every * args.batch * args.seq_len
            curve, train_s = [], 0.0
            for m in lines:
                train_s += tokens_per_window / m["tokens_per_s"]
                curve.append({"tokens": m["tokens"], "train_s": train_s, "val_loss": m["val_loss"]})
            results.append({"optim": optim, "lr": lr, "seed": seed, "curve": curve,
                            "final_val_loss": curve[-1]["val_loss"]})
            print(f"{optim:5s} lr={lr:g} seed={seed}: final val_loss {curve[-1]['val_loss']:.4f}, "
                  f"training {train_s:.0f} s", flush=True)
    return results


def reach(curve: list[dict], target: float) -> dict | None:
    """Tokens and training seconds where the validation curve first reaches `target` (linear between
    evaluations); None if it never does."""
    previous = {"tokens": 0, "train_s": 0.0, "val_loss": float("inf")}
    for point in curve:
        if point["val_loss"] <= target:
            if previous["val_loss"] == float("inf"):
                return {k: point[k] for k in ("tokens", "train_s")}
            f = (previous["val_loss"] - target) / (previous["val_loss"] - point["val_loss"])
            return {k: previous[k] + f * (point[k] - previous[k]) for k in ("tokens", "train_s")}
        previous = point
    return None


def mean_curve(runs: list[dict]) -> list[dict]:
    """The seeds' curves averaged point by point (the same evaluation steps)."""
    return [{k: statistics.mean(p[k] for p in points) for k in ("tokens", "train_s", "val_loss")}
            for points in zip(*(r["curve"] for r in runs), strict=True)]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for optim, color in (("adamw", "tab:blue"), ("muon", "tab:red")):
        for r in results["runs"]:
            if r["optim"] == optim and r["lr"] == results["best_lr"][optim]:
                ax.plot([p["tokens"] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], color=color,
                        alpha=0.8, label=f"{optim} lr={r['lr']:g}" if r["seed"] == 0 else None)
    ax.axhline(results["target_val_loss"], color="gray", linestyle="--", label="target (AdamW's final)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_ylim(results["target_val_loss"] - 0.5, results["target_val_loss"] + 2.5)
    ax.set_title(f"{results['shape']}: AdamW vs Muon, {len(results['seeds'])} seeds each")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-sequences", type=int, default=16)
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 4e-3, 8e-3])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/muon.json")
    p.add_argument("--plot", type=Path, default=ROOT / "benchmarks/results/muon.png")
    args = p.parse_args()
    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        source_windows(compose("config", overrides=overrides(args, "adamw", 1e-3, 0)))  # prepared before timing
    optims = ("adamw", "muon")
    runs = run_all(args, [(optim, lr, 0) for lr in args.lrs for optim in optims])  # the sweep, seed 0
    best = {o: min((r for r in runs if r["optim"] == o), key=lambda r: r["final_val_loss"])["lr"] for o in optims}
    runs += run_all(args, [(optim, best[optim], seed) for seed in range(1, args.seeds) for optim in optims])
    at_best = {o: [r for r in runs if r["optim"] == o and r["lr"] == best[o]] for o in optims}
    target = statistics.mean(r["final_val_loss"] for r in at_best["adamw"])
    summary = {}
    for o in optims:
        reached = reach(mean_curve(at_best[o]), target)
        summary[o] = {"lr": best[o], "final_val_loss": [r["final_val_loss"] for r in at_best[o]],
                      "per_seed_to_target": [reach(r["curve"], target) for r in at_best[o]],
                      "tokens_to_target": reached and reached["tokens"],
                      "train_s_to_target": reached and reached["train_s"],
                      "train_s_total": statistics.mean(r["curve"][-1]["train_s"] for r in at_best[o])}
    a, m = summary["adamw"], summary["muon"]
    ratios = {"tokens": m["tokens_to_target"] / a["tokens_to_target"] if m["tokens_to_target"] else None,
              "wall": m["train_s_to_target"] / a["train_s_to_target"] if m["train_s_to_target"] else None,
              "step_time": m["train_s_total"] / a["train_s_total"]}
    results = {"machine": machine(), "command": " ".join(["python", "benchmarks/muon.py", *sys.argv[1:]]),
               "shape": f"{args.layers} x {args.width}, seq {args.seq_len}, batch {args.batch}, {args.steps} steps",
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "seeds": list(range(args.seeds)), "best_lr": best, "target_val_loss": target, "summary": summary,
               "muon_over_adamw": ratios, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.plot)
    print(json.dumps({"target": target, "summary": summary, "muon_over_adamw": ratios}, indent=1))


if __name__ == "__main__":
    main()
