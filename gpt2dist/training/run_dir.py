"""The run directory (`train.run_dir`): whether a run may use it, and marking it as a run's.

gpt2dist writes into a run directory only when it is new (absent or empty), already a
gpt2dist run (it holds the marker file, or gpt2dist checkpoints from before the marker), or
the run being resumed. Anything else is someone else's files and is refused before anything
is written. The marker and the run's config are written only after every start-up check has
passed, so a refused start leaves the directory as it was.
"""

import json
import time
from pathlib import Path

from gpt2dist.training import checkpoint
from gpt2dist.config import ConfigError, Resume

MARKER = "gpt2dist-run.json"


def plan(run_dir: Path, resume: Resume) -> str | None:
    """The tag of the checkpoint this run resumes from, or None for a start from step 0.
    Raises ConfigError, changing nothing, for a directory this run may not write into."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.run_dir={run_dir} is a file, not a directory")
    tag = checkpoint.latest_tag(run_dir)
    if tag:
        if resume == Resume.never:
            raise ConfigError(f"{run_dir} already holds checkpoint {tag}; pass train.resume=auto to continue "
                              "it, or choose another train.run_dir")
        return tag
    present = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if present and MARKER not in present:
        shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
        raise ConfigError(f"train.run_dir={run_dir} holds files gpt2dist did not write ({shown}); "
                          "choose another train.run_dir (nothing there was changed)")
    return None


def claim(run_dir: Path) -> None:
    """Create the run directory if needed and mark it as a gpt2dist run (rank 0, after the checks)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"written_by": "gpt2dist", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
