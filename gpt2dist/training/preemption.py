"""Stop cleanly on SIGTERM or SIGUSR1: what SLURM (and most schedulers) send before a
preemption or time limit. The trainer finishes the step, saves a checkpoint and exits with
EXIT_REQUEUE, which a launcher takes as "requeue me"; `train.resume=auto` then continues.
"""

import os
import signal
from pathlib import Path

EXIT_REQUEUE = 3  # exit status after a signal-triggered checkpoint
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REQUEUE_MARKER = "GPT2DIST_REQUEUE_MARKER"  # environment variable: see mark_requeue()


def mark_requeue() -> None:
    """Create the file that $GPT2DIST_REQUEUE_MARKER names, if set, on the way out with EXIT_REQUEUE: how a
    launcher that does not pass its workers' exit status on (torchrun reports any failure as 1) learns
    that they checkpointed on a signal (slurm/train_torchrun.sbatch)."""
    if path := os.environ.get(REQUEUE_MARKER):
        Path(path).touch()


class PreemptionWatch:
    """Remembers a stop signal. Ranks agree on it, so that all of them save the same step: each
    step's all-reduce (Trainer.train_step) sums every rank's `vote` and sets `stopping`."""

    def __init__(self):
        self.received: int | None = None  # the signal this process got
        self.stopping = False  # some rank got one: all are stopping
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    @property
    def vote(self) -> float:
        """1 if this rank has received a stop signal, else 0."""
        return 0.0 if self.received is None else 1.0

    @property
    def reason(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal to another rank"

    def close(self) -> None:
        """Restore the previous handlers; or, when stopping on a signal, ignore further ones.

        The process is then on its way out with EXIT_REQUEUE, and a launcher's follow-up
        SIGTERM (srun's --kill-on-bad-exit, once the first rank has exited) must not turn that
        into death by signal. SIG_IGN, unlike a Python handler, outlasts interpreter shutdown.
        """
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_IGN if self.stopping else handler)
