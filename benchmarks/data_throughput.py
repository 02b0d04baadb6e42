"""Data pipeline speed, measured side by side in one run (results in BENCHMARKS.md):

1. tokenization: data_tools' preparation (JSON Lines in, shards out, on all cores) against raw
   tiktoken `encode_ordinary_batch` on the same documents with the same number of threads;
2. loader: tokens/s of training micro-batches read from the shards by one process (no workers);
3. resume: time from building the loader to its first batch, at step 10 and at step 10,000.

    python benchmarks/data_throughput.py --out benchmarks/results/data_throughput.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt2dist.data.builtin_corpus import documents  # noqa: E402
from gpt2dist.data.loader import SampleStream, Windows, train_loader  # noqa: E402
from gpt2dist.data.shards import TokenBlocks  # noqa: E402
from gpt2dist.data.tokenizer import get_tokenizer  # noqa: E402
from machine import machine  # noqa: E402  (benchmarks/machine.py)


def tokenization(docs: list[str], work: Path, cores: int) -> dict:
    src = work / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    enc = get_tokenizer()
    enc.encode_ordinary_batch(docs[:100], num_threads=cores)  # warm up
    t0 = time.perf_counter()
    tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(docs, num_threads=cores))
    raw = time.perf_counter() - t0
    # The command users run, start-up included (run in-process, spawned workers would re-import this script).
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "data_tools.prepare", str(src), "--output", str(work / "corpus"),
                    "--workers", str(cores)], check=True, capture_output=True, cwd=ROOT)
    ours = time.perf_counter() - t0
    manifest = json.loads((work / "corpus" / "manifest.json").read_text())
    assert manifest["input_tokens"] == tokens + len(docs)  # the same work: + one <|endoftext|> each
    mb = src.stat().st_size / 1e6
    return {"input_mb": round(mb, 1), "documents": len(docs), "tokens": tokens, "cores": cores,
            "raw_tiktoken_s": round(raw, 2), "data_tools_s": round(ours, 2),
            "raw_tiktoken_mb_per_s": round(mb / raw, 2), "data_tools_mb_per_s": round(mb / ours, 2),
            "ratio": round(raw / ours, 3)}


def loader(corpus: Path, seq_len: int, micro_batch: int, batches: int) -> dict:
    windows = [Windows(TokenBlocks(corpus, "train"), seq_len)]
    stream = SampleStream([len(windows[0])], [1.0], seed=1)
    it = iter(train_loader(windows, stream, micro_batch, rank=0, world_size=1, start=0, num_workers=0))
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
    secs = time.perf_counter() - t0
    tokens = batches * micro_batch * seq_len
    return {"seq_len": seq_len, "micro_batch": micro_batch, "tokens": tokens, "seconds": round(secs, 3),
            "tokens_per_s": round(tokens / secs), "windows_in_corpus": len(windows[0])}


def resume(corpus: Path, seq_len: int, micro_batch: int, global_batch: int, steps: list[int], repeats: int) -> dict:
    windows = [Windows(TokenBlocks(corpus, "train"), seq_len)]
    out = {}
    for step in steps:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            stream = SampleStream([len(windows[0])], [1.0], seed=1)
            next(iter(train_loader(windows, stream, micro_batch, 0, 1, step * global_batch, num_workers=0)))
            times.append(time.perf_counter() - t0)
        out[f"step_{step}_ms"] = round(1000 * statistics.median(times), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=8, help="copies of the built-in corpus to tokenize (about 5 MB each)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/data_throughput.json"))
    args = p.parse_args()
    cores = os.cpu_count() or 1
    docs = list(documents("stdlib")) * args.copies
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = {"machine": machine(),
                  "tokenization": tokenization(docs, work, cores)}
        print(json.dumps(result["tokenization"]), flush=True)
        result["loader"] = loader(work / "corpus", seq_len=1024, micro_batch=16, batches=300)
        print(json.dumps(result["loader"]), flush=True)
        result["resume"] = resume(work / "corpus", seq_len=1024, micro_batch=16, global_batch=512,
                                  steps=[10, 10_000], repeats=7)
        print(json.dumps(result["resume"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
