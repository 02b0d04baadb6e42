"""How this process was started, and the process group.

One code path for every launcher: a plain `python train.py` (one process), `torchrun`
(RANK / LOCAL_RANK / WORLD_SIZE set), or `srun` with one task per device (SLURM_PROCID /
SLURM_LOCALID / SLURM_NTASKS). DeepSpeed then reads the standard variables we set.
"""

import contextlib
import datetime
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass

import torch

from gpt2dist.errors import Gpt2distError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # plain, torchrun or srun

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "127.0.0.1"


def detect() -> DistEnv:
    """Read rank and world size from whichever launcher started us."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun")
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]), "srun")
    return DistEnv(0, 0, 1, "plain")


class PeerLost(Gpt2distError, RuntimeError):
    """A collective failed because another rank died or stopped answering (its message is one line)."""

    exit_status = 1  # a failed run, not bad input


# Each rank's (host name, address), gathered once by init(): a lost peer is named by its rank. Kept
# after close(), which the error passes through on its way out.
_peers: list[tuple[str, str]] = []
_rank = 0
_timeout_s = 0.0


# The variables init() may set, and their values before it did; close() puts them back, so
# that the next job of an in-process sweep (`-m`) detects its own launcher, not ours.
_EXPORTED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_saved_env: dict[str, str | None] | None = None


def init(timeout_s: float = 600.0) -> DistEnv:
    """Detect the launcher, export what torch.distributed needs, and join the process group, whose
    collectives fail after waiting `timeout_s` seconds for a rank (`dist.timeout_s`)."""
    global _saved_env
    from gpt2dist.training import deepspeed_env

    deepspeed = deepspeed_env.load()  # heavy import, kept out of module import time
    dist_env = detect()
    if _saved_env is None:
        _saved_env = {k: os.environ.get(k) for k in _EXPORTED}
    os.environ.update(RANK=str(dist_env.rank), LOCAL_RANK=str(dist_env.local_rank),
                      WORLD_SIZE=str(dist_env.world_size))
    if dist_env.launcher == "srun":
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
        os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))
    elif dist_env.launcher == "plain":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env.local_rank)
    if not torch.distributed.is_initialized():
        _default_timeout(datetime.timedelta(seconds=timeout_s))
        if not torch.cuda.is_available():
            deepspeed_env.announce_build("ShareMemCommBuilder", "shared-memory collectives", dist_env.is_main)
        with deepspeed_env.quiet():  # its gcc probes and build lines
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                       timeout=datetime.timedelta(seconds=timeout_s))
        _gather_peers(dist_env.world_size, timeout_s)
    return dist_env


def _gather_peers(world_size: int, timeout_s: float) -> None:
    """Remember every rank's host name and address (one all-gather), this rank and the timeout."""
    global _rank, _timeout_s
    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)  # where gloo's connections come from, as it resolves it too
    except OSError:
        address = ""
    _peers[:] = [("", "")] * world_size
    torch.distributed.all_gather_object(_peers, (host, address))
    _rank, _timeout_s = torch.distributed.get_rank(), timeout_s


# How gloo, NCCL and the TCP store report a peer that died (its connections closed) or stopped
# answering (the collective timed out).
_CLOSED = re.compile(r"Connection (?:closed|reset) by peer|Broken pipe|remote process exited|"
                     r"communicator was aborted", re.IGNORECASE)
_TIMED_OUT = re.compile(r"Timed out waiting \d+ms|Watchdog caught collective operation timeout|Socket Timeout")


@contextlib.contextmanager
def peer_loss_as_error():
    """Turn the failure of a collective whose peer died or stopped answering into PeerLost, whose
    message names the lost rank where the error gives its address. Other errors pass unchanged."""
    try:
        yield
    except RuntimeError as e:  # gloo's and NCCL's errors (torch.distributed.DistError is one too)
        if len(_peers) < 2 or not (_CLOSED.search(str(e)) or _TIMED_OUT.search(str(e))):
            raise
        raise PeerLost(_lost_peer_message(str(e))) from e


def _lost_peer_message(error: str) -> str:
    """One line: this rank, the lost rank(s) on the address in `error` if any, and gloo's own words."""
    detail = error.strip().splitlines()[0]
    detail = re.sub(r"^\[[^\]]*\.(?:cc|cpp):\d+\] ", "", detail)  # gloo's source location
    detail = detail.split(". ")[0]  # gloo's advice after the first sentence
    address = re.search(r"\[([0-9a-fA-F.:]+)\]:\d+", error)
    lost = [f"rank {r} ({host})" for r, (host, addr) in enumerate(_peers) if address and addr == address.group(1)
            and r != _rank]
    if _CLOSED.search(error):
        what = f"lost {', '.join(lost) if lost else 'a peer rank'}: {detail}"
    else:
        what = (f"waited dist.timeout_s={_timeout_s:g} s in a collective for a peer rank that stopped answering "
                f"({detail})")
    return f"rank {_rank} {what}; start the job again to resume from the newest checkpoint (train.resume=auto)"


def _default_timeout(timeout: datetime.timedelta) -> None:
    """Make `timeout` the default of every process group created after this one, too: DeepSpeed makes
    its own (a copy of the world group carries the gradient reductions) without passing a timeout, so
    they would get torch's (30 minutes for gloo, 10 for NCCL), and a rank whose peer hangs would wait
    that long (measured: `dist.timeout_s=5` alone did not stop a 2-rank run with a stopped peer)."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout


_WORKER_DRAIN_S = 0.05  # how long close() leaves the GIL to the groups' worker threads


def close() -> None:
    """Leave the process group and put back the environment init() changed.

    Destroying the group stops its store and communication threads in order: a native thread
    still running when the interpreter exits aborts it (`terminate called without an active
    exception`, exit 134), which would replace a clean `error:` line and exit status.

    A group something still references outlives the call, threads included: a ZeRO-3 engine's
    partitioned parameters keep theirs. A gloo worker that finished a collective then releases its
    tensors, which takes the GIL; when the main thread, woken by that collective, reaches the
    interpreter's finalization first (a 2-rank ZeRO-3 generation did, about one exit in seven),
    the worker is made to exit inside a destructor and the process aborts the same way
    (pytorch/pytorch#190489). Releasing the GIL for a moment here lets such a worker finish.
    """
    global _saved_env
    if torch.distributed.is_initialized():
        from deepspeed import comm

        comm.destroy_process_group()  # also drops DeepSpeed's cached groups; the next init() makes new ones
        time.sleep(_WORKER_DRAIN_S)
    if _saved_env is not None:
        for key, value in _saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _saved_env = None
