"""Checkpoints: DeepSpeed's sharded model/optimizer/scheduler state, plus ours beside it.

    <run_dir>/checkpoints/latest                 tag of the newest complete checkpoint (DeepSpeed)
    <run_dir>/checkpoints/step_00000100/         one checkpoint
        mp_rank_00_model_states.pt, ...          DeepSpeed (module, optimizer shards, scheduler)
        config.yaml                              the resolved config of the run that wrote it
        rng_rank<r>.pt                           each rank's RNG state

`train_state` (step, samples consumed) travels in DeepSpeed's client state. DeepSpeed writes
`latest` only after every file of the checkpoint is saved.
"""

from pathlib import Path

import torch
from omegaconf import OmegaConf

CHECKPOINTS = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run (names the checkpoint)."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def latest_tag(run_dir: str | Path) -> str | None:
    """Tag of the newest complete checkpoint in the run directory, or None."""
    latest = checkpoint_root(run_dir) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(engine, cfg, run_dir: str | Path, train_state: dict, rank: int) -> str:
    """Write a checkpoint of the current step on every rank; returns its tag."""
    tag = f"step_{train_state['step']:08d}"
    ckpt_dir = checkpoint_root(run_dir) / tag
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), ckpt_dir / f"rng_rank{rank}.pt")
    if rank == 0:
        OmegaConf.save(cfg, ckpt_dir / "config.yaml", resolve=True)
    torch.distributed.barrier()  # ours is written before DeepSpeed publishes `latest`
    engine.save_checkpoint(str(checkpoint_root(run_dir)), tag=tag, client_state={"train_state": train_state})
    return tag


def check_compatible(cfg, run_dir: str | Path, tag: str) -> None:
    """Refuse, naming both shapes, to load a checkpoint of another model shape."""
    saved_path = checkpoint_root(run_dir) / tag / "config.yaml"
    if not saved_path.is_file():
        raise CheckpointError(f"{saved_path}: missing; the checkpoint is incomplete")
    saved = OmegaConf.load(saved_path).model
    keys = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
    theirs = {k: saved[k] for k in keys}
    ours = {k: cfg.model[k] for k in keys}
    if theirs != ours:
        raise CheckpointError(f"{saved_path.parent}: checkpoint model {theirs} does not match this run's model {ours}")


def load(engine, cfg, run_dir: str | Path, tag: str, rank: int) -> dict:
    """Restore model, optimizer, scheduler and RNG from a checkpoint; returns its train_state."""
    check_compatible(cfg, run_dir, tag)
    path, client_state = engine.load_checkpoint(str(checkpoint_root(run_dir)), tag=tag)
    if path is None:
        raise CheckpointError(f"{checkpoint_root(run_dir) / tag}: DeepSpeed could not load this checkpoint")
    rng_path = checkpoint_root(run_dir) / tag / f"rng_rank{rank}.pt"
    if rng_path.is_file():  # absent when resuming on more ranks than saved
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return client_state["train_state"]
