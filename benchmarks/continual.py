"""Continual pretraining with replay, tiny and on CPU (results in BENCHMARKS.md):

1. phase A: train on English prose (the built-in `pydoc` corpus), Python code held out;
2. phase B, from A's final weights, three times: Python code (`pycode`) with 0%, 5% and 25% of
   the training samples replayed from the prose, each re-warming the learning rate to the
   same peak and decaying it again (a fresh cosine schedule).

The report gives, for each replay fraction, the loss on code at the end (the new domain) and
the forgetting on prose: its validation loss at the end minus at the start of phase B.

    python benchmarks/continual.py --out benchmarks/results/continual

Each phase is a `train.py` run (one process); extra arguments are Hydra overrides for all of them.
"""

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A bit larger than the tests' tiny model: a few hundred steps take a minute or two on 2 cores.
SHAPE = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64", "data.seq_len=64",
    "train.micro_batch_size=8", "train.global_batch_size=8", "train.eval_sequences=64",
    "optim.lr=2e-3", "optim.min_lr=2e-4", "train.ckpt_interval=0", "train.sample_tokens=0",
    "logger.wandb=disabled", "logger.log_interval=10",
]


def sources(prose_weight: float) -> str:
    """Code and prose, both evaluated; training samples drawn by weight (0: evaluated only)."""
    return (f"data.sources=[{{name: code, builtin: pycode, weight: {1 - prose_weight}}}, "
            f"{{name: prose, builtin: pydoc, weight: {prose_weight}}}]")


def phase(run_dir: Path, steps: int, evals: int, overrides: list[str]) -> list[dict]:
    """One train.py run of `steps` steps with `evals` evaluations; returns its metrics."""
    args = [*SHAPE, f"train.run_dir={run_dir}", f"train.max_steps={steps}", f"optim.warmup_steps={max(1, steps // 10)}",
            f"train.eval_interval={max(1, steps // evals)}", "train.resume=never", *overrides]
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{run_dir.name} failed (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    print(f"{run_dir.name}: {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def evals_of(metrics: list[dict]) -> list[dict]:
    return [m for m in metrics if "val/prose" in m]


def summary(replay: float, metrics: list[dict]) -> dict:
    start, end = evals_of(metrics)[0], evals_of(metrics)[-1]
    return {"replay": replay, "code_start": start["val/code"], "code_end": end["val/code"],
            "prose_start": start["val/prose"], "prose_end": end["val/prose"],
            "forgetting_prose": end["forgetting/prose"]}


def report(rows: list[dict], setup: dict) -> str:
    lines = [
        "# Continual pretraining: prose (A), then code (B) with replay of A",
        "",
        f"Command: `{setup['command']}`  ",
        f"Phase A: {setup['steps_a']} steps on prose; phase B: {setup['steps_b']} steps each, re-warmed and re-decayed "
        f"(cosine); {setup['tokens_per_step']} tokens per step; {setup['seconds']:.0f} s on {setup['machine']}.",
        "",
        "| replay of A | val loss on B (code) at the end | on A (prose) at the start of B | on A at the end | "
        "forgetting on A |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['replay']:.0%} | {r['code_end']:.3f} | {r['prose_start']:.3f} | {r['prose_end']:.3f} | "
              f"{r['forgetting_prose']:+.3f} |" for r in rows]
    lines += ["", f"Before phase B the loss on code was {rows[0]['code_start']:.3f}.", "", "![curves](report.png)", ""]
    return "\n".join(lines)


def plot(path: Path, phase_a: list[dict], runs: dict[float, list[dict]], steps_a: int) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for ax, name, title in zip(axes, ("prose", "code"), ("A: prose (old domain)", "B: code (new domain)")):
        a = evals_of(phase_a)
        ax.plot([m["step"] for m in a], [m[f"val/{name}"] for m in a], color="black", label="phase A")
        for replay, metrics in runs.items():
            b = evals_of(metrics)
            ax.plot([steps_a + m["step"] for m in b], [m[f"val/{name}"] for m in b], label=f"B, {replay:.0%} replay")
        ax.axvline(steps_a, color="grey", linestyle=":")
        ax.set(title=title, xlabel="step", ylabel="validation loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where report.md, report.png and report.json go")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "continual",
                        help="the runs' directories (emptied first)")
    parser.add_argument("--steps-a", type=int, default=300)
    parser.add_argument("--steps-b", type=int, default=200)
    parser.add_argument("--evals", type=int, default=10, help="evaluations per phase")
    parser.add_argument("--replay", type=float, nargs="+", default=[0.0, 0.05, 0.25])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. model.n_embd=32")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    shutil.rmtree(args.runs, ignore_errors=True)  # each phase refuses a run directory that holds checkpoints
    phase_a = phase(args.runs / "A", args.steps_a, args.evals, [sources(1.0), *args.overrides])
    runs = {r: phase(args.runs / f"B-replay-{r:g}", args.steps_b, args.evals,
                     [sources(r), f"train.init_from={args.runs / 'A'}", *args.overrides])
            for r in args.replay}
    rows = [summary(r, m) for r, m in runs.items()]
    tokens_per_step = next(m["tokens"] for m in phase_a if "tokens" in m) // next(m["step"] for m in phase_a
                                                                                  if "tokens" in m)
    setup = {"command": " ".join(["python benchmarks/continual.py", *(argv if argv is not None else sys.argv[1:])]),
             "steps_a": args.steps_a, "steps_b": args.steps_b, "tokens_per_step": tokens_per_step,
             "seconds": time.perf_counter() - t0, "machine": f"{platform.processor() or platform.machine()}, "
                                                             f"Python {platform.python_version()}"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")
    (args.out / "report.md").write_text(report(rows, setup))
    plot(args.out / "report.png", phase_a, runs, args.steps_a)
    print(report(rows, setup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
