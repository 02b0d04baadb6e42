"""Checkpoints: DeepSpeed's sharded model/optimizer/scheduler state, plus ours beside it.

    <run_dir>/checkpoints/step_00000100/         one complete checkpoint
        mp_rank_00_model_states.pt, ...          DeepSpeed (module, optimizer shards, scheduler)
        config.yaml                              the resolved config of the run that wrote it
        rng_rank<r>.pt                           each rank's RNG state
        checkpoint.json                          written last: train state, world size, ZeRO
                                                 stage, and the size and SHA-256 of every file
        universal/                               DeepSpeed's universal form of it, made (once) when
                                                 a run resumes it on another number of ranks
    <run_dir>/checkpoints/latest                 the newest tag, for DeepSpeed's own tools

A checkpoint is written under `.partial-<tag>` and renamed to `<tag>` only when every rank's
files and the manifest are on disk, so a crash (or kill -9, or a full disk) during a save
leaves the previous checkpoints as they were. Resuming takes the newest directory that has a
manifest; pruning (`train.keep_last`) happens only after the new checkpoint is published.

ZeRO 1-3 shard the optimizer state by rank, so a checkpoint loads as saved only on as many ranks
as wrote it. On another number, its universal form (one file per parameter and state, whatever
the ranks: DeepSpeed's `ds_to_universal`) is loaded instead; it is written beside the original's
files, under a partial name renamed when complete, and the original's files are never changed.

With train.async_checkpoint (Checkpointer), training waits only for a snapshot of the state in CPU
memory; a thread writes, fsyncs and publishes it as above. DeepSpeed 0.19's own engines do not fit:
its FastCheckpointEngine is a faster synchronous writer, and its DecoupledCheckpointEngine hands each
state to a spawned process without a copy (the ZeRO optimizer files' tensors are the live ones, which
the next step changes), and fsyncs nothing.
"""

import argparse
import copy
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gpt2dist.errors import Gpt2distError
from gpt2dist import safe_load
from gpt2dist.training import deepspeed_env
from gpt2dist.training import engine as ds_engine
from gpt2dist.config import gpt_config
from gpt2dist.fileio import fsync_dir, sha256_of
from gpt2dist.data.shards import MANIFEST as CORPUS_MANIFEST
from gpt2dist.data.tokenizer import TOKENIZER
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # after ds_engine: loaded

CHECKPOINTS = "checkpoints"
MANIFEST = "checkpoint.json"
PARTIAL = ".partial-"
PRUNED = ".pruned-"  # a checkpoint being deleted: renamed out of view first, so a crash leaves no half of it
UNIVERSAL = "universal"


class CheckpointError(Gpt2distError, RuntimeError):
    """A checkpoint that cannot be written or used for this run (names the checkpoint)."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def complete_tags(root: Path) -> list[str]:
    """Tags of the published checkpoints under a checkpoints/ directory, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.glob("step_*") if (p / MANIFEST).is_file())


def tag_of(step: int) -> str:
    """The name of the checkpoint of a step."""
    return f"step_{step:08d}"


