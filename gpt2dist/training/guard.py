"""The loss guard: a step whose loss is NaN, infinite, or a spike is not applied.

A spike is a loss more than `zscore` standard deviations above the mean of the last `window`
applied steps (the rule llm.c uses), judged once `min_history` steps are known. Skipped steps
do not enter the window, so a run of bad batches cannot make itself look normal. The state
(the window and the run of skips) travels in checkpoints, so a resumed run decides alike.
"""

import math
from collections import deque

from gpt2dist.errors import Gpt2distError


class TrainingDiverged(Gpt2distError, RuntimeError):
    """Too many bad steps in a row: the run stops, its last checkpoint untouched."""


class LossGuard:
    def __init__(self, zscore: float, window: int, min_history: int, max_skips: int, state: dict | None = None):
        self.zscore, self.min_history, self.max_skips = zscore, min_history, max_skips
        self.history: deque[float] = deque((state or {}).get("history", []), maxlen=window)
        self.skips_in_a_row = (state or {}).get("skips_in_a_row", 0)
        self.skipped = (state or {}).get("skipped", 0)  # in the whole run

    def check(self, loss: float) -> str | None:
        """Why this step's update must be skipped, or None to apply it (then the loss is remembered)."""
        reason = None
        if not math.isfinite(loss):
            reason = f"loss {loss}"
        elif len(self.history) >= self.min_history:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
            z = (loss - mean) / std if std > 0 else 0.0
            if z > self.zscore:
                reason = f"loss {loss:.4f} is a spike (z-score {z:.1f} over the last {len(self.history)} steps)"
        if reason is None:
            self.history.append(loss)
            self.skips_in_a_row = 0
        else:
            self.skipped += 1
            self.skips_in_a_row += 1
        return reason

    def exhausted(self) -> bool:
        return self.skips_in_a_row > self.max_skips

    def state_dict(self) -> dict:
        return {"history": list(self.history), "skips_in_a_row": self.skips_in_a_row, "skipped": self.skipped}
