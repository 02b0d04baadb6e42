"""The typed config schema. Hydra composes `conf/` on top of it, so a misspelt key or a value
of the wrong type fails at start-up, naming the key.

Derived values (gradient accumulation, tokens per step) are computed here and nowhere else.

A value the command line gave (`given_keys`) means what it says: if it cannot hold, the run is refused.
A default that does not fit a small run (optim.warmup_steps beyond train.max_steps=2, train.eval_sequences
beyond a small validation split) is lowered to fit, and a note says so (`lower_default`).
"""

import contextlib
import dataclasses
import difflib
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from enum import Enum
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gpt2dist.errors import Gpt2distError, say, tell
from gpt2dist.data.builtin_corpus import Builtin
from gpt2dist.data.stream import streams_only
from gpt2dist.training.metric_backends import BACKENDS, WandbMode
from gpt2dist.models.adapters import PeftMethod
from gpt2dist.models.gpt import GPTConfig
from gpt2dist.training.optim import Optimizer

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(Gpt2distError, ValueError):
    """A config value that type-checks but makes no sense (the message names the key)."""


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # with dynamic loss scaling


class Schedule(str, Enum):
    cosine = "cosine"  # warmup, cosine decay to min_lr at train.max_steps
    constant = "constant"  # warmup, constant, linear anneal to min_lr over the last optim.decay_steps


class DataMode(str, Enum):
    random = "random"  # random access to local shards: a full shuffle of all windows (gpt2dist/data/loader.py)
    stream = "stream"  # whole shards read in order, local or remote: shuffled within shards (gpt2dist/data/stream.py)


class Resume(str, Enum):
    auto = "auto"  # continue from the newest checkpoint in train.run_dir, if any
    never = "never"  # refuse a train.run_dir that holds a checkpoint


class Task(str, Enum):
    pretrain = "pretrain"  # next-token loss on every token of a corpus (data_tools.prepare)
    sft = "sft"  # supervised fine-tuning: loss on the responses of prompt/response examples (data_tools.sft)
    classify = "classify"  # a label for each text, from a head on its last token (data_tools.classify)


