"""glibc's allocator, told to keep freed memory (train.retain_freed_memory).

A training step frees and allocates the same large tensors again (the logits and their
gradient: 206 MB each at the default job's batch). glibc maps every block above its mmap
threshold (at most 32 MiB by default) from the OS and unmaps it when freed, so each step
faults in every page of them again: 17.8 million minor page faults and a third of the CPU
time in the kernel in a 40-step default run (benchmarks/allocator.py). Raising the threshold
and never trimming keeps the memory in the process instead: 31x fewer faults, 1.90x the
tokens/s on that run. jemalloc (LD_PRELOAD) did not help there (0.99x). The price: the process keeps
its peak memory until it exits, which a training process does anyway.
"""

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap, and stay there when freed
TOP_PAD = 1 << 28  # grow the heap 256 MiB at a time


def environment() -> dict[str, str]:
    """The same settings as MALLOC_* variables, for a process gpt2dist does not start itself
    (glibc reads them at start-up; a trim threshold this large means never)."""
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(1 << 62),
            "MALLOC_TOP_PAD_": str(TOP_PAD)}


def retain_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory; False where it cannot (not glibc), or where the
    user's environment already tunes malloc (MALLOC_* variables, or another allocator preloaded)."""
    if any(k.startswith("MALLOC_") for k in os.environ) or "LD_PRELOAD" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl without mallopt)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
                and mallopt(M_TOP_PAD, TOP_PAD))
