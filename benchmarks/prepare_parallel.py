"""Preparing a corpus in parts (data_tools/parts.py, slurm/prepare.sbatch), measured on this machine
(results in BENCHMARKS.md):

1. tokens/s of one task (`--part 0 --of 1 --workers 1`: every document, one core) against two tasks
   at once (`--part 0 --of 2` and `--part 1 --of 2`, one core each: two array tasks, here two
   processes on two cores); the ratio is what the second task adds;
2. the merge's time (`--merge --of 2`, one core) against the preparation's: `data_tools.prepare` on
   one machine with all its cores, whose corpus the merge's must equal byte for byte (checked).

Every command runs as users run it (a new process, start-up included). The three measurements
alternate, `--repeats` times, so that a change in the machine's load hits them alike; medians are
reported, with the load average before and after. On a machine shared with other work the wall
times of two tasks depend on what else runs; each task's CPU seconds are what its wall time would
be on a core (a machine) of its own, so the ratio is also given from those.

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


def timed(*commands: list[str]) -> tuple[float, list[float]]:
    """Start these data_tools.prepare command lines at once: the seconds until the last one ends, and
    each one's CPU seconds (user + system, its worker processes included)."""
    start, cpu = time.perf_counter(), []
    with tempfile.TemporaryFile() as err:
        procs = [subprocess.Popen([sys.executable, "-m", "data_tools.prepare", *c], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=err) for c in commands]
        for proc in procs:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            err.seek(0)
            assert proc.returncode == 0, err.read().decode()[-2000:]
            cpu.append(usage.ru_utime + usage.ru_stime)
    return time.perf_counter() - start, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=16, help="copies of the built-in corpus (about 5 MB each)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/prepare_parallel.json"))
    args = p.parse_args()
    docs = list(documents("stdlib")) * args.copies
    load = [os.getloadavg()[0]]
    wall: dict[str, list[float]] = {"one_task": [], "two_tasks": [], "merge": [], "one_machine": []}
    cpu: dict[str, list[list[float]]] = {name: [] for name in wall}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "in"
        for i in range(FILES):
            (inputs / f"CC-MAIN-{i:02d}").mkdir(parents=True)
            pq.write_table(pa.table({"text": docs[i::FILES]}), inputs / f"CC-MAIN-{i:02d}" / "000_00000.parquet",
                           row_group_size=ROW_GROUP)
        one, two, whole = (Path(tmp) / name for name in ("one", "two", "whole"))
        common = [str(inputs), "--workers", "1"]
        runs = {"one_task": lambda: [[*common, "--output", str(one), "--part", "0", "--of", "1"]],
                "two_tasks": lambda: [[*common, "--output", str(two), "--part", k, "--of", "2"] for k in ("0", "1")],
                "merge": lambda: [[str(inputs), "--output", str(two), "--merge", "--of", "2"]],
                "one_machine": lambda: [[str(inputs), "--output", str(whole)]]}
        for _ in range(args.repeats):
            for name, commands in runs.items():
                seconds, used = timed(*commands())
                wall[name].append(seconds)
                cpu[name].append(used)
            manifest = json.loads((whole / "manifest.json").read_text())
            assert {f.name: f.read_bytes() for f in two.iterdir()} == {f.name: f.read_bytes() for f in whole.iterdir()}
            shutil.rmtree(parts_dir(one)), shutil.rmtree(two), shutil.rmtree(whole)
        load.append(os.getloadavg()[0])
    tokens = manifest["input_tokens"]
    median = {name: statistics.median(t) for name, t in wall.items()}
    # A task's CPU seconds are what its wall time would be on a core of its own, as on a machine of its own.
    slowest_task = statistics.median(max(used) for used in cpu["two_tasks"])
    one_task_cpu = statistics.median(used[0] for used in cpu["one_task"])
    result = {
        "machine": machine(),
        "input": {"mb": round(manifest["input_bytes"] / 1e6, 1), "documents": len(docs), "tokens": tokens,
                  "files": FILES, "row_group_rows": ROW_GROUP},
        "wall_s": {name: [round(s, 2) for s in t] for name, t in wall.items()},
        "cpu_s": {name: [[round(s, 2) for s in used] for used in t] for name, t in cpu.items()},
        "one_task_tokens_per_s": round(tokens / median["one_task"]),
        "two_tasks_tokens_per_s": round(tokens / median["two_tasks"]),
        "two_tasks_over_one_wall": round(median["one_task"] / median["two_tasks"], 2),
        "two_tasks_over_one_cpu": round(one_task_cpu / slowest_task, 2),
        "merge_tokens_per_s": round(tokens / median["merge"]),
        "merge_over_one_machine": round(median["merge"] / median["one_machine"], 3),
        "load_average_before_after": [round(x, 1) for x in load],
    }
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