@dataclass
class TaskConfig:
    """What the run learns (`conf/task/`). With sft, val_loss is the dev set's response-token loss; with
    classify, the dev set's cross-entropy on the labels, beside val_accuracy and val_macro_f1."""

    name: Task = Task.pretrain
    generate_examples: int = 16  # sft: dev examples answered greedily at each validation, scored val_bleu, val_chrf
    max_new_tokens: int = 64  # sft: the longest generated response
    # sft, classify: at the end, score the test split (loss, and BLEU, chrF or accuracy, macro-F1) into
    # <run_dir>/test.json
    test: bool = True


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning through Hugging Face's peft (`conf/peft/`, gpt2dist/models/adapters.py):
    the train.init_from weights stay frozen, only the adapters train."""

    method: PeftMethod = PeftMethod.none  # none (every weight trains), lora or ia3
    r: int = 8  # lora: rank of the update
    alpha: float = 16  # lora: the update is scaled by alpha / r
    dropout: float = 0.0  # lora: dropout on the adapter's input
    # Linear layers adapted, by name suffix: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    target_modules: List[str] = field(default_factory=lambda: ["c_attn"])
    feedforward_modules: List[str] = field(default_factory=list)  # ia3: targets scaled on their input


@dataclass
class ModelConfig:
    name: str = MISSING  # a label, used in the default run directory
    n_layer: int = MISSING
    n_head: int = MISSING
    n_embd: int = MISSING
    block_size: int = 1024  # context length (learned positions)
    vocab_size: int = 50257  # the tokenizer's
    pad_vocab_multiple: int = 64  # embedding rows rounded up to a multiple of this, for fast GPU matmuls; 1: none
    dropout: float = 0.0
    # Hidden width of each distinct block's MLP (structured pruning narrows them); null: 4 * n_embd everywhere
    mlp_hidden: Optional[List[int]] = None
    share_layers: int = 1  # consecutive layers that share one block's weights (ALBERT); 1: no sharing
    # A classifier's class names (the rows of its score head); task=classify takes them from the corpus.
    # Empty: a language model.
    labels: List[str] = field(default_factory=list)


@dataclass
class SourceConfig:
    """One corpus of a mixture (`data.sources`)."""

    name: str = MISSING  # logged as tokens/<name> and val/<name>
    # A corpus prepared by `python -m data_tools.prepare`: a directory, or (data.mode=stream) an http(s)://
    # or s3:// URL of one, or a `pipe:` command with {file}; a directory or URL may end in a brace pattern
    # of training shards (.../train-{000000..000009}.tar); null: the built-in `builtin`
    path: Optional[str] = None
    builtin: Builtin = Builtin.stdlib  # with path null: stdlib, pydoc or pycode
    weight: float = 1.0  # share of training samples (normalised over the sources); 0: evaluated, never trained on


@dataclass
class StreamConfig:
    """data.mode=stream: how shards are dealt out and fetched (gpt2dist/data/stream.py)."""

    # Sequential shard streams, interleaved micro-batch by micro-batch; a multiple of world size x
    # max(1, data.num_workers), and fixed for a run (an elastic restart keeps it).
    lanes: int = 8
    cache_gb: float = 10.0  # budget of the local copy of remote shards, per corpus (least recently used evicted)
    prefetch: int = 2  # shards each lane fetches ahead, in the background
    retries: int = 5  # tries after the first for a failing download, with doubling waits from 0.5 s


@dataclass
class DataConfig:
    name: str = MISSING  # a label for logs
    # A corpus prepared by `python -m data_tools.prepare`; null: the built-in one. Every data
    # config says which (a `???` left by data=custom must not be filled by a default).
    path: Optional[str] = MISSING
    # With path null: stdlib (both), pydoc (English prose) or pycode (Python source); the tasks docsig (task=sft)
    # and docpkg (task=classify)
    builtin: Builtin = Builtin.stdlib
    cache_dir: str = "~/.cache/gpt2dist"  # where the built-in corpus is prepared, once
    seq_len: int = 256  # tokens per training sequence
    num_workers: int = 0  # DataLoader worker processes per rank
    # random (local directories) or stream (any location); null: stream if the data are at a URL, else random
    mode: Optional[DataMode] = None
    stream: StreamConfig = field(default_factory=StreamConfig)
    # A weighted mixture of corpora, replacing path/builtin; the first source's validation loss is val_loss.
    sources: List[SourceConfig] = field(default_factory=list)


@dataclass
class ZeroConfig:
    stage: int = 0  # 0 (plain data parallel), 1 (optimizer), 2 (+gradients), 3 (+parameters)
    offload_optimizer: bool = False  # optimizer state and step on the CPU (stage >= 1)
    offload_param: bool = False  # parameters on the CPU (stage 3)


@dataclass
class OptimConfig:
    name: Optimizer = Optimizer.adamw  # built in gpt2dist/training/optim.py; defaults per optimizer in conf/optim/
    lr: float = 6e-4  # peak learning rate, reached after warmup
    min_lr: float = 6e-5  # the schedule ends at this at train.max_steps
    warmup_steps: int = 100
    schedule: Schedule = Schedule.cosine  # the shape after warmup (gpt2dist/training/optim.py)
    decay_steps: int = 0  # schedule=constant: anneal over these last steps; 0: stay at lr to the end
    weight_decay: float = 0.1  # on weight matrices and embeddings; none on biases and LayerNorms
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8  # AdamW only (and Muon's AdamW half)
    momentum: float = 0.95  # Muon only: the Nesterov momentum of its matrices (its AdamW half: beta1, beta2)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping


@dataclass
class LoggerConfig:
    log_interval: int = 10  # optimizer steps between metric lines
    # Where metrics go (gpt2dist/training/metric_backends.py): console, jsonl (run_dir/metrics.jsonl), wandb, tensorboard
    backends: List[str] = field(default_factory=lambda: ["console", "jsonl", "wandb"])
    wandb: WandbMode = WandbMode.offline  # the wandb backend's mode
    wandb_project: str = "gpt2dist"
    # Per-device peak for mfu; null: a GPU's looked up from its name, a CPU's torch.mm peak measured at start-up
    peak_tflops: Optional[float] = None


@dataclass
class TrainConfig:
    run_dir: str = "runs/${model.name}"  # checkpoints, metrics and config; the same on every rank
    seed: int = 1337
    precision: Precision = Precision.fp32
    micro_batch_size: int = 8  # sequences per rank per forward pass
    global_batch_size: int = 8  # sequences per optimizer step, all ranks and accumulation steps together
    max_steps: int = 200  # optimizer steps
    epochs: Optional[float] = None  # instead of max_steps: passes over the training samples (rounded up to a step)
    eval_interval: int = 50  # steps between validation runs (and at the end); 0: only at the end
    eval_sequences: int = 64  # validation sequences, all ranks together (the same set for any world size)
    ckpt_interval: int = 100  # steps between checkpoints (and at the end); 0: only at the end
    # Write checkpoints in the background: training waits only while the state is copied to CPU memory
    # (see README "Checkpoints and resuming"); false: it waits until the checkpoint is on disk
    async_checkpoint: bool = True
    keep_last: int = 0  # keep only the newest N checkpoints (pruned after a new one is complete); 0: all
    # Also keep the checkpoint of the best validation by this metric (val_loss: lowest; val_bleu, val_chrf:
    # highest), named in <run_dir>/checkpoints/best; the final test evaluation scores it. null: off
    keep_best: Optional[str] = None
    resume: Resume = Resume.auto  # auto: continue from the newest checkpoint in run_dir if any; never: refuse if one exists
    init_from: Optional[str] = None  # with nothing to resume: start from these weights (a run, checkpoint or HF GPT-2 dir)
    # With init_from a run that trained adapters, or init_adapter: peft=none starts from base and adapters merged;
    # the same peft settings train those adapters on, on their base (fresh optimizer). See the README.
    # An adapter directory in PEFT's format (adapter_config.json) on the init_from base
    init_adapter: Optional[str] = None
    # With init_from a gpt2dist run or checkpoint of the same ZeRO stage (and, stage >= 1, world size): also take
    # its optimizer state (AdamW moments); the learning rate still follows this run's schedule from step 0.
    init_optimizer: bool = False
    # Resume although the data (sources, weights, corpora, seq_len, seed) differs from the checkpoint's:
    # the stream goes on at the same sample count, over the new data.
    allow_data_change: bool = False
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    # > 0: the LM head and loss this many tokens at a time, recomputed in backward: the logits are never all
    # in memory (197 MiB per 1024 tokens in fp32 at GPT-2's vocabulary), for one more LM-head matmul per step
    loss_chunk: int = 0
    # torch.compile the training forward (a slower first step; validation and generation run eager);
    # ZeRO-3, or a CPU without a C++ compiler, trains eager and says so
    compile: bool = False
    # CPU memory: glibc keeps freed blocks instead of unmapping them (gpt2dist/training/malloc.py):
    # far fewer page faults; the process keeps its peak memory until it exits.
    retain_freed_memory: bool = True
    tf32: bool = True  # on GPUs, fp32 matmuls and convolutions on TF32 tensor cores (Ampere and newer)
    sample_tokens: int = 48  # tokens generated at the end as a smoke test; 0 to skip
    sample_prompt: str = "The"


@dataclass
class EvalConfig:
    """Downstream evaluations during training (`gpt2dist.evals.downstream.run_evals`), logged with the metrics
    beside the periodic validation loss (train.eval_interval)."""

    interval: int = 0  # optimizer steps between these evaluations (and at the last step); 0: never
    corpus: Optional[str] = None  # a prepared corpus whose `split` is scored for loss and perplexity
    split: str = "val"
    sequences: int = 64  # windows of the split scored (the first ones, unshuffled)
    choices: Optional[str] = None  # multiple-choice JSONL (HellaSwag format)
    choices_limit: Optional[int] = None  # score only the first N questions
    fewshot_file: Optional[str] = None  # solved questions to prepend (multiple-choice JSONL)
    fewshot_k: int = 0
    seed: int = 1234  # which few-shot examples are drawn


@dataclass
class GuardConfig:
    """The loss guard (gpt2dist/training/guard.py): bad steps are not applied."""

    enabled: bool = True
    zscore: float = 6.0  # a loss this many standard deviations above the recent mean is a spike
    window: int = 100  # applied steps the mean and deviation come from
    min_history: int = 20  # steps known before spikes are judged (NaN and inf always are)
    max_skips: int = 10  # more bad steps in a row than this stop the run


@dataclass
class DistConfig:
    """The process group (gpt2dist/training/dist.py)."""

    # A collective that waits longer than this for another rank (one that hangs, or a node that vanished
    # without closing its connections) fails, and the run stops instead of hanging.
    timeout_s: float = 600.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evals: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)


# The linear layers of a block (transformer.h.N.*), which peft.target_modules name by a suffix of their name.
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

# train.keep_best: the metric, and whether higher is better
KEEP_BEST = {None: None, "val_loss": False, "val_bleu": True, "val_chrf": True, "val_accuracy": True,
             "val_macro_f1": True}
# The keep_best metrics that only one task reports.
METRIC_TASK = {"val_bleu": Task.sft, "val_chrf": Task.sft, "val_accuracy": Task.classify,
               "val_macro_f1": Task.classify}


def register() -> None:
    """Make the schema available to `conf/config.yaml`'s defaults list."""
    ConfigStore.instance().store(name="config_schema", node=Config)


