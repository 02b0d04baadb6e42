"""data_tools.prepare in parts (data_tools/parts.py): the plan, the merge, reruns and refusals, in
process; then slurm/prepare.sbatch on the two-node test cluster, where arrays of 1, 2 and 3 tasks and
their merges write the single-machine corpus byte for byte, and so does an array one of whose tasks
is killed mid-way and run again alone."""

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_tools import prepare
from data_tools.parts import PART_MANIFEST, make_plan, part_dir, parts_dir
from data_tools.sources import Piece, input_files, parquet_row_groups
from gpt2dist.outputs import MARKER
from tests.conftest import ROOT, clean_env
from tests.test_multinode import two_nodes  # noqa: F401  (the two-node cluster fixture)
from tests.test_slurm import job_field, wait_for

WORDS = ("sphinx of black quartz judge my vow the five boxing wizards jump quickly pack my box with "
         "five dozen liquor jugs how vexingly quick daft zebras jump").split()
SETTINGS = ["--block-tokens", "64", "--shard-mb", "0.01", "--val-fraction", "0.1"]
DONE = ("COMPLETED", "FAILED", "CANCELLED")


def jsonl(docs: list[str]) -> bytes:
    return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()


def make_inputs(root: Path) -> Path:
    """About 300 KB of text in FineWeb's layout and in JSON Lines: Parquet files in nested folders (a
    `text` column among others, row groups of 25 rows), a .jsonl and a .jsonl.zst."""
    rng = random.Random(0)
    docs = [f"Document {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(20, 160))) for i in range(600)]
    (root / "data" / "CC-MAIN-2024-10").mkdir(parents=True)
    (root / "data" / "CC-MAIN-2024-18").mkdir()
    (root / "a.jsonl").write_bytes(jsonl(docs[:100]))
    (root / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(docs[100:200])))
    for name, chunk in [("CC-MAIN-2024-10/000_00000.parquet", docs[200:450]),
                        ("CC-MAIN-2024-18/000_00000.parquet", docs[450:520]),
                        ("CC-MAIN-2024-18/000_00001.parquet", docs[520:])]:
        table = pa.table({"id": [f"<urn:{i}>" for i in range(len(chunk))], "text": chunk,
                          "url": [f"https://example.com/{i}" for i in range(len(chunk))]})
        pq.write_table(table, root / "data" / name, row_group_size=25)
    return root


def damage_row_group(path: Path, group: int) -> None:
    """Scramble the data of one row group of a Parquet file, its footer left intact."""
    column = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 40 : start + column.total_compressed_size - 10] = bytes(column.total_compressed_size - 50)
    path.write_bytes(data)


