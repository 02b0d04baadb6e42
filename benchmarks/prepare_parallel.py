"""Preparing a corpus in parts (data_tools/parts.py, slurm/prepare.sbatch), measured on this machine
(results in BENCHMARKS.md):

1. tokens/s of one task (`--part 0 --of 1 --workers 1`: every document, one core) against two tasks
   at once (`--part 0 --of 2` and `--part 1 --of 2`, one core each: two array tasks, here two
   processes on two cores); the ratio is what the second task adds;
2. the merge's time (`--merge --of 2`, one core) against the preparation's: `data_tools.prepare` on
   one machine with all its cores, whose corpus the merge's must equal byte for byte (checked).

Every command runs as users run it (a new process, start-up included). The three measurements
alternate, `--repeats` times, so that a change in the machine's load hits them alike; medians are
reported, with the load average before and after.

    python benchmarks/prepare_parallel.py --out benchmarks/results/prepare_parallel.json
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_tools.parts import parts_dir  # noqa: E402
from gpt2dist.data.builtin_corpus import documents  # noqa: E402
from machine import machine  # noqa: E402  (benchmarks/machine.py)

FILES = 8  # Parquet files, FineWeb's layout: a text column, row groups of ROW_GROUP rows
ROW_GROUP = 64


def prepare(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "data_tools.prepare", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def timed(*commands: list[str]) -> float:
    """Seconds from starting these commands at once until the last one ends."""
    start = time.perf_counter()
    procs = [prepare(*c) for c in commands]
    for proc in procs:
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-2000:]
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=4, help="copies of the built-in corpus (about 5 MB each)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/prepare_parallel.json"))
    args = p.parse_args()
    docs = list(documents("stdlib")) * args.copies
    load = [os.getloadavg()[0]]
    times: dict[str, list[float]] = {"one_task": [], "two_tasks": [], "merge": [], "one_machine": []}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "in"
        for i in range(FILES):
            (inputs / f"CC-MAIN-{i:02d}").mkdir(parents=True)
            pq.write_table(pa.table({"text": docs[i::FILES]}), inputs / f"CC-MAIN-{i:02d}" / "000_00000.parquet",
                           row_group_size=ROW_GROUP)
        one, two, whole = (Path(tmp) / name for name in ("one", "two", "whole"))
        common = [str(inputs), "--workers", "1"]
        for _ in range(args.repeats):
            times["one_task"].append(timed([*common, "--output", str(one), "--part", "0", "--of", "1"]))
            shutil.rmtree(parts_dir(one))
            times["two_tasks"].append(timed(*[[*common, "--output", str(two), "--part", k, "--of", "2"]
                                              for k in ("0", "1")]))
            times["merge"].append(timed([str(inputs), "--output", str(two), "--merge", "--of", "2"]))
            times["one_machine"].append(timed([str(inputs), "--output", str(whole)]))
            manifest = json.loads((whole / "manifest.json").read_text())
            assert {f.name: f.read_bytes() for f in two.iterdir()} == {f.name: f.read_bytes() for f in whole.iterdir()}
            shutil.rmtree(two), shutil.rmtree(whole)
        load.append(os.getloadavg()[0])
    tokens = manifest["input_tokens"]
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "machine": machine(),
        "input": {"mb": round(manifest["input_bytes"] / 1e6, 1), "documents": len(docs), "tokens": tokens,
                  "files": FILES, "row_group_rows": ROW_GROUP},
        "seconds": {name: [round(s, 2) for s in t] for name, t in times.items()},
        "one_task_tokens_per_s": round(tokens / median["one_task"]),
        "two_tasks_tokens_per_s": round(tokens / median["two_tasks"]),
        "two_tasks_over_one": round(median["one_task"] / median["two_tasks"], 2),
        "merge_tokens_per_s": round(tokens / median["merge"]),
        "merge_over_one_machine": round(median["merge"] / median["one_machine"], 3),
        "load_average_before_after": [round(x, 1) for x in load],
    }
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
