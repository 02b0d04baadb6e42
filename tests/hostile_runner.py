"""Runs many command lines in one process, for tests/test_hostile_inputs.py: Python and torch start once.

    python tests/hostile_runner.py CASES.json RESULTS.json

CASES.json is a list of {"id", "cwd", "root", "argv"}; argv is `["-m", MODULE, ARGS...]` (the module's
`main(ARGS)` is called) or `[SCRIPT, ARGS...]` (a script of the repository, run as `__main__`, as `python SCRIPT ARGS` would). For
each, RESULTS.json gets the exit status, what it printed on stdout and stderr (file descriptors 1 and 2,
so that what libraries write there is seen too), every file under `root` before and after (path ->
SHA-256, or the target of a symbolic link), and how much the process's peak memory grew.
"""

import hashlib
import importlib
import json
import os
import resource
import runpy
import sys
import tempfile
import traceback
from pathlib import Path


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: a file's SHA-256, a link's target, a directory's mode."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                entries[rel] = "link -> " + os.readlink(path)
            elif path.is_dir():
                entries[rel] = f"dir {path.stat().st_mode & 0o777:o}"
            else:
                entries[rel] = hashlib.sha256(path.read_bytes()).hexdigest() + f" {path.stat().st_mode & 0o777:o}"
    return entries


def run_one(argv: list[str], home: str) -> int:
    """Run a command line as `python ARGV` would, in this process; returns its exit status. A script is
    the repository's (`train.py`: home/train.py)."""
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            status = importlib.import_module(argv[1]).main(argv[2:])
        else:
            sys.argv = [str(Path(home) / argv[0]), *argv[1:]]
            runpy.run_path(sys.argv[0], run_name="__main__")
            status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # what an uncaught exception would do: its traceback, exit status 1
        traceback.print_exc()
        status = 1
    return int(status or 0)


def main() -> None:
    cases_file, results_file = map(Path, sys.argv[1:3])  # before the commands set sys.argv
    cases = json.loads(cases_file.read_text())
    results, home = {}, os.getcwd()
    sys.path.insert(0, home)
    for case in cases:
        root = Path(case["root"])
        before = snapshot(root)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            sys.stdout.flush(), sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
            try:
                os.chdir(case["cwd"])
                status = run_one(case["argv"], home)
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os.chdir(home)
                os.dup2(saved[0], 1), os.dup2(saved[1], 2)
                os.close(saved[0]), os.close(saved[1])
            out.seek(0), err.seek(0)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
        results[case["id"]] = {"status": status, "stdout": stdout, "stderr": stderr, "before": before,
                               "after": snapshot(root), "peak_growth_mib": grew_kib / 1024}
    results_file.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
