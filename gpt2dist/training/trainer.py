"""The training loop: build everything from the config, then step, log, evaluate, checkpoint."""

import contextlib
import json
import math
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

from gpt2dist.training import checkpoint
from gpt2dist.training import dist
from gpt2dist.training import malloc
from gpt2dist.training import engine as ds_engine
from gpt2dist.training import run_dir
from gpt2dist.data.builtin_corpus import source_corpus
from gpt2dist.config import (KEEP_BEST, ConfigError, DataMode, Precision, Resume, Task, check, command_line_keys,
                             data_mode, data_sources, fit_schedule, gpt_config, grad_accum_steps, lower_default,
                             tokens_per_step)
from gpt2dist.data.loader import open_split
from gpt2dist.models import adapters
from gpt2dist.models.adapters import PeftMethod
from gpt2dist.evals import classify as classify_eval, generation as sft_eval
from gpt2dist.training.engine import check_precision
from gpt2dist.evals.downstream import run_evals
from gpt2dist.models.sampling import generate
from gpt2dist.training.guard import LossGuard, TrainingDiverged
from gpt2dist.data.loader import DevicePrefetch, SampleStream, train_loader, train_windows
from gpt2dist.training.metrics import Metrics, device_peak_flops, flops_per_token, mfu, peak_gpu_memory_gib
from gpt2dist.models.gpt import GPT
from gpt2dist.models.prune import fixed_masks, keep_masks
from gpt2dist.training.preemption import EXIT_REQUEUE, PreemptionWatch, mark_requeue
from gpt2dist.data.shards import CorpusError, check_tokenizer, corpus_task, read_manifest, require_kind
from gpt2dist.data.stream import Rounds, ShardStore, ShardUnavailable, error_line, stream_loader
from gpt2dist.data.tokenizer import get_tokenizer
from gpt2dist.errors import say
from gpt2dist.evals.loss import fitting_sequences, mean_loss, rank_batches, validation_sets
from gpt2dist.models.weights import Adapter, attach, check_base, find_adapter, find_checkpoint, load_into


def run_name(run_dir: Path) -> str:
    """The run's name in W&B: its directory's; in a sweep (-m), the sweep directory's and the
    values this job was given for the swept keys, e.g. `lr-sweep: optim.lr=0.001`."""
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return run_dir.name
    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(hydra_cfg.sweep.dir)
    # The basic sweeper saved the command line's overrides, sweeps (a,b,c) unexpanded, in multirun.yaml
    # (the Optuna sweeper does not: its jobs are named by number).
    multirun = sweep_dir / "multirun.yaml"
    given = OmegaConf.load(multirun).hydra.overrides.task if multirun.is_file() else []
    swept = {o.key_or_group for o in OverridesParser.create().parse_overrides(list(given)) if o.is_sweep_override()}
    mine = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]
    return f"{sweep_dir.name}: {', '.join(mine) or f'job {hydra_cfg.job.num}'}"


