"""Importing and starting DeepSpeed without its noise.

DeepSpeed announces how it picked its accelerator on every import, prints its gcc probes and
"built successfully" lines while starting, and raises hundreds of FutureWarnings about
torch.distributed at ZeRO 3. None of it is for the user unless something fails: `load()` picks
the accelerator itself and filters the warnings, `quiet()` holds the rest back and shows it
only when the block fails, and `announce_build()` says once, before a long first build, what
is being built.
"""

import contextlib
import io
import os
import sys
import tempfile
import warnings


def load():
    """`import deepspeed`, with the accelerator named (CUDA when torch sees a GPU, else the CPU)
    rather than detected, and its torch.distributed FutureWarnings filtered."""
    if "DS_ACCELERATOR" not in os.environ:  # a user's own choice is kept
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(deepspeed|torch\.distributed)(\.|$)")
    import deepspeed

    return deepspeed


@contextlib.contextmanager
def quiet():
    """Hold back what the block writes to stdout and stderr (Python and native code alike) and
    write it out only if the block raises."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    python_level = io.StringIO()  # where sys.stdout is not fd 1 (pytest, notebooks)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 1)
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            with contextlib.redirect_stdout(python_level), contextlib.redirect_stderr(python_level):
                yield
            failed = False
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if failed:
                captured.seek(0)
                sys.stderr.write(captured.read().decode(errors="replace") + python_level.getvalue())
                sys.stderr.flush()


def needs_build(builder) -> bool:
    """Whether DeepSpeed's JIT op `builder` is not yet compiled on this machine."""
    from torch.utils.cpp_extension import _get_build_directory

    name = builder.name
    return not os.path.exists(os.path.join(_get_build_directory(name, verbose=False), f"{name}.so"))


def announce_build(builder_name: str, what: str, is_main: bool) -> None:
    """Say, before DeepSpeed compiles op `builder_name` on its first use on this machine, that
    it does and why this start is slow (the build is silent and can take minutes)."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(builder_name)
    if is_main and builder is not None and needs_build(builder):
        print(f"building DeepSpeed's {what} ({builder.NAME}), once on this machine: this can take a few minutes",
              flush=True)