def gpt_config(model: ModelConfig) -> GPTConfig:
    return GPTConfig(
        n_layer=model.n_layer,
        n_head=model.n_head,
        n_embd=model.n_embd,
        block_size=model.block_size,
        vocab_size=model.vocab_size,
        # Configs saved before padding existed lack the key; their models were unpadded.
        pad_vocab_multiple=model.get("pad_vocab_multiple", 1),
        dropout=model.dropout,
        # Configs saved before these keys existed had neither.
        mlp_hidden=None if model.get("mlp_hidden") is None else tuple(model.mlp_hidden),
        share_layers=model.get("share_layers", 1),
        labels=tuple(model.get("labels", ())),
    )


def load_model_preset(name: str) -> GPTConfig:
    """The GPTConfig of conf/model/<name>.yaml, checked against the schema."""
    model = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"))
    return gpt_config(model)


def data_sources(cfg) -> list:
    """The training sources, each a corpus (path, or built-in kind) with a name and a weight.
    `data.sources` is the general form (it replaces the shorthand when both are set);
    `data.path` / `data.builtin` are the shorthand for one source, read here and nowhere else."""
    d = cfg.data
    if d.sources:
        return list(d.sources)
    return [OmegaConf.structured(SourceConfig(name=d.name, path=d.path, builtin=d.builtin))]


