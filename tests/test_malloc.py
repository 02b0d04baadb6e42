"""train.retain_freed_memory: glibc keeps large freed blocks, so allocating the same large tensor
again does not fault its pages in from the OS each time (the default job's logits, every step)."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT, clean_env

CHURN = """
import resource, sys, torch
from gpt2dist.training import malloc
if sys.argv[1] == "retain":
    assert malloc.retain_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[2])):
    torch.ones(16 << 20)  # 64 MiB, above glibc's default mmap threshold; freed at once
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str, blocks: int) -> int:
    out = subprocess.run([sys.executable, "-c", CHURN, mode, str(blocks)], cwd=ROOT, env=clean_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_retained_memory_is_not_faulted_in_again():
    """Page faults of 30 more allocate-and-free rounds of a 64 MiB block (16,384 pages each)."""
    plain = faults("plain", 40) - faults("plain", 10)
    retained = faults("retain", 40) - faults("retain", 10)
    assert plain > 30 * 16_000  # every page of every block faulted in again
    assert retained < plain / 5, (plain, retained)