def run_directory(cfg) -> Path:
    """train.run_dir; in a Hydra sweep (-m), each job's own <train.run_dir>/<job number>."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.train.run_dir = HydraConfig.get().runtime.output_dir  # saved configs say where it ran
    return Path(cfg.train.run_dir).resolve()


@dataclass
class StepResult:
    loss: float  # mean over all ranks and micro-batches
    lr: float  # the learning rate this step's update used
    grad_norm: torch.Tensor | float | None  # before clipping
    skipped: str | None  # why the loss guard skipped the update, or None


class Trainer:
    """Everything a run needs, built from the config in `_build`; `train()` runs it.

    Nothing is written to the run directory until every check has passed (config, data, model,
    checkpoint), so a refused start leaves a previous run's files as they were.

    `given`: the config keys the user set (`gpt2dist.config.given_keys`), whose values are never lowered to
    fit; None: those of the Hydra job's command line (outside one, every key).
    """

    def __init__(self, cfg, given: Collection[str] | None = None):
        self.cfg = cfg
        self.given = command_line_keys() if given is None else frozenset(given)
        self.metrics = self.preemption = self.checkpointer = None
        self.stores = {}  # data.mode=stream: each source's shard store (_find_sources)
        notes = check(cfg, dist.detect().world_size, self.given)  # before joining the process group (dist.timeout_s)
        if cfg.train.retain_freed_memory:
            malloc.retain_freed_memory()  # before the large tensors are first allocated
        self.env = dist.init(cfg.dist.timeout_s)
        self.is_main = self.env.is_main
        for note in notes:
            self.print(note)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        cfg = self.cfg
        check_precision(Precision(cfg.train.precision))
        self.grad_accum = grad_accum_steps(cfg, self.env.world_size)
        self._find_sources()
        if cfg.task.name == Task.classify:
            self._take_labels()  # before a checkpoint is checked: they are part of the model's shape
        tag = self._run_directory()
        self._build_data(tag)
        self.universal = self._universal(tag)
        self._build_model(tag)
        guard_state = self._restore(tag)
        g = cfg.guard
        self.guard = LossGuard(g.zscore, g.window, g.min_history, g.max_skips, guard_state) if g.enabled else None
        self._build_batches()
        self._start_logging()
        self.flops_per_token = flops_per_token(self.n_params, cfg.model.n_layer, cfg.model.n_embd, cfg.data.seq_len)
        self.peak_flops = self._peak_flops() if self.is_main else None  # only rank 0 logs mfu
        self.preemption = PreemptionWatch()
        if cfg.train.init_from and not tag:
            self.start_losses = self._losses(self._val_scores())
            if self.metrics:
                self.metrics.log(0, self._val_metrics(self.start_losses))

    def _peak_flops(self) -> float | None:
        """What mfu is measured against (metrics.device_peak_flops); a CPU's, measured now, is printed."""
        peak = device_peak_flops(self.cfg.logger.peak_tflops, self.cfg.train.precision)
        if peak and not self.cfg.logger.peak_tflops and not torch.cuda.is_available():
            self.print(f"mfu: against this CPU's {self.cfg.train.precision.value} torch.mm peak, measured now: "
                       f"{peak / 1e9:,.1f} GFLOP/s (logger.peak_tflops sets it instead)")
        return peak

    def _run_directory(self) -> str | None:
        """Resolve train.run_dir (the same on every rank) and decide, writing nothing, whether this
        run resumes from one of its checkpoints (the tag) or starts at step 0 (None)."""
        self.run_dir = run_directory(self.cfg)
        run_dirs = [None] * self.env.world_size
        torch.distributed.all_gather_object(run_dirs, str(self.run_dir))
        other = next((r for r, d in enumerate(run_dirs) if d != run_dirs[0]), None)
        if other is not None:
            raise ConfigError(f"train.run_dir differs between ranks ({run_dirs[0]} on rank 0, {run_dirs[other]} on "
                              f"rank {other}): every rank must resolve the same directory")
        self.print(f"launcher {self.env.launcher}: rank {self.env.rank} of {self.env.world_size}, run dir {self.run_dir}")
        read = [path for _, path, _ in self.sources] + ([self.cfg.train.init_from] if self.cfg.train.init_from else [])
        tag = run_dir.plan(self.run_dir, Resume(self.cfg.train.resume), read)
        if tag:
            self.manifest = checkpoint.check_compatible(self.cfg, self._checkpoint_dir(tag), self.env.world_size)
        return tag

    def _universal(self, tag: str | None) -> bool:
        """Whether the checkpoint resumed is loaded in its universal form (ZeRO state sharded over another
        number of ranks, or by another stage); makes that form, once, after every check on the checkpoint
        has passed."""
        if not tag:
            return False
        saved, stage = self.manifest["zero_stage"], self.cfg.zero.stage
        if not checkpoint.needs_universal(self.manifest, self.env.world_size, stage):
            return False
        ckpt_dir = self._checkpoint_dir(tag)
        seconds = checkpoint.make_universal(ckpt_dir, self.env.rank)
        made = "converted earlier" if seconds is None else f"converted in {seconds:.1f} s"
        at = (f" at ZeRO stage {saved}", f" at ZeRO stage {stage}") if saved != stage else ("", "")
        self.print(f"elastic resume: {ckpt_dir} was saved by {self.manifest['world_size']} ranks{at[0]}, this run has "
                   f"{self.env.world_size}{at[1]}: loading its universal form ({made}), {ckpt_dir / checkpoint.UNIVERSAL}")
        return True

    def _take_labels(self) -> None:
        """task=classify: model.labels, the classes of the score head, are the corpus's (every source's the same).
        A corpus of another kind is left to _build_data to refuse."""
        cfg = self.cfg
        sets = {tuple(self.manifests[name].get("labels", ())) for name, _, _ in self.sources}
        if len(sets) > 1:
            raise CorpusError(f"data.sources: their label sets differ ({' vs '.join(map(str, sorted(sets)))})")
        (labels,) = sets
        if cfg.model.labels and tuple(cfg.model.labels) != labels:
            raise ConfigError(f"model.labels={list(cfg.model.labels)} differ from the corpus's labels {list(labels)}: "
                              "leave model.labels out, task=classify takes them from the corpus")
        cfg.model.labels = list(labels)

    def _checkpoint_dir(self, tag: str) -> Path:
        return checkpoint.checkpoint_root(self.run_dir) / tag

    def _find_sources(self) -> None:
        """The training sources, each (name, its local corpus, its weight); the first one's validation split
        is val_loss. In stream mode, each source's shard store too."""
        cfg = self.cfg
        self.mode = data_mode(cfg)
        self.stores = {s.name: self._store(s) for s in data_sources(cfg)} if self.mode == DataMode.stream else {}
        self.sources = [(s.name, self._corpus(s), s.weight) for s in data_sources(cfg)]
        self.manifests = {name: read_manifest(path) for name, path, _ in self.sources}  # checked, before any use

    def _build_data(self, tag: str | None) -> None:
        """The sources' training data. A resumed run must read the same data as the checkpoint's (or say
        train.allow_data_change)."""
        cfg = self.cfg
        stream = {"lanes": cfg.data.stream.lanes, "micro_batch": cfg.train.micro_batch_size} if self.stores else None
        if any(store.pattern for store in self.stores.values()):  # the manifest alone does not say which shards
            stream["shards"] = {name: store.pattern for name, store in self.stores.items()}
        self.data = checkpoint.data_signature(self.sources, cfg.data.seq_len, cfg.train.seed, stream)
        if tag and not cfg.train.allow_data_change:
            checkpoint.check_same_data(self._checkpoint_dir(tag), self.data)
        if self.stores:  # the training shards are read as they stream by, not opened here
            for name, path, _ in self.sources:
                check_tokenizer(self.manifests[name], path, cfg.model.vocab_size)
                if cfg.data.seq_len > self.manifests[name]["block_tokens"]:
                    raise CorpusError(f"{self.stores[name].location}: data.seq_len={cfg.data.seq_len} is longer than "
                                      f"the corpus blocks ({self.manifests[name]['block_tokens']} tokens)")
            self.stream = Rounds([weight for *_, weight in self.sources], cfg.train.seed, cfg.data.stream.lanes,
                                 cfg.train.micro_batch_size)
            return
        self.train_windows = {name: train_windows(path, cfg.data.seq_len, weight)
                              for name, path, weight in self.sources}
        task = Task(cfg.task.name)
        for name, path, _ in self.sources:
            manifest = self.train_windows[name].blocks.manifest
            check_tokenizer(manifest, path, cfg.model.vocab_size)
            require_kind(manifest, path, (task.value,),
                         f"data for task={task.value}: use task={corpus_task(manifest)}")
        t = cfg.train
        if t.epochs:
            samples = sum(len(w) for (_, _, weight), w in zip(self.sources, self.train_windows.values()) if weight > 0)
            t.max_steps = math.ceil(t.epochs * samples / t.global_batch_size)
            self.print(f"train.epochs={t.epochs}: {samples:,} training samples, {t.max_steps} steps")
            for note in fit_schedule(cfg, self.given):
                self.print(note)
        self.stream = SampleStream([len(w) for w in self.train_windows.values()], [w for *_, w in self.sources],
                                   cfg.train.seed)

    def _build_model(self, tag: str | None) -> None:
        cfg = self.cfg
        # TF32 changes fp32 matmuls only (train.precision=fp32); bf16 and fp16 runs are unaffected.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = GPT(gpt_config(cfg.model))
        model.gradient_checkpointing = cfg.train.gradient_checkpointing
        model.loss_chunk = cfg.train.loss_chunk
        self.adapted = PeftMethod(cfg.peft.method) != PeftMethod.none
        start = self._init_weights(model, tag)
        if cfg.train.init_from and (masks := fixed_masks(cfg.train.init_from)):
            keep_masks(model, masks)  # also on resume: the zeros of the pruned model stay zero to the end
            self.print(f"keeping the {len(masks)} pruning masks of {cfg.train.init_from} fixed")
        self.n_params = model.num_params()
        self.print(f"model {cfg.model.name}: {self.n_params:,} parameters")
        self.base = None
        if self.adapted:
            self._add_adapters(model, tag, start)
        torch.manual_seed(cfg.train.seed + self.env.rank)  # dropout differs across ranks
        self.engine = ds_engine.build(model, cfg, self.env.world_size, self.is_main, self.universal)
        self.checkpointer = checkpoint.Checkpointer(self.engine, cfg.train.async_checkpoint)
        if cfg.train.compile and (eager := ds_engine.compile_training(self.engine)):
            self.print(f"train.compile=true: {eager}: training eager")
        self.device = self.engine.device

    def _init_weights(self, model: GPT, tag: str | None) -> Adapter | None:
        """Load train.init_from's weights (with nothing to resume, or under adapters: their frozen base);
        returns the adapters it holds, or train.init_adapter's, if any."""
        cfg = self.cfg
        if not cfg.train.init_from:
            return None
        start = find_adapter(cfg.train.init_from, cfg.train.init_adapter)
        if start and self.adapted and not adapters.same_adapters(start.settings, cfg.peft):
            raise ConfigError(f"{start.source} holds peft={OmegaConf.to_container(start.settings)}, this run's "
                              f"peft.* differ: train those adapters on with the same peft.* settings, or every "
                              f"weight from them merged with peft=none")
        # A resume takes its weights from the checkpoint, but adapters' checkpoints hold only the adapters:
        # their frozen base is loaded again, and must be the one they were trained on.
        if not tag or self.adapted:
            load_into(model, start.base if start else cfg.train.init_from)  # new optimizer and schedule
            if start and not self.adapted:  # full fine-tuning from the adapters folded into their base
                check_base(start, model)
                adapters.merge(attach(model, start))
            self.print(f"initialised from {cfg.train.init_from}" + (f" with {start.source}" if start else ""))
        return start

    def _add_adapters(self, model: GPT, tag: str | None, start: Adapter | None) -> None:
        """Apply peft.* to the base (recorded as self.base); from `start`'s weights unless resuming."""
        cfg = self.cfg
        base_path = start.base if start else cfg.train.init_from
        sha256 = check_base(start, model) if start else adapters.weights_sha256(model)
        self.base = {"path": str(Path(base_path).resolve()), "sha256": sha256}
        if tag:
            checkpoint.check_same_base(self._checkpoint_dir(tag), self.base)
        if start and not tag:  # they train on from their weights, with this run's dropout
            attach(model, start, cfg.peft)
            self.print(f"adapters from {start.source}")
        else:
            adapters.apply(model, cfg.peft)
        self.print(f"peft {cfg.peft.method.value}: {adapters.trainable_params(model):,} trainable parameters")

    def _restore(self, tag: str | None) -> dict | None:
        """Resume from checkpoint `tag`, or take init_from's optimizer state; returns the loss guard's state."""
        cfg = self.cfg
        self.step, self.samples = 0, 0  # optimizer steps done; global samples consumed
        self.best = None  # train.keep_best: {"metric", "value", "tag"} of the best validation so far
        self.last_val_loss = None
        # With init_from, each source's validation loss before training: forgetting/<name> is measured from it.
        self.start_losses: dict[str, float] = {}
        if tag:
            state = checkpoint.load(self.engine, self.run_dir, tag, self.env.rank, self.universal,
                                    adapters_only=self.adapted)
            self.load_train_state(state)
            self.print(f"resumed from {self.run_dir / checkpoint.CHECKPOINTS / tag} at step {self.step}")
            return state.get("guard")
        if cfg.train.init_optimizer:
            ckpt_dir = find_checkpoint(cfg.train.init_from)
            if ckpt_dir is None:
                raise ConfigError(f"train.init_optimizer: {cfg.train.init_from} holds no gpt2dist checkpoint, so no "
                                  "optimizer state to take; drop train.init_optimizer to start from its weights only")
            checkpoint.load_optimizer(self.engine, cfg, ckpt_dir, self.env.world_size, adapters_only=self.adapted)
            self.print(f"took the optimizer state of {ckpt_dir}")
        return None

    def _build_batches(self) -> None:
        cfg = self.cfg
        self.print(f"batch: {cfg.train.micro_batch_size} sequences x {cfg.data.seq_len} tokens x "
                   f"{self.grad_accum} accumulation x {self.env.world_size} ranks = "
                   f"{tokens_per_step(cfg):,} tokens per step")
        if self.stores:
            loader = stream_loader([(self.stores[name], self.manifests[name]) for name, *_ in self.sources],
                                   self.stream, cfg.data.seq_len, self.env.rank, self.env.world_size, self.samples,
                                   cfg.data.num_workers, cfg.data.stream.prefetch)
        else:
            loader = train_loader(list(self.train_windows.values()), self.stream, cfg.train.micro_batch_size,
                                  self.env.rank, self.env.world_size, self.samples, cfg.data.num_workers)
        self.batches = DevicePrefetch(loader, self.device)
        corpora = {name: path for name, path, _ in self.sources}
        fits = fitting_sequences(corpora, cfg.data.seq_len, cfg.train.micro_batch_size * self.env.world_size)
        if fits and 0 < fits[0] < cfg.train.eval_sequences:  # with none at all, val_batches says why
            self.print(lower_default(cfg, "train.eval_sequences", fits[0], self.given,
                                     f"is more than the {fits[1]} validation windows of {fits[2]}"))
        self.val, warnings = validation_sets(corpora, cfg.data.seq_len,
                                             cfg.train.micro_batch_size, self.env.rank, self.env.world_size,
                                             cfg.train.eval_sequences)
        for warning in warnings:
            self.print(f"warning: {warning}")
        self.dev_prompts = None  # sft: the dev prompts answered at each validation, and their references
        if cfg.task.name == Task.sft and cfg.task.generate_examples > 0:
            _, path, _ = self.sources[0]
            self.dev_prompts = sft_eval.split_prompts(open_split(path, "val", cfg.data.seq_len),
                                                      cfg.task.generate_examples)

    def _start_logging(self) -> None:
        """The first writes of the run, after every check: the marker, config.yaml and the metrics."""
        if self.is_main:
            run_dir.claim(self.run_dir)
            OmegaConf.save(self.cfg, self.run_dir / "config.yaml", resolve=True)
            # A fresh start (again, after an attempt killed before its first checkpoint) keeps nothing
            # an earlier attempt logged, not even its step-0 validation.
            self.metrics = Metrics(self.cfg, self.run_dir, self.step if self.step else -1, run_name(self.run_dir))

    def train_state(self) -> dict:
        """What a checkpoint keeps of the loop itself, beside DeepSpeed's state."""
        return {"step": self.step, "samples": self.samples, "start_losses": self.start_losses,
                "guard": self.guard.state_dict() if self.guard else None, "data": self.data, "base": self.base,
                "best": self.best}

    def load_train_state(self, state: dict) -> None:
        self.step, self.samples = state["step"], state["samples"]
        self.start_losses = state.get("start_losses", {})
        self.best = state.get("best")

    def print(self, *args) -> None:
        if self.is_main:
            print(*args, flush=True)

    def _store(self, source) -> ShardStore:
        """Where stream mode fetches a source's shards from."""
        s = self.cfg.data.stream
        location = source.path or source_corpus(None, source.builtin, self.cfg.data.cache_dir)
        return ShardStore(location, self.cfg.data.cache_dir, int(s.cache_gb * 2**30), s.retries)

    def _corpus(self, source) -> Path:
        """A source's local corpus (for a remote one, its manifest and validation split, fetched);
        a built-in or remote one is prepared once, by rank 0, while the others wait."""
        def corpus(progress: bool) -> Path:
            if source.name in self.stores:
                return self.stores[source.name].local_corpus()
            return source_corpus(source.path, source.builtin, self.cfg.data.cache_dir, progress,
                                 seq_len=self.cfg.data.seq_len)

        if self.is_main:
            corpus(progress=True)
        torch.distributed.barrier()
        return corpus(progress=False)

    def _step_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """This step's micro-batches. In random mode they are taken one at a time, as the step
        needs them (the prefetcher stays one ahead of the computation). In stream mode the ranks
        first agree that every rank has them all: a shard unavailable on any rank raises
        ShardUnavailable on all, before any rank computes."""
        if not self.stores:
            return (next(self.batches) for _ in range(self.grad_accum))
        error = None
        try:
            batches = [next(self.batches) for _ in range(self.grad_accum)]
        except ShardUnavailable as e:
            error = error_line(e)
        failed, = self._sum_over_ranks(torch.tensor([float(error is not None)], device=self.device))
        if failed:
            unavailable = ShardUnavailable(error or "a shard was unavailable on another rank (see its error)")
            if error:  # said before any rank exits: torchrun ends the others at the first exit
                say(error)
                unavailable.said = True
            torch.distributed.barrier()
            raise unavailable
        return batches

    def _sum_over_ranks(self, values: torch.Tensor) -> list[float]:
        torch.distributed.all_reduce(values)
        return values.tolist()

    def train_step(self) -> StepResult:
        """One optimizer step over grad_accum micro-batches.

        The guard judges the loss after the last backward and before the update, so a bad batch
        never reaches the weights or the Adam moments.
        """
        # Losses stay on the device: one host sync per step, not one per micro-batch, lets the
        # host queue the next micro-batch's work while the GPU still runs this one's.
        losses = torch.zeros(self.grad_accum, dtype=torch.float64, device=self.device)
        for i, (x, y) in enumerate(self._step_batches()):
            _, loss = self.engine(x, y)
            self.engine.backward(loss)
            losses[i] = loss.detach()
            if i < self.grad_accum - 1:
                ds_engine.step(self.engine)  # accumulates; the update comes with the last micro-batch
        # One all-reduce per step carries the loss, whether any rank got a stop signal, and whether any rank's
        # background checkpoint write failed (then every rank raises its error, together).
        loss_sum, votes, failed_writes = self._sum_over_ranks(torch.stack([
            losses.sum(), losses.new_full((), self.preemption.vote), losses.new_full((), self.checkpointer.failed)]))
        if failed_writes:
            self.checkpointer.wait()
        self.preemption.stopping = votes > 0
        mean = loss_sum / (self.grad_accum * self.env.world_size)
        skip = self.guard.check(mean) if self.guard else None
        # The last group runs at optim.lr itself (Muon scales its matrix groups: optim.muon_groups).
        lr = self.engine.get_lr()[-1]  # the scheduler moves on inside step()
        with ds_engine.update_skipped(self.engine) if skip else contextlib.nullcontext():
            grad_norm = ds_engine.step(self.engine)
        return StepResult(mean, lr, grad_norm, skip)

    def _val_scores(self) -> dict[str, dict[str, float]]:
        """Each source's validation scores, by name: its loss, and a classifier's accuracy and macro-F1
        (from the same pass)."""
        with ds_engine.inference(self.engine):
            if self.cfg.task.name == Task.classify:
                return {name: classify_eval.scores(self.engine, batches, len(self.cfg.model.labels),
                                                   self.env.world_size)
                        for name, batches in self.val.items()}
            return {name: {"loss": mean_loss(self.engine, batches, self.env.world_size)[0]}
                    for name, batches in self.val.items()}

    @staticmethod
    def _losses(sources: dict[str, dict[str, float]]) -> dict[str, float]:
        """Each source's validation loss, by name, from its scores (_val_scores)."""
        return {name: scores["loss"] for name, scores in sources.items()}

    def _val_metrics(self, losses: dict[str, float]) -> dict[str, float]:
        """val_loss (the first validated source's); with several sources val/<name> for each; with init_from
        forgetting/<name>, each source's loss now minus its loss before training."""
        if not losses:  # no source has a validation split
            return {}
        return {"val_loss": next(iter(losses.values())),
                **({f"val/{name}": loss for name, loss in losses.items()} if len(losses) > 1 else {}),
                **{f"forgetting/{name}": loss - self.start_losses[name] for name, loss in losses.items()
                   if name in self.start_losses}}

    def validate(self) -> dict[str, float]:
        """The periodic validation metrics of this step (see _val_metrics); the downstream evaluations
        `evals.*` are run_evals'."""
        sources = self._val_scores()
        values = self._val_metrics(self._losses(sources))
        if self.dev_prompts and self.dev_prompts[0]:
            with ds_engine.inference(self.engine):
                scores = sft_eval.generation_scores(self.engine, *self.dev_prompts, self.cfg.task.max_new_tokens)
            values.update({f"val_{k}": v for k, v in scores.items()})
        if self.cfg.task.name == Task.classify and sources:  # the first validated source's, as val_loss
            scores = next(iter(sources.values()))
            values.update({"val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"]})
        return values

    def _improved(self, values: dict[str, float]) -> bool:
        """Whether this validation is the best so far by train.keep_best (then it becomes self.best)."""
        metric = self.cfg.train.keep_best
        if metric is None or metric not in values:
            return False
        value, higher = values[metric], KEEP_BEST[metric]
        if self.best is not None and not (value > self.best["value"] if higher else value < self.best["value"]):
            return False
        self.best = {"metric": metric, "value": value, "tag": checkpoint.tag_of(self.step)}
        return True

    def tokens_per_source(self) -> dict[str, int]:
        """With several sources, tokens/<name>: training tokens drawn from each so far."""
        if len(self.sources) < 2:
            return {}
        drawn = self.stream.drawn(self.samples)
        return {f"tokens/{name}": n * self.cfg.data.seq_len for (name, *_), n in zip(self.sources, drawn)}

    def save(self) -> float:
        """Checkpoint this step (train.async_checkpoint: in the background); returns the seconds training was
        blocked."""
        start = time.perf_counter()
        tag = self.checkpointer.save(self.cfg, self.run_dir, self.train_state(), self.env.rank, self.env.world_size,
                                     self.cfg.train.keep_last, keep=self.best["tag"] if self.best else None)
        blocked = time.perf_counter() - start
        path = self.run_dir / checkpoint.CHECKPOINTS / tag
        waited = self.checkpointer.waited_s
        # Waiting for the previous write means checkpoints come faster than they are written.
        waited = f" ({waited:.2f} s of it for the previous checkpoint's write)" if waited >= 0.01 else ""
        self.print(f"checkpoint {path}: training blocked {blocked:.2f} s{waited}, writing in the background"
                   if self.cfg.train.async_checkpoint else
                   f"saved checkpoint {path} (training blocked {blocked:.2f} s)")
        return blocked

    def train(self) -> int:
        """Train to train.max_steps; returns the exit status (0, or EXIT_REQUEUE after a stop signal)."""
        t = self.cfg.train
        if self.step >= t.max_steps:
            self.print(f"run already complete at step {self.step} (train.max_steps={t.max_steps})")
            return 0
        self.engine.train()
        t0, steps_since_log = time.perf_counter(), 0
        while self.step < t.max_steps:
            try:
                result = self.train_step()
            except ShardUnavailable:  # every rank raises it (see _step_batches): stop after a checkpoint
                self.checkpointer.wait()
                if self.step > 0 and checkpoint.latest_tag(self.run_dir) != checkpoint.tag_of(self.step):
                    self.save()
                    self.checkpointer.wait()
                raise
            skipped = result.skipped
            self.step += 1
            self.samples += t.global_batch_size
            steps_since_log += 1
            last = self.step == t.max_steps
            if skipped:
                self.print(f"step {self.step}: update skipped: {skipped}")
                if self.guard.exhausted():
                    self.checkpointer.wait()  # the newest checkpoint named is the one a resume takes
                    raise TrainingDiverged(
                        f"{self.run_dir}: {self.guard.skips_in_a_row} bad steps in a row up to step {self.step} "
                        f"(last: {skipped}); stopped, newest checkpoint kept: {checkpoint.latest_tag(self.run_dir)}")
            values = {}
            if self.step % self.cfg.logger.log_interval == 0 or last:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                tokens_per_s = steps_since_log * tokens_per_step(self.cfg) / (time.perf_counter() - t0)
                values = {
                    "loss": result.loss,
                    "lr": result.lr,
                    "grad_norm": None if result.grad_norm is None else float(result.grad_norm),
                    "tokens": self.samples * self.cfg.data.seq_len,
                    **self.tokens_per_source(),
                    "tokens_per_s": tokens_per_s,
                    "mfu": mfu(tokens_per_s / self.env.world_size, self.flops_per_token, self.peak_flops),
                    "gpu_mem_gib": peak_gpu_memory_gib(),
                    "skipped_steps": self.guard.skipped if self.guard and self.guard.skipped else None,
                    "fp16_overflows": self.engine.skipped_steps if self.engine.fp16_enabled() else None,
                }
            improved = False
            if (t.eval_interval and self.step % t.eval_interval == 0) or last:
                values.update(self.validate())
                self.last_val_loss = values.get("val_loss")
                improved = self._improved(values)
            evals = self.cfg.evals
            if evals.interval and (self.step % evals.interval == 0 or last):
                with ds_engine.inference(self.engine):
                    values.update(run_evals(self.engine, evals, seq_len=self.cfg.data.seq_len,
                                            batch_size=t.micro_batch_size))
            if values and self.metrics:
                self.metrics.log(self.step, values)
            # Never checkpoint in the middle of a run of bad steps: the weights may be what went bad.
            in_trouble = self.guard is not None and self.guard.skips_in_a_row > 0
            saved = ((t.ckpt_interval and self.step % t.ckpt_interval == 0) or last or improved) and not in_trouble
            if saved:
                self.save()
            if self.preemption.stopping:
                if not saved and not in_trouble:
                    self.save()
                self.checkpointer.wait()  # every rank's part of the checkpoint is on disk, and it is published
                self.print(f"stopped by {self.preemption.reason} at step "
                           f"{self.step}; exit {EXIT_REQUEUE}: run again with train.resume=auto to continue")
                mark_requeue()
                return EXIT_REQUEUE
            if values:
                t0, steps_since_log = time.perf_counter(), 0
        self.checkpointer.wait()  # the last checkpoint is published before the test evaluation may load it
        if self.cfg.task.name in (Task.sft, Task.classify) and self.cfg.task.test:
            self.test()
        self.sample()
        return 0

    def objective(self) -> float | None:
        """What a hyperparameter search minimises: train.keep_best's best value (negated where higher is
        better), or else the last val_loss; None without validation."""
        if self.best:
            return -self.best["value"] if KEEP_BEST[self.best["metric"]] else self.best["value"]
        return self.last_val_loss

    def test(self) -> None:
        """Score the test split (loss, and BLEU, chrF or accuracy, macro-F1) with the best checkpoint's weights
        (train.keep_best) or the last ones; logged as test_* and written to <run_dir>/test.json."""
        cfg = self.cfg
        _, path, _ = self.sources[0]
        examples = open_split(path, "test", cfg.data.seq_len)
        if len(examples) == 0:
            self.print(f"warning: {path}: the test split is empty: no test evaluation")
            return
        if self.best and self.best["tag"] != checkpoint.tag_of(self.step):
            checkpoint.load(self.engine, self.run_dir, self.best["tag"], self.env.rank, adapters_only=self.adapted)
        batches = rank_batches(examples, len(examples), cfg.train.micro_batch_size, self.env.rank, self.env.world_size)
        with ds_engine.inference(self.engine):
            if cfg.task.name == Task.classify:
                scores = classify_eval.scores(self.engine, batches, len(cfg.model.labels), self.env.world_size)
                scores = {f"test_{k}": v for k, v in scores.items()}
            else:
                loss, tokens = mean_loss(self.engine, batches, self.env.world_size)
                generated = sft_eval.generation_scores(self.engine, *sft_eval.split_prompts(examples, len(examples)),
                                                       cfg.task.max_new_tokens)
                scores = {"test_loss": loss, "response_tokens": tokens,
                          **{f"test_{k}": v for k, v in generated.items()}}
        result = {"checkpoint": self.best["tag"] if self.best else checkpoint.tag_of(self.step),
                  "examples": len(examples), **scores}
        if self.is_main:
            (self.run_dir / "test.json").write_text(json.dumps(result, indent=1) + "\n")
            self.metrics.log(self.step, {k: v for k, v in result.items() if k.startswith("test_")})
        self.print(f"test: {json.dumps(result)}")

    def sample(self) -> None:
        """Print a short continuation of train.sample_prompt (every rank generates: ZeRO-3 needs them all)."""
        t = self.cfg.train
        if t.sample_tokens <= 0 or self.cfg.model.labels:  # a classifier does not generate
            return
        enc = get_tokenizer()
        idx = torch.tensor([enc.encode_ordinary(t.sample_prompt)], device=self.device)
        with ds_engine.inference(self.engine):
            out = generate(self.engine, idx, t.sample_tokens, temperature=0.8, top_k=50,
                           generator=torch.Generator().manual_seed(t.seed))
        self.print(f"sample: {enc.decode(out[0].tolist())!r}")

    def close(self) -> None:
        """Release everything, also after a failed start: a checkpoint still being written (it is finished),
        signal handlers, metrics, the process group."""
        if self.checkpointer:
            self.checkpointer.close()
        if self.preemption:
            self.preemption.close()
        if self.metrics:
            self.metrics.close()
        ds_engine.release()
        dist.close()


def run(cfg, given: Collection[str] | None = None) -> tuple[int, float | None]:
    """Train one run of `cfg` (`given`: see Trainer); returns the exit status (see Trainer.train) and the run's
    objective (see Trainer.objective), which train.py returns to a sweeper (`-m hydra/sweeper=optuna`)."""
    with dist.peer_loss_as_error():
        trainer = Trainer(cfg, given)
        try:
            return trainer.train(), trainer.objective()
        finally:
            trainer.close()