def data_mode(cfg) -> DataMode:
    """data.mode, or where it is null, the mode the data's location calls for: stream for a URL."""
    if cfg.data.mode is not None:
        return DataMode(cfg.data.mode)
    remote = any(s.path and streams_only(s.path) for s in data_sources(cfg))
    return DataMode.stream if remote else DataMode.random


def tokens_per_step(cfg) -> int:
    """Tokens of one optimizer step, all ranks and micro-batches together."""
    return cfg.train.global_batch_size * cfg.data.seq_len


def grad_accum_steps(cfg, world_size: int) -> int:
    """Micro-batches each rank accumulates per optimizer step."""
    per_pass = cfg.train.micro_batch_size * world_size
    return cfg.train.global_batch_size // per_pass


def _schema_field(full_key: str) -> tuple[list[str], str] | None:
    """For `a.b.c`, the field names of the schema node `a.b` and the last part `c`; None when
    `a.b` is not a node of the schema."""
    *path, last = full_key.split(".")
    schema = Config
    for part in path:
        hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
        schema = hints.get(part.split("[")[0])
        if typing.get_origin(schema) in (list, List):  # data.sources[0]
            schema = typing.get_args(schema)[0]
    if not dataclasses.is_dataclass(schema):
        return None
    return [f.name for f in dataclasses.fields(schema)], last


def unknown_key_message(full_key: str) -> str:
    """`unknown key optim.lrr (did you mean optim.lr?)`."""
    message = f"unknown key {full_key}"
    known = _schema_field(full_key)
    if known:
        names, last = known
        close = difflib.get_close_matches(last, names, n=1)
        if close:
            message += f" (did you mean {full_key.rsplit('.', 1)[0] + '.' if '.' in full_key else ''}{close[0]}?)"
    return message


def _unknown_keys(node, schema, prefix: str = "") -> list[str]:
    """Keys of `node` that its dataclass `schema` does not have, e.g. ones added with `+`."""
    hints = typing.get_type_hints(schema)
    unknown = []
    for key in node.keys():
        full = f"{prefix}{key}"
        kind = hints.get(key)
        if kind is None:
            unknown.append(full)
        elif dataclasses.is_dataclass(kind) and isinstance(node[key], DictConfig):
            unknown += _unknown_keys(node[key], kind, f"{full}.")
        elif typing.get_origin(kind) in (list, List) and isinstance(node[key], ListConfig):
            item = typing.get_args(kind)[0]
            if dataclasses.is_dataclass(item):
                for i, value in enumerate(node[key]):
                    unknown += _unknown_keys(value, item, f"{full}[{i}].")
    return unknown


