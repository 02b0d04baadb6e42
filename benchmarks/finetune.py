"""Prompting, full fine-tuning and LoRA compared on the built-in docsig task, tiny and on CPU
(results in BENCHMARKS.md):

1. pretrain a small GPT-2 on the built-in `stdlib` corpus (Python's docs and source);
2. from it: zero-shot and 3-shot prompting (`gpt2dist.evaluate --sft`), full fine-tuning
   (`task=sft`) and LoRA (`peft=lora`, r=8) on `data.builtin=docsig` (a stdlib function's
   docstring summary -> its `def` line), all scored on the same test split with BLEU and chrF;
3. at `gpt2` (124M) shape, a few steps of full fine-tuning and of LoRA r=8 from the same random
   weights: trainable parameters, checkpoint size and peak memory.

Each training is a `train.py` process: its peak resident memory is its own (wait4's ru_maxrss).

    python benchmarks/finetune.py --out benchmarks/results/finetune
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine  # noqa: E402

SEQ = 128
# The 50257-way output layer dominates a step of a model this small: 2 layers 64 wide, 8 sequences per step.
SMALL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", f"model.block_size={SEQ}", f"data.seq_len={SEQ}",
         "train.micro_batch_size=8", "train.global_batch_size=8", "train.sample_tokens=0", "logger.wandb=disabled",
         "logger.log_interval=10", "train.resume=never"]
SFT = ["task=sft", "data=builtin", "data.builtin=docsig", "train.eval_sequences=64", "task.generate_examples=16",
       "task.max_new_tokens=32", "train.keep_best=val_chrf", "train.keep_last=1", "train.ckpt_interval=0"]
LORA = ["peft=lora", "peft.r=8", "peft.alpha=16", "peft.target_modules=[c_attn,c_proj,c_fc]"]


def peak_gib_of(args: list[str], log: Path) -> tuple[float, str]:
    """Run `python args` (stderr to `log`) and return its own peak resident memory (GiB) and stdout."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
        out = proc.stdout.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
    if status:
        sys.exit(f"{' '.join(args[:3])} failed (stderr in {log}):\n{out[-2000:]}")
    return usage.ru_maxrss / 2**20, out  # ru_maxrss is in KiB on Linux


def trained(run_dir: Path, overrides: list[str]) -> dict:
    """A fine-tuning run's numbers: test scores, trainable parameters, checkpoint size, peak memory, tokens/s."""
    t0 = time.perf_counter()
    peak, out = peak_gib_of([str(ROOT / "train.py"), f"train.run_dir={run_dir}", *overrides],
                            run_dir.parent / f"{run_dir.name}.stderr")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    test = json.loads((run_dir / "test.json").read_text()) if (run_dir / "test.json").is_file() else {}
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
    trainable = next((int(line.split(": ")[1].split()[0].replace(",", "")) for line in out.splitlines()
                      if "trainable parameters" in line), None)
    total = next(int(line.split(": ")[1].split()[0].replace(",", "")) for line in out.splitlines()
                 if line.startswith("model "))
    speeds = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m][1:]  # the first includes start-up
    print(f"{run_dir.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return {"test_bleu": test.get("test_bleu"), "test_chrf": test.get("test_chrf"),
            "trainable": trainable or total, "params": total,
            "checkpoint_mb": sum(f.stat().st_size for f in ckpt.iterdir()) / 1e6, "peak_gib": peak,
            "tokens_per_s": sum(speeds) / len(speeds) if speeds else None}


def prompted(model: Path, shots: int) -> dict:
    """Prompting the pretrained model on the whole test split."""
    peak, out = peak_gib_of(["-m", "gpt2dist.evaluate", str(model), "--sft", str(docsig()), "--shots", str(shots),
                             "--max-new-tokens", "32", "--device", "cpu"], model.parent / f"{shots}-shot.stderr")
    scores = json.loads(out[out.index("\n{") + 1:] if not out.startswith("{") else out)["sft_test"]  # after any warning
    return {"test_bleu": scores["bleu"], "test_chrf": scores["chrf"], "trainable": 0, "peak_gib": peak}


def docsig() -> Path:
    from gpt2dist.data.builtin_corpus import builtin_corpus

    return builtin_corpus("docsig", "~/.cache/gpt2dist", progress=False, seq_len=SEQ)