def latest_tag(run_dir: str | Path) -> str | None:
    """Tag of the newest complete checkpoint in the run directory, or None."""
    tags = complete_tags(checkpoint_root(run_dir))
    return tags[-1] if tags else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _all_ok(ok: bool, device: torch.device, group=None) -> bool:
    """True on every rank if it is true on every rank (a collective call, over `group`: the default one)."""
    flag = torch.tensor([1 if ok else 0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(flag.item())


# Test-only hook (tests/test_faults.py, tests/test_train.py): `<tag>` or `<tag>:<seconds>`, a checkpoint whose
# background write stops after its first file, for an hour or those seconds, so that a test can kill -9 the
# run in the middle of it, or see that a stop waits for it. Never set it outside the tests.
STALL_WRITE = "GPT2DIST_TEST_STALL_CHECKPOINT_WRITE"


# The writer thread's niceness: training's threads come first. At its default (0) on a 2-core CPU it took
# a core from training's two OpenMP threads, and the steps during a write ran 2-6x slower, which gave back
# most of the stall saved (benchmarks/checkpoint_stall.py); at 10 they run at their usual speed, and the
# write takes longer, well within any usual checkpoint interval.
WRITER_NICENESS = 10


def _snapshot(item, memo: dict | None = None):
    """A copy of a state to save that training can no longer change: every tensor cloned to CPU memory
    (compact, as DeepSpeed's clone_tensors_for_torch_save clones them for its own saves; two views of the
    same elements, such as tied weights, stay one tensor), containers rebuilt, anything else (a loss
    scaler, numbers) deep-copied."""
    memo = {} if memo is None else memo
    if torch.is_tensor(item):
        # Empty storages (ZeRO-3's placeholders) all start at address 0: nothing to share there.
        view = (item.untyped_storage().data_ptr(), item.storage_offset(), item.shape, item.stride(), item.dtype)
        if view[0] == 0 or view not in memo:
            memo[view] = item.detach().clone() if item.device.type == "cpu" else item.detach().to("cpu")
        return memo[view]
    if isinstance(item, dict):
        copied = copy.copy(item)  # the same type (OrderedDict, defaultdict and its factory)
        for key, value in item.items():
            copied[key] = _snapshot(value, memo)
        return copied
    if isinstance(item, list):
        return [_snapshot(v, memo) for v in item]
    if isinstance(item, tuple) and any(torch.is_tensor(v) or isinstance(v, dict | list | tuple) for v in item):
        return tuple(_snapshot(v, memo) for v in item)
    return copy.deepcopy(item)


def _write(state, path: str | Path) -> None:
    """torch.save, then fsync: the file is on disk before the manifest that vouches for it."""
    torch.save(state, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Files(TorchCheckpointEngine):
    """DeepSpeed's checkpoint engine for our saves (it writes every file DeepSpeed's save_checkpoint
    makes). Synchronous: each file is written and fsynced as DeepSpeed hands it over. In the background
    (train.async_checkpoint): each state is snapshot to CPU memory (_snapshot) and kept in `staged` for
    the writer thread; training changes the live tensors again as soon as save_checkpoint returns."""

    def __init__(self, background: bool):
        with deepspeed_env.quiet():  # its "Initialized" line
            super().__init__(None)
        self.background = background
        self.staged: list[tuple[object, str]] = []

    def save(self, state_dict, path: str) -> None:
        if self.background:
            self.staged.append((_snapshot(state_dict), path))
        else:
            _write(state_dict, path)

    def preserves_storage_sharing(self) -> bool:
        # Whether DeepSpeed clones a state before handing it over: in the background _snapshot clones
        # every tensor anyway (DeepSpeed clones only some), so not twice.
        return not self.background


class Checkpointer:
    """Writes and publishes the checkpoints of a run (every rank has one; its calls are collective).

    Synchronous, `save` returns once the checkpoint is published. In the background, `save` returns once
    this rank's state is snapshot to CPU memory; a thread then writes and fsyncs the files, the ranks
    agree that all were written (over a gloo group of their own, so the thread's collectives never
    interleave with training's), and rank 0 publishes it as a synchronous save does. A save, and `wait`,
    first wait for the previous write; its error, if any, is raised then (`failed` says so earlier)."""

    def __init__(self, engine, background: bool):
        self.engine = engine
        self.files = _Files(background)
        engine.checkpoint_engine = self.files  # loading goes through it too: TorchCheckpointEngine's load
        self.background = background
        self.group = torch.distributed.new_group(backend="gloo") if background else None
        self.thread: threading.Thread | None = None
        self.error: str | None = None
        self.waited_s = 0.0  # how long the last save waited for the write before it

    @property
    def failed(self) -> bool:
        """Whether the last background write has ended in an error that `wait` has not raised yet."""
        return self.error is not None and not (self.thread and self.thread.is_alive())

    def wait(self) -> None:
        """Wait for the background write, if one is under way; raise its error, if it failed."""
        if self.thread:
            self.thread.join()
            self.thread = None
        if self.error:
            error, self.error = self.error, None
            raise CheckpointError(error)

    def save(self, cfg, run_dir: str | Path, train_state: dict, rank: int, world_size: int, keep_last: int = 0,
             keep: str | None = None) -> str:
        """Checkpoint the current step (see the class); returns its tag. Frozen weights (the base of adapters)
        are left out. `keep`: a tag that keep_last never prunes (the best)."""
        start = time.perf_counter()
        self.wait()
        self.waited_s = time.perf_counter() - start
        root = checkpoint_root(run_dir)
        tag = tag_of(train_state["step"])
        partial = root / f"{PARTIAL}{tag}"
        train_state = copy.deepcopy(train_state)  # the loop's own dicts change on
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left by an earlier crash
            for doomed in root.glob(f"{PRUNED}*"):  # deletions an earlier crash cut short
                shutil.rmtree(doomed, ignore_errors=True)
            partial.mkdir(parents=True)
        torch.distributed.barrier()
        # Ranks agree after each part: a rank that failed alone must not leave the others waiting in
        # DeepSpeed's collectives.
        self.files.staged = []
        for write in (lambda: self.files.save(_rng_state(), str(partial / f"rng_rank{rank}.pt")),
                      lambda: self.engine.save_checkpoint(str(root), tag=partial.name,
                                                          client_state={"train_state": train_state},
                                                          save_latest=False, exclude_frozen_parameters=True)):
            error = None
            try:
                write()
            except (OSError, RuntimeError) as e:  # a full disk, mostly (torch.save reports it as a RuntimeError)
                error = e
            if not _all_ok(error is None, self.engine.device):
                self.files.staged = []
                if rank == 0:
                    shutil.rmtree(partial, ignore_errors=True)
                raise CheckpointError(f"{partial}: saving the checkpoint failed ({error or 'on another rank'}); "
                                      f"the previous checkpoints are untouched")
        args = (self.files.staged, cfg, root, tag, partial, train_state, rank, world_size, keep_last, keep)
        self.files.staged = []
        if self.background:
            self.thread = threading.Thread(target=self._finish, args=args, name=f"checkpoint {tag}")
            self.thread.start()
        else:
            self._publish_when_written(*args)
            self.wait()
        return tag

    def _finish(self, *args) -> None:
        """The background thread: _publish_when_written, any error kept in self.error for the main thread."""
        if sys.platform == "linux":  # a thread's own niceness (elsewhere this call would renice the process)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
        try:
            self._publish_when_written(*args)
        except Exception as e:  # a collective whose peer died, or anything else the writer met
            self.error = f"{args[4]}: saving the checkpoint failed ({type(e).__name__}: {e})"

    def _publish_when_written(self, staged: list, cfg, root: Path, tag: str, partial: Path, train_state: dict,
                              rank: int, world_size: int, keep_last: int, keep: str | None) -> None:
        """Write the staged files (in the background: synchronous saves wrote them already), agree that every
        rank did, publish, prune; a failure is kept in self.error, for `wait`."""
        device = torch.device("cpu") if self.group else self.engine.device
        start = time.perf_counter()
        error = None
        try:
            for i, (state, path) in enumerate(staged):
                _write(state, path)
                staged[i] = None  # its memory goes back as soon as it is on disk
                stall, _, seconds = os.environ.get(STALL_WRITE, "").partition(":")
                if i == 0 and stall == tag:
                    time.sleep(float(seconds or 3600))
        except (OSError, RuntimeError) as e:  # a full disk, mostly (torch.save reports it as a RuntimeError)
            error = e
        if not _all_ok(error is None, device, self.group):
            if rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            self.error = (f"{partial}: saving the checkpoint failed ({error or 'on another rank'}); "
                          f"the previous checkpoints are untouched")
            return
        if rank == 0:
            try:
                _publish(cfg, root, tag, partial, train_state, world_size)
            except OSError as e:
                shutil.rmtree(partial, ignore_errors=True)
                error = e
        if not _all_ok(error is None, device, self.group):
            self.error = (f"{partial}: publishing the checkpoint failed ({error or 'on rank 0'}); "
                          f"the previous checkpoints are untouched")
            return
        if rank == 0 and keep_last > 0:
            for old in complete_tags(root)[:-keep_last]:
                if old != keep:
                    _delete(root, old)
        if rank == 0 and keep:
            _write_pointer(root, "best", keep)
        torch.distributed.barrier(group=self.group)
        if rank == 0 and self.group:
            print(f"saved checkpoint {root / tag} (written in the background in {time.perf_counter() - start:.1f} s)",
                  flush=True)

    def close(self) -> None:
        """Let a background write finish (a run that stops on an error keeps its last checkpoint); its own
        error, if any, is printed: the run is already failing with another."""
        try:
            self.wait()
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)


def _delete(root: Path, tag: str) -> None:
    """Delete checkpoint `tag` in one step as far as resuming sees it: rename, then remove."""
    doomed = root / f"{PRUNED}{tag}"
    os.replace(root / tag, doomed)
    shutil.rmtree(doomed)


def _publish(cfg, root: Path, tag: str, partial: Path, train_state: dict, world_size: int) -> None:
    """Rank 0: manifest last, then one rename makes the checkpoint visible."""
    OmegaConf.save(cfg, partial / "config.yaml", resolve=True)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)} for p in sorted(partial.iterdir())}
    manifest = {"train_state": train_state, "world_size": world_size, "zero_stage": cfg.zero.stage,
                "tokenizer": TOKENIZER, "files": files}
    with open(partial / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(partial)
    final = root / tag
    if final.exists():  # the same step saved again (a resumed run reaching it once more)
        _delete(root, tag)
    os.replace(partial, final)
    _write_pointer(root, "latest", tag)


def _write_pointer(root: Path, name: str, tag: str) -> None:
    """checkpoints/<name> (latest, best): a file holding a tag, replaced atomically."""
    tmp = root / f"{name}.tmp"
    tmp.write_text(tag)
    os.replace(tmp, root / name)
    fsync_dir(root)


def read_manifest(ckpt_dir: Path) -> dict:
    try:
        return json.loads((ckpt_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt_dir / MANIFEST}: unreadable ({e})") from None


def verify(ckpt_dir: Path) -> dict:
    """Check every file of a checkpoint against its manifest, and that its torch files hold no code; returns
    the manifest."""
    manifest = read_manifest(ckpt_dir)
    for name, expected in manifest["files"].items():
        path = ckpt_dir / name
        if not path.is_file() or path.stat().st_size != expected["bytes"] or sha256_of(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: missing or corrupt (size or SHA-256 differs from {MANIFEST}); "
                                  f"remove {ckpt_dir} to resume from the checkpoint before it")
        if path.suffix == ".pt":
            safe_load.check(path, CheckpointError)
    return manifest


def check_compatible(cfg, ckpt_dir: Path, world_size: int, init_optimizer: bool = False) -> dict:
    """Refuse, before any work, a checkpoint this run cannot continue (or, with init_optimizer, take
    the optimizer state of); returns its manifest."""
    manifest = verify(ckpt_dir)
    saved = OmegaConf.load(ckpt_dir / "config.yaml").model
    # The padding too: it sets the layout of the flat optimizer state.
    theirs, ours = ({**c.shape(), "pad_vocab_multiple": c.pad_vocab_multiple}
                    for c in (gpt_config(saved), gpt_config(cfg.model)))
    # Resuming takes precedence over init_from in the same run directory: a run with another
    # shape or layout starts in a new one, from this checkpoint's weights.
    fresh = f"train.run_dir=<a new directory> train.init_from={ckpt_dir}"
    if theirs != ours:
        raise CheckpointError(f"{ckpt_dir}: checkpoint model {theirs} does not match this run's model {ours}; "
                              f"resume with the same model, or start another run from these weights with {fresh}")
    saved_peft = OmegaConf.load(ckpt_dir / "config.yaml").get("peft", {"method": "none"})
    theirs_peft, ours_peft = (OmegaConf.to_container(p, resolve=True) if p.method != "none" else {"method": "none"}
                              for p in (OmegaConf.create(saved_peft), cfg.peft))
    if json.dumps(theirs_peft, default=str) != json.dumps(ours_peft, default=str):
        raise CheckpointError(f"{ckpt_dir}: checkpoint trained peft={theirs_peft}, this run asks for peft={ours_peft}; "
                              f"resume with the same adapters, or start another run in a new train.run_dir")
    saved_optimizer = OmegaConf.load(ckpt_dir / "config.yaml").optim.get("name", "adamw")  # before Lion: AdamW
    if saved_optimizer != cfg.optim.name:
        raise CheckpointError(f"{ckpt_dir}: its optimizer state is {saved_optimizer}'s, this run's optimizer is "
                              f"optim.name={cfg.optim.name}; use optim={saved_optimizer}, or start another run from its "
                              f"weights with {fresh}")
    if manifest["tokenizer"] != TOKENIZER:
        raise CheckpointError(f"{ckpt_dir}: checkpoint tokenizer {manifest['tokenizer']!r} is not this run's "
                              f"{TOKENIZER!r}")
    stage, ranks = manifest["zero_stage"], manifest["world_size"]
    # Resuming on another number of ranks, or from ZeRO 1 to 2 or back, goes through the universal form (see
    # needs_universal); taking the optimizer state into a new run does not. DeepSpeed's ZeRO-3 loader reads
    # its own files only (zero_pp_rank_*_model_states.pt), and stage 0 has no sharded state to convert.
    restage = stage != cfg.zero.stage
    if (restage and (init_optimizer or not {stage, cfg.zero.stage} <= {1, 2})) or \
            (init_optimizer and stage > 0 and ranks != world_size):
        same = f"zero.stage={stage}" + (f" on {ranks} ranks" if init_optimizer and stage > 0 else "")
        remedy = (f"run with {same}, or without train.init_optimizer (fresh optimizer state)" if init_optimizer else
                  f"resume with {same}, or start another run from its weights (fresh optimizer state) with {fresh}")
        raise CheckpointError(
            f"{ckpt_dir}: written by {ranks} ranks at ZeRO stage {stage}; this run has {world_size} ranks at "
            f"ZeRO stage {cfg.zero.stage}. DeepSpeed cannot reshard that optimizer state: {remedy}")
    if saved_optimizer == "muon" and needs_universal(manifest, world_size, cfg.zero.stage):
        raise CheckpointError(
            f"{ckpt_dir}: written by {ranks} ranks at ZeRO stage {stage}; this run has {world_size} ranks at ZeRO "
            f"stage {cfg.zero.stage}. DeepSpeed's universal form, which reshards optimizer state, carries AdamW's "
            f"moments but not Muon's momentum: resume on {ranks} ranks with zero.stage={stage}, or start another run "
            f"from its weights with {fresh}")
    return manifest


def data_signature(sources: list[tuple[str, Path, float]], seq_len: int, seed: int,
                   stream: dict | None = None) -> dict:
    """What decides the training data stream: each source's name, weight and corpus (by the
    SHA-256 of its manifest, which holds every shard's: a moved corpus is the same corpus),
    the window length, the seed, and in stream mode what orders the stream (`stream`: lanes and
    micro-batch size). Saved with each checkpoint's train state."""
    signature = {"seq_len": seq_len, "seed": seed,
                 "sources": [{"name": name, "weight": weight, "corpus": sha256_of(Path(path) / CORPUS_MANIFEST)}
                             for name, path, weight in sources]}
    return {**signature, "stream": stream} if stream else signature


def check_same_data(ckpt_dir: Path, data: dict) -> None:
    """Refuse to resume a checkpoint over other data than it was trained on: the sample count it
    saved would point into another stream. Checkpoints from before the signature pass."""
    saved = read_manifest(ckpt_dir)["train_state"].get("data")
    if saved is None or saved == data:
        return
    changed = [k for k in ("seq_len", "seed", "stream") if saved.get(k) != data.get(k)]
    if saved["sources"] != data["sources"]:
        changed.append("sources (names, weights or corpora)")
    raise CheckpointError(
        f"{ckpt_dir}: this run's data differs from the checkpoint's in {', '.join(changed)}; resume with the same "
        f"data, start another run from its weights with train.run_dir=<a new directory> train.init_from={ckpt_dir}, "
        "or pass train.allow_data_change=true to continue this run on the new data")


def needs_universal(manifest: dict, world_size: int, stage: int) -> bool:
    """Whether resuming this checkpoint on `world_size` ranks at ZeRO `stage` needs its universal form:
    its optimizer state is sharded (ZeRO 1-3) over another number of ranks, or by another stage (1 or 2,
    see check_compatible)."""
    return manifest["zero_stage"] > 0 and (manifest["world_size"] != world_size or manifest["zero_stage"] != stage)


def make_universal(ckpt_dir: Path, rank: int) -> float | None:
    """Write the universal form of a ZeRO checkpoint into `<ckpt_dir>/universal`, unless it is there
    already (a collective call: rank 0 converts, the others wait, up to dist.timeout_s); returns the
    seconds it took, or None when it was there."""
    target, partial = ckpt_dir / UNIVERSAL, ckpt_dir / f"{UNIVERSAL}.partial"
    outcome = [None, None]  # seconds, error: rank 0's, for every rank
    if rank == 0 and not target.is_dir():
        start = time.perf_counter()
        shutil.rmtree(partial, ignore_errors=True)  # left by an earlier crash
        try:
            _convert(ckpt_dir, partial)
            fsync_dir(partial)
            os.replace(partial, target)
            fsync_dir(ckpt_dir)
            outcome[0] = time.perf_counter() - start
        except Exception as e:  # DeepSpeed's converter raises what it meets: assertions, KeyError, OSError
            shutil.rmtree(partial, ignore_errors=True)
            outcome[1] = f"{ckpt_dir}: converting it to DeepSpeed's universal form failed ({type(e).__name__}: {e})"
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[1]:
        raise CheckpointError(outcome[1])
    return outcome[0]


def _convert(ckpt_dir: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal, in this process, reading every file with weights_only (as load does).
    It writes the universal checkpoint to out/<tag> and a `latest_universal` file naming it to out."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(ckpt_dir), output_folder=str(out / ckpt_dir.name),
                              # One worker: no process pool (each would import torch again) for a job of seconds.
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # Our checkpoints lack the tensor-parallel layout info it asks for; with no tensor
                              # parallelism there is none to give.
                              inject_missing_state=True)
    with safe_load.only_weights(CheckpointError), deepspeed_env.quiet():  # its progress bars
        ds_to_universal.main(args)


def _repair_universal_load(engine, universal_dir: Path) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal load (0.19.8), harmless at stages 1-2. It gives
    every param group the first one's hyperparameters (biases and LayerNorms would take weight decay):
    each gets its own saved ones back. And it gives every group one shared step-count tensor, which
    Adam increments in place once per group and step: each gets its own copy."""
    saved = safe_load.load(universal_dir / "zero" / "optimizer_state.pt", CheckpointError)["param_groups"]
    for group, values in zip(engine.optimizer.param_groups, saved, strict=True):
        group.update({k: v for k, v in values.items() if k != "params"})
    for state in ds_engine.torch_optimizer(engine).state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def check_same_base(ckpt_dir: Path, base: dict) -> None:
    """Refuse to resume adapters on another frozen base than the one they were trained on."""
    saved = read_manifest(ckpt_dir)["train_state"].get("base")
    if saved is None or saved["sha256"] != base["sha256"]:
        raise CheckpointError(f"{ckpt_dir}: its adapters were trained on {saved['path'] if saved else 'no base'} "
                              f"(SHA-256 {saved['sha256'][:12] if saved else '-'}), but train.init_from={base['path']} "
                              f"has SHA-256 {base['sha256'][:12]}: resume on the same base weights")


def load(engine, run_dir: str | Path, tag: str, rank: int, universal: bool = False,
         adapters_only: bool = False) -> dict:
    """Restore model, optimizer, scheduler and RNG from a checkpoint that `check_compatible`
    accepted (with `universal`, from the form `make_universal` wrote); returns its train_state.
    `adapters_only`: the checkpoint holds the trainable weights only, the frozen ones are already
    in the engine."""
    ckpt_dir = checkpoint_root(run_dir) / tag
    load_dir = ckpt_dir / UNIVERSAL if universal else checkpoint_root(run_dir)
    # quiet: the universal load warns that there is no tensor parallelism (MPU), which is so.
    with safe_load.only_weights(CheckpointError), deepspeed_env.quiet():
        path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=not adapters_only)
    if path is None:
        raise CheckpointError(f"{ckpt_dir}: DeepSpeed could not load this checkpoint")
    if universal:
        _repair_universal_load(engine, load_dir / tag)
    rng_path = ckpt_dir / f"rng_rank{rank}.pt"
    if rng_path.is_file():  # absent when resuming on more ranks than saved
        rng = safe_load.load(rng_path, CheckpointError)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return client_state["train_state"]


def load_optimizer(engine, cfg, ckpt_dir: Path, world_size: int, adapters_only: bool = False) -> None:
    """Take a checkpoint's optimizer state (AdamW moments and step counts) into a new run
    (`train.init_optimizer`); the new run keeps its own learning rate, schedule and hyperparameters.
    `adapters_only`: as in `load`."""
    check_compatible(cfg, ckpt_dir, world_size, init_optimizer=True)
    # Loading an optimizer state also restores its param groups, whose lr is where the old schedule
    # ended; this run's values go back on afterwards, so its first step already follows its schedule.
    ours = [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]
    with safe_load.only_weights(CheckpointError):
        path, _ = engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=False, load_module_only=False,
                                         load_module_strict=not adapters_only)
    if path is None:
        raise CheckpointError(f"{ckpt_dir}: DeepSpeed could not load this checkpoint")
    for group, values in zip(engine.optimizer.param_groups, ours):
        group.update(values)