def _missing_message(key: str) -> str:
    if key == "data.path":
        return ("data.path is missing: data=custom trains on a corpus you prepared; pass "
                "data.path=<directory made by python -m data_tools.prepare>")
    return f"{key} is missing: pass {key}=<value>"


def given_keys(overrides: Iterable[str]) -> frozenset[str]:
    """The keys a command line's overrides set: `train.max_steps=2` and `+train.x=1` set train.max_steps and
    train.x; a config group (`optim=lion`) sets its keys' defaults, not given values."""
    return frozenset(o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides)))


def command_line_keys() -> frozenset[str] | None:
    """The keys this Hydra job's command line set (`given_keys`); None outside a Hydra job (a config a
    program composed itself), where every value counts as given."""
    if not HydraConfig.initialized():
        return None
    return given_keys(HydraConfig.get().overrides.task)


def is_given(key: str, given: Collection[str] | None) -> bool:
    """Whether `key` was given (None: every key was)."""
    return given is None or key in given


def lower_default(cfg, key: str, limit, given: Collection[str] | None, rule: str) -> str:
    """`key`'s value breaks `rule` (`must be in 0..train.max_steps=2`), and `limit` is the most that keeps it: a
    default is lowered to `limit`, and the returned note says so; a given value is a ConfigError."""
    value = OmegaConf.select(cfg, key)
    if is_given(key, given):
        raise ConfigError(f"{key}={value} {rule}")
    OmegaConf.update(cfg, key, limit)
    return f"note: {key}={limit}: its default {value} {rule} (set {key} to choose another)"


