"""The run directory (`train.run_dir`): whether a run may use it, and marking it as a run's.

A run directory is written in place over time (config, metrics, checkpoints), so it is claimed
through gpt2dist.outputs: gpt2dist writes into one only when it is new (absent or empty), already a
gpt2dist run (its marker, or, made before markers, gpt2dist's older marker or complete checkpoints),
or the run being resumed. Anything else is someone else's files and is refused before anything is
written. The marker and the run's config are written only after every start-up check has passed, so
a refused start leaves the directory as it was, and creates neither it nor its parents.
"""

from pathlib import Path

from gpt2dist import outputs
from gpt2dist.training import checkpoint
from gpt2dist.config import ConfigError, Resume

OLD_MARKER = "gpt2dist-run.json"  # what gpt2dist marked a run directory with before gpt2dist.outputs


def older_run(run_dir: Path) -> bool:
    """A run directory an older gpt2dist made: its old marker, or a complete checkpoint of ours."""
    return (run_dir / OLD_MARKER).is_file() or checkpoint.latest_tag(run_dir) is not None


def plan(run_dir: Path, resume: Resume, inputs: list[str | Path] = ()) -> str | None:
    """The tag of the checkpoint this run resumes from, or None for a start from step 0. Raises (an
    OutputError or a ConfigError), changing nothing, for a directory this run may not write into; the
    run's `inputs` (corpora, the model it starts from) may not be it, be inside it or hold it."""
    outputs.claim_check(run_dir, "run", older_run, inputs, what=f"train.run_dir={run_dir}")
    tag = checkpoint.latest_tag(run_dir)
    if tag and resume == Resume.never:
        raise ConfigError(f"{run_dir} already holds checkpoint {tag}; pass train.resume=auto to continue "
                          "it, or choose another train.run_dir")
    return tag


def claim(run_dir: Path) -> None:
    """Create the run directory if needed and mark it as a gpt2dist run (rank 0, after the checks)."""
    outputs.claim(run_dir, "run", older_run, what=f"train.run_dir={run_dir}")
