"""Where logged metrics go: one class per backend, chosen by name in `logger.backends`.

A backend is built once, on rank 0, with the run's config, its directory, the step the run
starts from (the checkpoint's on a resume, else 0) and the run's name; it then gets each logged
step's numbers (None values already dropped) and is closed at the end. A resumed run logs again
every step after its checkpoint, so a backend that keeps history drops what an earlier attempt
logged after `resume_step`.

Adding a backend: a class below and its name in BACKENDS. Heavy imports (wandb, tensorboard)
stay inside the backend that needs them, so a run without it never pays for them.
"""

import json
import os
import uuid
from enum import Enum
from pathlib import Path

from omegaconf import OmegaConf

WANDB_INIT_TIMEOUT_S = 60  # an unreachable W&B server costs at most this once, at start-up


class WandbMode(str, Enum):
    offline = "offline"  # written under the run directory; `wandb sync` uploads later
    online = "online"
    disabled = "disabled"  # W&B's own off switch: the same as leaving wandb out of logger.backends


class Backend:
    """The interface: `log` a step's numbers, `close` at the end."""

    def __init__(self, cfg, run_dir: Path, resume_step: int, name: str):
        pass

    def log(self, step: int, values: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Console(Backend):
    """One line per logged step on stdout: `step 10/200 | loss 5.1234 | lr 6.00e-04 | ...`."""

    def __init__(self, cfg, run_dir: Path, resume_step: int, name: str):
        self.max_steps = cfg.train.max_steps

    def log(self, step: int, values: dict) -> None:
        print(f"step {step}/{self.max_steps} | " + " | ".join(_format(k, v) for k, v in values.items()), flush=True)


def _format(key: str, value) -> str:
    if isinstance(value, float):
        if key == "lr":
            return f"{key} {value:.2e}"
        if key == "mfu":
            return f"{key} {100 * value:.1f}%"
        if key in ("tokens_per_s", "tokens"):
            return f"{key} {value:,.0f}"
        return f"{key} {value:.4f}"
    if isinstance(value, int):
        return f"{key} {value:,}"
    return f"{key} {value}"


class JsonLines(Backend):
    """run_dir/metrics.jsonl: one JSON object per logged step, `{"step": 10, "loss": ...}`."""

    def __init__(self, cfg, run_dir: Path, resume_step: int, name: str):
        path = run_dir / "metrics.jsonl"
        _truncate_after(path, resume_step)
        self.file = open(path, "a")

    def log(self, step: int, values: dict) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # a line cut short by a crash


def _truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after `step` (a resumed run logs those steps again) and any line a
    crash cut short."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if (s := _step_of(line)) is not None and s <= step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


class WandB(Backend):
    """A W&B run under run_dir/wandb (mode `logger.wandb`, project `logger.wandb_project`); its id
    is kept in run_dir/wandb_id, so a resumed run continues the same W&B run."""

    def __init__(self, cfg, run_dir: Path, resume_step: int, name: str):
        self.run = None
        mode = WandbMode(cfg.logger.wandb)
        if mode == WandbMode.disabled:
            return
        import wandb

        id_file = run_dir / "wandb_id"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:8])
        init = dict(project=cfg.logger.wandb_project, name=name, id=id_file.read_text().strip(),
                    resume="allow", dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=True),
                    settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, silent=True))
        try:
            self.run = wandb.init(mode=mode.value, **init)
        except Exception as e:  # no network, no API key, a server error: never stop training for W&B
            if mode != WandbMode.online:
                raise
            print(f"warning: W&B online failed ({type(e).__name__}: {e}); logging offline instead "
                  f"(upload later with `wandb sync`)", flush=True)
            self.run = wandb.init(mode=WandbMode.offline.value, **init)
        print(f"W&B: {self.run.settings.mode} run {name!r} (id {self.run.id}) under {run_dir / 'wandb'}", flush=True)

    def log(self, step: int, values: dict) -> None:
        if self.run:
            self.run.log(values, step=step)

    def close(self) -> None:
        if self.run:
            self.run.finish()


class TensorBoard(Backend):
    """Event files under run_dir/tensorboard, one scalar per key (`tensorboard --logdir <run_dir>`).
    Each start writes a new file; a resumed run's purge step hides, in TensorBoard's readers,
    every event an earlier attempt wrote after the checkpoint, so each step shows once."""

    def __init__(self, cfg, run_dir: Path, resume_step: int, name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # as metrics.jsonl: what was logged is on disk if the run dies

    def close(self) -> None:
        self.writer.close()


BACKENDS: dict[str, type[Backend]] = {"console": Console, "jsonl": JsonLines, "wandb": WandB,
                                      "tensorboard": TensorBoard}