def run(*args: str) -> tuple[int, str, str]:
    """data_tools.prepare in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = prepare.main(list(args))
    return status, out.getvalue(), err.getvalue()


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def in_parts(inputs: Path, out: Path, of: int, *extra: str) -> tuple[int, str, str]:
    """Every part of `of`, last first (tasks run in any order), then the merge."""
    for k in reversed(range(of)):
        status, _, err = run(str(inputs), "--output", str(out), *SETTINGS, "--workers", "1", *extra,
                             "--part", str(k), "--of", str(of))
        assert status == 0, err
    return run(str(inputs), "--output", str(out), *SETTINGS, *extra, "--merge", "--of", str(of))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return make_inputs(tmp_path_factory.mktemp("parts") / "in")


@pytest.fixture(scope="module")
def reference(inputs) -> tuple[Path, str]:
    """The corpus of the inputs prepared on one machine, by the command users run, and what it printed."""
    out = inputs.parent / "one-machine"
    r = subprocess.run([sys.executable, "-m", "data_tools.prepare", str(inputs), "--output", str(out), *SETTINGS],
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def test_plan_cuts_the_inputs_into_contiguous_parts_of_about_equal_size(inputs):
    files, _ = input_files([str(inputs)])
    units = [(f, g) for f in files for g in (range(len(parquet_row_groups(f))) if f.suffix == ".parquet" else [None])]
    size = {(f, g): (f.stat().st_size if g is None else parquet_row_groups(f)[g]) for f, g in units}
    plan = make_plan(files, 1, "text", 0.1, False)
    assert plan.parts == [[Piece(f) for f in files]]  # one part: every file read whole, as on one machine
    for of in range(2, 8):
        plan = make_plan(files, of, "text", 0.1, False)
        read = [[(p.path, g) for p in part for g in (p.row_groups or range(len(parquet_row_groups(p.path))) or [None])]
                for part in plan.parts]
        assert [u for part in read for u in part] == units  # every unit once, in the inputs' order
        largest = max(size.values())
        assert all(sum(size[u] for u in part) <= sum(size.values()) / of + largest for part in read)
        assert plan == make_plan(files, of, "text", 0.1, False)  # what every task computes alone
    cut = [p for part in make_plan(files, 3, "text", 0.1, False).parts for p in part if p.row_groups is not None]
    assert cut and all(p.path.suffix == ".parquet" for p in cut)  # a Parquet file split between row groups
    fingerprints = {make_plan(files, 3, *s).fingerprint for s in [("text", 0.1, False), ("body", 0.1, False),
                                                                  ("text", 0.2, False), ("text", 0.1, True)]}
    assert len(fingerprints) == 4 and make_plan(files, 4, "text", 0.1, False).fingerprint not in fingerprints


@pytest.mark.parametrize("of", [1, 2, 3, 7])
def test_parts_merge_into_the_single_machine_corpus(inputs, reference, tmp_path, of):
    corpus, printed = reference
    status, out, err = in_parts(inputs, tmp_path / "out", of)
    assert status == 0, err
    assert files_of(tmp_path / "out") == files_of(corpus)  # shards and manifest, byte for byte
    assert out.splitlines()[:-1] == printed.splitlines()[:-1]  # the same summary (but the "wrote" line)
    assert f"merging {of} parts" in err  # its progress bar
    assert not parts_dir(tmp_path / "out").exists()  # the parts removed once merged


def test_skip_bad_counts_every_bad_input_once_whatever_the_parts(inputs, tmp_path):
    """Bad rows and files skipped (--skip-bad) in parts are counted as on one machine: a Parquet file
    without the column, cut into several parts, counts once."""
    bad = tmp_path / "in"
    bad.mkdir()
    texts = pq.read_table(inputs / "data" / "CC-MAIN-2024-10" / "000_00000.parquet")["text"].to_pylist()
    pq.write_table(pa.table({"body": texts}), bad / "1-nocolumn.parquet", row_group_size=10)
    pq.write_table(pa.table({"text": [None if i % 7 == 3 else t for i, t in enumerate(texts)]}),
                   bad / "2-nulls.parquet", row_group_size=10)
    (bad / "3-mixed.jsonl").write_bytes((inputs / "a.jsonl").read_bytes() + b"{oops\n")
    (bad / "4-binary.dat").write_bytes(b"\0" * 100)
    pq.write_table(pa.table({"text": texts}), bad / "0-damaged.parquet", row_group_size=10)
    damage_row_group(bad / "0-damaged.parquet", 3)
    files, _ = input_files([str(bad)])
    cut = {p.path.name for of in (2, 3, 5) for part in make_plan(files, of, "text", 0.1, True).parts for p in part
           if p.row_groups is not None}
    assert cut == {"1-nocolumn.parquet", "2-nulls.parquet", "0-damaged.parquet"}
    args = [str(bad), *SETTINGS, "--skip-bad"]
    status, printed, err = run(*args, "--output", str(tmp_path / "one"))
    assert status == 0, err
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["skipped_inputs"] == 1 + 36 + 1 + 1 and "skipped 1 files: 1 binary" in printed
    assert "0-damaged.parquet: damaged Parquet row group 3 after row 30" in err  # and its rows after are read
    for of in (2, 3, 5):
        status, out, err = in_parts(bad, tmp_path / f"out{of}", of, "--skip-bad")
        assert status == 0, err
        assert files_of(tmp_path / f"out{of}") == files_of(tmp_path / "one"), of
        assert out.splitlines()[:-1] == printed.splitlines()[:-1]


def test_a_rerun_redoes_only_an_incomplete_part(inputs, reference, tmp_path):
    """A task killed mid-way leaves its staging directory (prepare.staged's, beside the part): its
    rerun removes it and makes the part; a complete part is not made again; a part from other
    settings is refused by the merge, naming it, and made again by its rerun."""
    out, args = tmp_path / "out", [str(inputs), "--output", str(tmp_path / "out"), *SETTINGS, "--workers", "1"]
    assert run(*args, "--part", "0", "--of", "2")[0] == 0
    assert run(*args, "--val-fraction", "0.5", "--part", "1", "--of", "2")[0] == 0  # another corpus's part 1
    status, _, err = run(*args, "--merge", "--of", "2")
    assert status == 2 and err.count("error: ") == 1
    assert f"error: {part_dir(out, 1, 2) / PART_MANIFEST}: settings.val_fraction: made with 0.5, this merge has 0.1: " \
           "run part 1 again (--part 1 --of 2)" in err
    left = parts_dir(out) / ".part-00001-of-00002.tmp-k1ll3d"  # as a killed task leaves it
    left.mkdir()
    (left / MARKER).write_text(json.dumps({"written_by": "gpt2dist", "kind": "part"}))  # staging: ours
    (left / "train.tokens").write_bytes(b"\1\2" * 1000)
    made = (part_dir(out, 0, 2) / PART_MANIFEST).stat().st_mtime_ns
    status, said, err = run(*args, "--part", "0", "--of", "2")
    assert status == 0 and said == f"part 0 of 2: already complete in {part_dir(out, 0, 2)}, nothing to do\n"
    assert (part_dir(out, 0, 2) / PART_MANIFEST).stat().st_mtime_ns == made
    status, said, err = run(*args, "--part", "1", "--of", "2")
    assert status == 0 and said.startswith("part 1 of 2: train ") and "part 1 of 2: tokenizing" in err
    assert sorted(p.name for p in parts_dir(out).iterdir()) == ["part-00000-of-00002", "part-00001-of-00002"]
    assert run(*args, "--merge", "--of", "2")[0] == 0
    assert files_of(out) == files_of(reference[0])


@pytest.mark.parametrize("options, message", [
    (["--merge"], "--merge needs --of N"),
    (["--part", "0"], "--part needs --of N"),
    (["--of", "2"], "--of 2 needs either --part K"),
    (["--of", "2", "--part", "0", "--merge"], "--of 2 needs either --part K"),
    (["--of", "2", "--part", "2"], "--part 2: the parts of --of 2 are numbered 0 to 1"),
    (["--of", "0", "--merge"], "--of 0: the number of parts must be at least 1"),
])
def test_part_options_that_do_not_go_together(inputs, tmp_path, options, message):
    status, _, err = run(str(inputs), "--output", str(tmp_path / "out"), *options)
    assert status == 2 and err == f"error: {message}" + err.split(message, 1)[1] and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


# ---- on the two-node SLURM test cluster ----

def sbatch(env, log: Path, *args: str) -> str:
    """sbatch slurm/prepare.sbatch (one CPU) with these sbatch options and arguments; returns the job id."""
    options = [a for a in args if a.startswith(("--array", "--dependency"))]
    out = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", f"--output={log}", *options,
                          str(ROOT / "slurm" / "prepare.sbatch"), *[a for a in args if a not in options]],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def finished(env, job: str) -> str:
    wait_for(lambda: job_field(env, job, "JobState") in DONE, f"job {job}", timeout=120, poll=0.2)
    return job_field(env, job, "JobState")


def test_sbatch_arrays_of_1_2_3_tasks_give_the_single_machine_corpus(two_nodes, inputs, reference,  # noqa: F811
                                                                     tmp_path):
    start = time.monotonic()
    merges = {}
    for of in (1, 2, 3):  # all at once: array tasks on both nodes
        args = [str(inputs), "--output", str(tmp_path / f"out{of}"), *SETTINGS]
        array = sbatch(two_nodes, tmp_path / f"part-{of}-%a.log", f"--array=0-{of - 1}", "--of", str(of), *args)
        merges[of] = sbatch(two_nodes, tmp_path / f"merge-{of}.log", f"--dependency=afterok:{array}",
                            "--merge", "--of", str(of), *args)
    for of, job in merges.items():
        log = (tmp_path / f"merge-{of}.log").read_text() if finished(two_nodes, job) != "COMPLETED" else ""
        assert job_field(two_nodes, job, "JobState") == "COMPLETED", log[-3000:]
        assert files_of(tmp_path / f"out{of}") == files_of(reference[0]), of
    part_log = (tmp_path / "part-3-2.log").read_text()
    assert "part 2 of 3: tokenizing" in part_log and "part 2 of 3: train " in part_log  # progress in its log
    hosts = {log.read_text().split(" on ", 1)[1].split(":", 1)[0] for log in tmp_path.glob("part-*.log")}
    assert hosts == {"node1", "node2"}  # the tasks of an array ran on both nodes
    print(f"3 arrays (6 tasks) and their merges: {time.monotonic() - start:.1f} s")


def pid_of_part(out: Path, k: int) -> int | None:
    """The process tokenizing part k into `out`'s parts (by its command line), if one runs."""
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            args = (proc / "cmdline").read_bytes()
            if b"data_tools.prepare\0" in args and f"--part\0{k}\0".encode() in args and str(out).encode() in args:
                return int(proc.name)
    return None


def test_a_task_killed_mid_way_reruns_alone_and_the_corpus_is_the_same(two_nodes, inputs, reference,  # noqa: F811
                                                                       tmp_path):
    start = time.monotonic()
    out = tmp_path / "out"
    args = [str(inputs), "--output", str(out), *SETTINGS, "--of", "2"]
    array = sbatch(two_nodes, tmp_path / "part-%a.log", "--array=0-1", *args, "--workers", "2")
    def leftovers() -> list[Path]:  # what part 1's staging leaves while it writes (prepare.staged's name)
        return list(parts_dir(out).glob(".part-00001-of-00002.tmp-*"))

    wait_for(lambda: leftovers() and pid_of_part(out, 1), "part 1 to start writing", timeout=120, poll=0.01)
    os.kill(pid_of_part(out, 1), signal.SIGKILL)  # mid-way: its part is staged, not complete
    assert finished(two_nodes, f"{array}_1") == "FAILED" and finished(two_nodes, f"{array}_0") == "COMPLETED"
    assert leftovers() and not part_dir(out, 1, 2).exists()

    merge = sbatch(two_nodes, tmp_path / "merge-refused.log", "--merge", *args)
    assert finished(two_nodes, merge) == "FAILED"
    errors = [line for line in (tmp_path / "merge-refused.log").read_text().splitlines() if line.startswith("error")]
    assert errors == [(f"error: {parts_dir(out)}: 1 of 2 parts not complete (part 1): run it (--part K --of 2) "
                       "before the merge")]
    assert not out.exists()

    rerun = sbatch(two_nodes, tmp_path / "rerun-%a.log", "--array=1", *args)
    merge = sbatch(two_nodes, tmp_path / "merge.log", f"--dependency=afterok:{rerun}", "--merge", *args)
    assert finished(two_nodes, merge) == "COMPLETED", (tmp_path / "merge.log").read_text()[-3000:]
    assert files_of(out) == files_of(reference[0])
    assert not parts_dir(out).exists()
    print(f"killed task, refused merge, rerun and merge: {time.monotonic() - start:.1f} s")