def need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def fit_schedule(cfg, given: Collection[str] | None) -> list[str]:
    """optim.warmup_steps and optim.decay_steps within train.max_steps (once it is known: train.epochs sets it
    from the corpus); a default warmup longer than the run is lowered to it. Returns the notes."""
    t, o = cfg.train, cfg.optim
    steps = f"train.max_steps={t.max_steps}" if t.epochs is None else f"{t.max_steps} (train.epochs={t.epochs})"
    notes = []
    need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be in 0..{steps}")
    if o.warmup_steps > t.max_steps:
        notes.append(lower_default(cfg, "optim.warmup_steps", t.max_steps, given, f"must be in 0..{steps}"))
    need(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be in 0..optim.lr={o.lr}")
    if o.schedule == Schedule.constant:
        need(0 <= o.decay_steps <= t.max_steps - o.warmup_steps,
             f"optim.decay_steps={o.decay_steps} must be in 0..train.max_steps - optim.warmup_steps "
             f"= {t.max_steps - o.warmup_steps}")
    else:
        need(o.decay_steps == 0, "optim.decay_steps is for optim.schedule=constant (cosine decays over the whole run)")
    return notes


def _adapts(target: str, blocks: int) -> bool:
    """Whether a peft.target_modules entry names a linear layer of one of the blocks, as peft matches it:
    the layer's whole name, or a suffix of it after a dot."""
    names = (f"transformer.h.{i}.{linear}" for i in range(blocks) for linear in BLOCK_LINEARS)
    return any(name == target or name.endswith("." + target) for name in names)


def check_peft(p, blocks: int) -> None:
    """peft.* that peft itself would only refuse with a traceback, or not at all (a dropout of 1 trains nothing)."""
    method = PeftMethod(p.method)
    need(p.r > 0, f"peft.r={p.r} must be positive")
    if method == PeftMethod.none:
        return
    need(method != PeftMethod.lora or 0 <= p.dropout < 1, f"peft.dropout={p.dropout} must be in [0, 1)")
    targets = list(p.target_modules)
    need(bool(targets), f"peft.target_modules is empty: name the layers to adapt ({', '.join(BLOCK_LINEARS)})")
    for i, target in enumerate(targets):
        need(_adapts(target, blocks), f"peft.target_modules[{i}]={target} names no linear layer of the model: "
                                      f"by a suffix of their names, {', '.join(BLOCK_LINEARS)}")
    outside = [f for f in p.feedforward_modules if f not in targets]
    need(method != PeftMethod.ia3 or not outside, f"peft.feedforward_modules: {', '.join(outside)} not in "
                                                  f"peft.target_modules=[{','.join(targets)}]: each must be one of them")


def check(cfg, world_size: int, given: Collection[str] | None = None) -> list[str]:
    """Keys the schema does not know, values left missing (`???`), and relations between values
    that the types alone cannot express. `given`: the keys the user set (`command_line_keys`); None: all.
    Returns the notes of defaults lowered to fit (`lower_default`), to print."""
    t, m, d, z = cfg.train, cfg.model, cfg.data, cfg.zero
    notes = []

    unknown = _unknown_keys(cfg, Config)
    if unknown:
        raise ConfigError(unknown_key_message(unknown[0]))
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(_missing_message(missing[0]))

    need(m.pad_vocab_multiple >= 1, f"model.pad_vocab_multiple={m.pad_vocab_multiple} must be >= 1")
    need(m.n_embd % m.n_head == 0, f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}")
    need(m.share_layers >= 1 and m.n_layer % m.share_layers == 0,
         f"model.share_layers={m.share_layers} must divide model.n_layer={m.n_layer}")
    blocks = m.n_layer // max(m.share_layers, 1)
    need(m.mlp_hidden is None or (len(m.mlp_hidden) == blocks and min(m.mlp_hidden) > 0),
         f"model.mlp_hidden needs {blocks} positive widths, one per distinct block")
    need(0 < d.seq_len <= m.block_size, f"data.seq_len={d.seq_len} must be in 1..model.block_size={m.block_size}")
    names = [s.name for s in d.sources]
    need(len(set(names)) == len(names) and all(names), f"data.sources: names must be unique and non-empty: {names}")
    for i, s in enumerate(d.sources):
        need(s.weight >= 0, f"data.sources[{i}].weight={s.weight} must be >= 0")
    need(not d.sources or sum(s.weight for s in d.sources) > 0, "data.sources: some weight must be positive")
    need(t.micro_batch_size > 0, "train.micro_batch_size must be positive")
    mode, sources = data_mode(cfg), data_sources(cfg)
    remote = next((s.path for s in sources if s.path and streams_only(s.path)), None)
    need(mode == DataMode.stream or not remote,
         f"data.mode=random reads local directories, not {remote}: use data.mode=stream (or leave it null)")
    if mode == DataMode.stream:
        need(cfg.task.name == Task.pretrain, f"data.mode=stream reads pretraining corpora: task={cfg.task.name.value} "
                                             "reads its examples with data.mode=random")
        lanes, per_rank = d.stream.lanes, world_size * max(1, d.num_workers)
        need(lanes > 0 and lanes % per_rank == 0, f"data.stream.lanes={lanes} must be a multiple of world size "
             f"{world_size} x max(1, data.num_workers={d.num_workers}) = {per_rank}")
        need(d.stream.cache_gb > 0 and d.stream.prefetch >= 0 and d.stream.retries >= 0,
             "data.stream: cache_gb must be positive, prefetch and retries >= 0")
    per_pass = t.micro_batch_size * world_size
    need(
        t.global_batch_size > 0 and t.global_batch_size % per_pass == 0,
        f"train.global_batch_size={t.global_batch_size} must be a multiple of "
        f"train.micro_batch_size={t.micro_batch_size} x world size {world_size} = {per_pass}",
    )
    need(t.max_steps > 0, "train.max_steps must be positive")
    need(cfg.dist.timeout_s > 0, f"dist.timeout_s={cfg.dist.timeout_s} must be positive")
    need(t.eval_sequences % per_pass == 0,
         f"train.eval_sequences={t.eval_sequences} must be a multiple of micro-batch x world size = {per_pass}")
    need(z.stage in (0, 1, 2, 3), f"zero.stage={z.stage} must be 0, 1, 2 or 3")
    need(not z.offload_optimizer or z.stage >= 1, "zero.offload_optimizer needs zero.stage >= 1")
    need(not z.offload_param or z.stage == 3, "zero.offload_param needs zero.stage=3")
    need(t.keep_last >= 0, "train.keep_last must be >= 0")
    need(t.loss_chunk >= 0, "train.loss_chunk must be >= 0")
    need(t.epochs is None or (math.isfinite(t.epochs) and t.epochs > 0),
         f"train.epochs={t.epochs} must be a positive number of passes")
    need(t.epochs is None or not is_given("train.max_steps", given),
         f"train.epochs={t.epochs} and train.max_steps={t.max_steps} both set the run's length: give one")
    if t.epochs is None:  # else the trainer fits the schedule once the corpus gives train.max_steps
        notes += fit_schedule(cfg, given)
    o = cfg.optim
    need(o.name != Optimizer.muon or o.grad_clip == 0,
         f"optim.grad_clip={o.grad_clip}: with optim=muon use 0 (ZeRO 1-3 would clip Muon's orthogonalized "
         f"update, whose norm its shape fixes, not the gradient)")
    need(not t.init_optimizer or t.init_from, "train.init_optimizer needs train.init_from")
    need(not t.init_adapter or t.init_from, "train.init_adapter needs train.init_from, the base it adapts")
    backends = list(cfg.logger.backends)
    need(set(backends) <= BACKENDS.keys() and len(set(backends)) == len(backends),
         f"logger.backends=[{','.join(backends)}]: each must be one of {', '.join(BACKENDS)}, at most once")
    need(t.keep_best in KEEP_BEST, f"train.keep_best={t.keep_best}: must be one of "
                                   f"{', '.join(str(k) for k in KEEP_BEST)}")
    task = METRIC_TASK.get(t.keep_best)
    need(task in (None, cfg.task.name), f"train.keep_best={t.keep_best} is a task={task and task.value} metric")
    need(not m.labels or cfg.task.name == Task.classify, "model.labels make a classifier: they need task=classify")
    need(cfg.task.name != Task.classify or not cfg.evals.interval,
         "evals.interval: the downstream evaluations score a language model, not task=classify's classifier")
    p = cfg.peft
    need(p.method == PeftMethod.none or t.init_from,
         f"peft.method={p.method.value if hasattr(p.method, 'value') else p.method} adapts a trained model: "
         "pass train.init_from=<a run or Hugging Face GPT-2 directory>")
    check_peft(p, blocks)
    g = cfg.guard
    need(g.window > 0 and 0 < g.min_history <= g.window,
         f"guard.min_history={g.min_history} must be in 1..guard.window={g.window}")
    need(g.max_skips >= 0, "guard.max_skips must be >= 0")
    return notes


def error_line(e: BaseException) -> str:
    """One line for a configuration error from Hydra or OmegaConf, whose messages span several
    lines with hints such as "append with +key", which would be wrong here (unknown keys fail)."""
    lines = []
    while e is not None:
        lines += [line.strip() for line in str(e).splitlines()]
        e = e.__cause__
    noise = ("To append", "object_type", "reference_type", "full_key", "Set the environment variable")
    if "Config search path:" in lines:  # the places Hydra looked for a config group option
        lines = lines[:lines.index("Config search path:")]
    lines = [line.rstrip(".") for line in lines if line and not line.startswith(noise)]
    for i, line in enumerate(lines):  # "Available options in 'data':" and one option per line
        if line.endswith(":"):
            lines[i:] = [f"{line} {', '.join(lines[i + 1:])}"]
            break
    unknown = re.match(r"Could not override '([^']+)'", lines[0]) if lines else None
    if unknown and any(" not in " in line for line in lines):
        return unknown_key_message(unknown.group(1))
    return "; ".join(dict.fromkeys(lines))


@contextlib.contextmanager
def one_line_errors(*expected: type[BaseException]):
    """A gpt2dist error (`gpt2dist.errors`), a Hydra or OmegaConf configuration error, or one of the
    `expected` errors, ends the program with one `error:` line on stderr and exit status 2 (or the
    error's `exit_status`). Used twice: around the Hydra
    main (composition errors) and around the work inside it (there Hydra would first print the
    job's overrides).
    HYDRA_FULL_ERROR=1 in the environment keeps Hydra's full traceback for its own errors."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    full_trace = previous == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors here instead of printing two lines
    try:
        yield
    except (Gpt2distError, *expected) as e:
        tell(e)
        sys.exit(getattr(e, "exit_status", 2))  # bad input; an expected error may name its own status
    except (HydraException, OmegaConfBaseException) as e:
        if full_trace:
            raise
        say(error_line(e))
        sys.exit(2)
    finally:  # as the caller had it: a program calling train.main in its own process keeps its environment
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
