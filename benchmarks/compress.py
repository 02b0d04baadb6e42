"""Compression measured side by side, on CPU (results in BENCHMARKS.md):

1. pretrain a small model on the built-in `stdlib` corpus (train.py's Trainer, in this process);
2. quantize it with every method, and prune it (global magnitude at several sparsities; MLP neurons at
   several fractions), each pruned model also after a short recovery run (train.py train.init_from);
3. measure held-out perplexity (the corpus's validation split), size on disk, peak memory of loading
   and generating (a fresh process each), generation tokens/s (batch 1, KV cache, greedy) and, for
   MLP pruning, the time of a training step (forward + backward);
4. the same speed, size and memory for random weights of the `gpt2` shape (124M), where the blocks'
   linear layers, not the embedding, hold most of the weights.

Timings alternate between the variants, round after round, on a machine others share: the report
gives each one's median and its spread (min-max) over the rounds, and ratios to fp32 of the same round.

    python benchmarks/compress.py --out benchmarks/results/compress
"""

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine  # noqa: E402
from gpt2dist.commands.compress import main as compress_main  # noqa: E402
from gpt2dist.config import CONF_DIR, load_model_preset, register  # noqa: E402
from gpt2dist.commands.export import export_checkpoint  # noqa: E402
from gpt2dist.data.builtin_corpus import Builtin, builtin_corpus  # noqa: E402
from gpt2dist.models.sampling import generate  # noqa: E402
from gpt2dist.models.gpt import GPT  # noqa: E402
from gpt2dist.models.hf import export_hf  # noqa: E402
from gpt2dist.models.quantize import METHODS, linear_weight_bytes  # noqa: E402
from gpt2dist.models.weights import load_model  # noqa: E402
from gpt2dist.training.trainer import run  # noqa: E402
from gpt2dist.evals.loss import corpus_loss  # noqa: E402

register()

# Small enough to pretrain in minutes on 2 shared cores: most of its weights are the embedding, so its
# speed says little about quantizing the blocks; the gpt2 shape is measured for that.
SEQ_LEN = 64
SHAPE = [
    "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64", f"data.seq_len={SEQ_LEN}",
    "data=builtin", "data.builtin=stdlib", "train.micro_batch_size=8", "train.global_batch_size=8",
    "train.eval_sequences=64", "optim.lr=1e-3", "optim.min_lr=1e-4", "train.ckpt_interval=0",
    "train.sample_tokens=0", "logger.wandb=disabled", "logger.log_interval=50",
]