def report(rows: dict, shape: dict, setup: dict) -> str:
    lines = ["# Adapting a small GPT-2 to docsig: prompting, full fine-tuning, LoRA", "",
             f"Pretrained {setup['pretrain_steps']} steps on the built-in stdlib corpus (2 layers, 64 wide, "
             f"{SEQ} tokens); fine-tuned {setup['epochs']} epochs on docsig's {setup['train_examples']} train "
             f"examples; test: {setup['test_examples']} examples. {setup['seconds']:.0f} s on {setup['machine']}.", "",
             "| method | test BLEU | test chrF | trainable params | checkpoint MB | peak RSS GiB | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['test_bleu']:.2f} | {r['test_chrf']:.2f} | {r['trainable']:,} | "
                     f"{r.get('checkpoint_mb', 0):.2f} | {r['peak_gib']:.2f} | {r.get('tokens_per_s') or 0:,.0f} |")
    lines += ["", f"At gpt2 (124M) shape, {setup['shape_steps']} steps, micro-batch 1 x {SEQ} tokens:", "",
              "| method | trainable params | share | checkpoint MB | peak RSS GiB |", "|---|---|---|---|---|"]
    for name, r in shape.items():
        lines.append(f"| {name} | {r['trainable']:,} | {100 * r['trainable'] / r['params']:.2f}% | "
                     f"{r['checkpoint_mb']:.1f} | {r['peak_gib']:.2f} |")
    return "\n".join(lines + ["", "![scores](report.png)", ""])


def plot(path: Path, rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(rows)
    for i, metric in enumerate(("test_bleu", "test_chrf")):
        ax.bar([x + 0.4 * i for x in range(len(names))], [rows[n][metric] for n in names], width=0.4,
               label=metric.removeprefix("test_"))
    ax.set_xticks([x + 0.2 for x in range(len(names))], names)
    ax.set_ylabel("score (0-100)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where report.md, report.json and report.png go")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--shape-steps", type=int, default=2)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.out / "runs"
    t0 = time.perf_counter()
    manifest = json.loads((docsig() / "manifest.json").read_text())
    base = runs / "pretrain"
    runs.mkdir(parents=True, exist_ok=True)
    peak_gib_of([str(ROOT / "train.py"), f"train.run_dir={base}", *SMALL, f"train.max_steps={args.pretrain_steps}",
                 "optim.lr=2e-3", "optim.min_lr=2e-4", f"optim.warmup_steps={max(1, args.pretrain_steps // 10)}",
                 "train.eval_interval=100", "train.ckpt_interval=0"], runs / "pretrain.stderr")
    rows = {"zero-shot": prompted(base, 0), "3-shot": prompted(base, 3)}
    sft = [*SMALL, *SFT, f"train.init_from={base}", f"train.epochs={args.epochs}", "train.eval_interval=40",
           "optim.warmup_steps=10"]
    rows["full fine-tuning"] = trained(runs / "full", [*sft, "optim.lr=5e-4", "optim.min_lr=5e-5"])
    rows["LoRA r=8"] = trained(runs / "lora", [*sft, *LORA, "optim.lr=1e-2", "optim.min_lr=1e-3"])
    # gpt2 shape: random weights exported once as the base both start from.
    from gpt2dist.config import load_model_preset
    from gpt2dist.models.gpt import GPT
    from gpt2dist.models.hf import export_hf

    hf_base = export_hf(GPT(load_model_preset("gpt2")), runs / "gpt2-base")
    big = ["model=gpt2", f"train.init_from={hf_base}", f"data.seq_len={SEQ}", "train.micro_batch_size=1",
           "train.global_batch_size=1", f"train.max_steps={args.shape_steps}", "optim.warmup_steps=1",
           "train.eval_interval=0", "train.eval_sequences=1", "train.sample_tokens=0", "logger.wandb=disabled",
           "task.test=false", "task.generate_examples=0", "task=sft", "data=builtin", "data.builtin=docsig",
           "train.resume=never"]
    shape = {"full fine-tuning": trained(runs / "gpt2-full", big), "LoRA r=8": trained(runs / "gpt2-lora", [*big, *LORA])}
    setup = {"pretrain_steps": args.pretrain_steps, "epochs": args.epochs, "train_examples": manifest["examples"]["train"],
             "test_examples": manifest["examples"]["test"], "shape_steps": args.shape_steps,
             "seconds": time.perf_counter() - t0, "machine": machine(),
             "command": "python benchmarks/finetune.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    (args.out / "report.json").write_text(json.dumps({"setup": setup, "tiny": rows, "gpt2_shape": shape}, indent=1))
    (args.out / "report.md").write_text(report(rows, shape, setup))
    plot(args.out / "report.png", rows)
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