def train(run_dir: Path, steps: int, *overrides: str) -> None:
    """What `python train.py SHAPE ... overrides` does, in this process: one start-up for all the runs."""
    args = [*SHAPE, f"train.run_dir={run_dir}", f"train.max_steps={steps}", f"optim.warmup_steps={max(1, steps // 10)}",
            f"train.eval_interval={steps}", "train.resume=never", *overrides]
    t0 = time.perf_counter()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"), contextlib.redirect_stdout(sys.stderr):
        run(compose("config", overrides=args))
    print(f"{run_dir.name}: {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)


def compress(*args) -> None:
    if compress_main([str(a) for a in args]):
        sys.exit(f"compress {args} failed")


def perplexity(path: Path, corpus: Path, sequences: int) -> float:
    return corpus_loss(load_model(path, quiet=True), corpus, "val", SEQ_LEN, 8, sequences)["perplexity"]


def disk_mib(path: Path) -> float:
    """The weights file's size (every format here has one)."""
    return (path / "model.safetensors").stat().st_size / 2**20


def peak_memory_mib(path: Path, new_tokens: int) -> float:
    """Peak resident memory of loading `path` and generating, above the process's after its imports."""
    out = subprocess.run([sys.executable, __file__, "--memory-of", str(path), "--new-tokens", str(new_tokens)],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"memory of {path} failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.split()[-1])


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux VmHWM). Not ru_maxrss: that one keeps, across exec,
    the peak of the benchmark process this one was forked from."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB -> MiB


def memory_child(path: str, new_tokens: int) -> None:
    from gpt2dist.models.compressed import torchao

    torchao()  # imported before the baseline, as every variant would pay it
    before = peak_rss_mib()
    model = load_model(path, quiet=True)
    generate(model, torch.zeros(1, 16, dtype=torch.long), new_tokens, temperature=0)
    print(peak_rss_mib() - before)


def alternate(variants: dict[str, object], measure, rounds: int) -> dict[str, list[float]]:
    """measure(variant) for each variant in turn, `rounds` times (after one warm-up round)."""
    for v in variants.values():
        measure(v)
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, v in variants.items():
            times[name].append(measure(v))
    return times


def tokens_per_s(model: GPT, new_tokens: int) -> float:
    idx = torch.zeros(1, 16, dtype=torch.long)
    t0 = time.perf_counter()
    generate(model, idx, new_tokens, temperature=0)
    return new_tokens / (time.perf_counter() - t0)


def step_seconds(model: GPT, batch: int = 4) -> float:
    idx = torch.randint(0, model.config.vocab_size, (batch, SEQ_LEN + 1))
    t0 = time.perf_counter()
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratios(times: dict[str, list[float]], base: str = "fp32") -> dict[str, dict]:
    """Per round, each variant's value over the baseline's of the same round."""
    return {name: spread([v / b for v, b in zip(vals, times[base])]) for name, vals in times.items()}


def quantized_variants(source: Path, work: Path) -> dict[str, Path]:
    dirs = {"fp32": source}
    for method in METHODS:
        dirs[method] = work / method
        compress("quantize", source, dirs[method], "--method", method, "--overwrite")
    return dirs


def speed_size_memory(dirs: dict[str, Path], rounds: int, new_tokens: int) -> dict[str, dict]:
    models = {name: load_model(path, quiet=True) for name, path in dirs.items()}
    speed = alternate(models, lambda m: tokens_per_s(m, new_tokens), rounds)
    speed_ratio = ratios(speed)
    fp32_linear = linear_weight_bytes(models["fp32"])
    return {name: {"disk_mib": disk_mib(dirs[name]), "linear_mib": linear_weight_bytes(m) / 2**20,
                   "linear_ratio": fp32_linear / linear_weight_bytes(m),
                   "peak_mib": peak_memory_mib(dirs[name], new_tokens),
                   "tokens_per_s": spread(speed[name]), "speedup": speed_ratio[name]}
            for name, m in models.items()}


def prune_rows(source: Path, corpus: Path, work: Path, recovery_steps: int, sequences: int, sparsities: list[float],
               fractions: list[float]) -> list[dict]:
    rows = []
    for kind, levels in (("magnitude", sparsities), ("mlp", fractions)):
        for level in levels:
            out = work / f"{kind}-{level:g}"
            if kind == "magnitude":
                compress("prune", source, out, "--sparsity", level, "--overwrite")
                shape = []
            else:
                compress("prune-mlp", source, out, "--fraction", level, "--corpus", corpus, "--sequences", 64,
                         "--seq-len", SEQ_LEN, "--overwrite")
                width = load_model(out, quiet=True).config.mlp_hidden
                shape = [f"model.mlp_hidden=[{','.join(map(str, width))}]"]
            run = work / f"recover-{kind}-{level:g}"
            train(run, recovery_steps, f"train.init_from={out}", *shape)
            rows.append({"kind": kind, "level": level, "perplexity": perplexity(out, corpus, sequences),
                         "recovered": perplexity(run, corpus, sequences)})
    return rows


def report(r: dict) -> str:
    s = r["setup"]
    lines = ["# Compression: quality, size, memory and speed", "",
             f"Command: `{s['command']}`  ", f"Machine: {s['machine']}; {s['seconds']:.0f} s in all.", "",
             f"Small model: {s['small']}, pretrained {s['pretrain_steps']} steps; perplexity on "
             f"{s['sequences']} validation windows of {SEQ_LEN} tokens. Speed: batch 1, {s['new_tokens']} new tokens, "
             f"greedy, KV cache, {s['rounds']} alternating rounds (median, min-max).", ""]
    for name, rows in (("small", r["small"]), ("gpt2 shape, random weights", r["gpt2"])):
        lines += [f"## {name}", "", "| method | perplexity | disk MiB | block linear MiB (x smaller) | peak MiB | "
                  "tokens/s | speed vs fp32 |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for method, m in rows.items():
            ppl = f"{m['perplexity']:.2f}" if "perplexity" in m else "-"
            sp, tp = m["speedup"], m["tokens_per_s"]
            lines.append(f"| {method} | {ppl} | {m['disk_mib']:.1f} | {m['linear_mib']:.1f} ({m['linear_ratio']:.2f}x) | "
                         f"{m['peak_mib']:.0f} | {tp['median']:.1f} ({tp['min']:.1f}-{tp['max']:.1f}) | "
                         f"{sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f}) |")
        lines.append("")
    lines += ["## Pruning: perplexity against sparsity", "",
              f"Recovery: {s['recovery_steps']} steps of train.py from the pruned model (masks fixed). fp32 "
              f"perplexity {r['small']['fp32']['perplexity']:.2f}; the unpruned model trained the same extra steps: "
              f"{r['fp32_recovered']:.2f}.", "",
              "| kind | removed | perplexity | after recovery |", "| --- | --- | --- | --- |"]
    lines += [f"| {p['kind']} | {p['level']:.0%} | {p['perplexity']:.2f} | {p['recovered']:.2f} |" for p in r["prune"]]
    lines += ["", "## Training step with MLP pruning (forward + backward, batch 4)", "",
              "| model | step s (fp32) | ratio pruned/fp32 per round |", "| --- | --- | --- |"]
    for name, st in r["step"].items():
        lines.append(f"| {name} | {st['fp32']['median']:.3f} | {st['ratio']['median']:.3f} "
                     f"({st['ratio']['min']:.3f}-{st['ratio']['max']:.3f}) |")
    lines += ["", "![perplexity against sparsity](report.png)", ""]
    return "\n".join(lines)


def plot(path: Path, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in ("magnitude", "mlp"):
        rows = [p for p in r["prune"] if p["kind"] == kind]
        levels = [0] + [p["level"] for p in rows]
        base = r["small"]["fp32"]["perplexity"]
        ax.plot(levels, [base] + [p["perplexity"] for p in rows], marker="o", label=f"{kind}, no recovery")
        ax.plot(levels, [r["fp32_recovered"]] + [p["recovered"] for p in rows], marker="o", linestyle="--",
                label=f"{kind}, recovered")
    ax.set(xlabel="share removed (weights; MLP neurons)", ylabel="validation perplexity", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def mlp_step(source: Path, corpus: Path, work: Path, rounds: int) -> dict:
    compress("prune-mlp", source, work / "mlp-step", "--fraction", 0.25, "--corpus", corpus, "--sequences", 16,
             "--seq-len", SEQ_LEN, "--overwrite")
    models = {"fp32": load_model(source, quiet=True).train(), "pruned": load_model(work / "mlp-step", quiet=True).train()}
    times = alternate(models, step_seconds, rounds)
    return {"fp32": spread(times["fp32"]), "pruned": spread(times["pruned"]), "ratio": ratios(times)["pruned"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="where report.md, report.json and report.png go")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "compress", help="models and runs (emptied first)")
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--recovery-steps", type=int, default=30)
    p.add_argument("--sequences", type=int, default=64, help="validation windows for perplexity")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--fraction", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # the child process of peak_memory_mib
    args = p.parse_args(argv)
    if args.memory_of:
        memory_child(args.memory_of, args.new_tokens)
        return 0
    if args.out is None:
        p.error("--out is required")

    t0 = time.perf_counter()
    shutil.rmtree(args.work, ignore_errors=True)
    work = args.work
    corpus = builtin_corpus(Builtin.stdlib, "~/.cache/gpt2dist")
    train(work / "pretrained", args.pretrain_steps)
    source = export_checkpoint(work / "pretrained", work / "small" / "fp32")  # fp32 safetensors: its size on disk
    train(work / "fp32-recovered", args.recovery_steps, f"train.init_from={source}")

    dirs = quantized_variants(source, work / "small")
    small = speed_size_memory(dirs, args.rounds, args.new_tokens)
    for name, path in dirs.items():
        small[name]["perplexity"] = perplexity(path, corpus, args.sequences)
    gpt2_source = export_hf(GPT(load_model_preset("gpt2")), work / "gpt2" / "fp32")
    gpt2 = speed_size_memory(quantized_variants(gpt2_source, work / "gpt2"), args.rounds, args.new_tokens)
    result = {
        "small": small, "gpt2": gpt2,
        "fp32_recovered": perplexity(work / "fp32-recovered", corpus, args.sequences),
        "prune": prune_rows(source, corpus, work / "prune", args.recovery_steps, args.sequences, args.sparsity,
                            args.fraction),
        "step": {"small": mlp_step(source, corpus, work / "small", args.rounds),
                 "gpt2 shape": mlp_step(gpt2_source, corpus, work / "gpt2", args.rounds)},
    }
    result["setup"] = {"command": " ".join(["python benchmarks/compress.py", *(argv or sys.argv[1:])]),
                       "machine": machine(), "seconds": time.perf_counter() - t0, "small": " ".join(SHAPE[:4]),
                       "pretrain_steps": args.pretrain_steps, "recovery_steps": args.recovery_steps,
                       "sequences": args.sequences, "rounds": args.rounds, "new_tokens": args.new_tokens}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "report.md").write_text(report(result))
    plot(args.out / "report.png", result)
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
