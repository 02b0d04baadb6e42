"""Every config file composes against the schema; bad values fail early, naming the key."""

import os
import re

import pytest
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from gpt2dist.config import (CONF_DIR, ConfigError, DataMode, Precision, check, data_mode, grad_accum_steps,
                             one_line_errors)
from gpt2dist.data.loader import open_split
from gpt2dist.data.prepare import prepare_corpus
from gpt2dist.training.engine import deepspeed_config
from tests.conftest import TINY, make_cfg, run_train, train_cfg

GROUP_OPTIONS = [(group.name, f.stem) for group in sorted(CONF_DIR.iterdir()) if group.is_dir()
                 for f in sorted(group.glob("*.yaml"))]


def test_groups_found():
    assert {g for g, _ in GROUP_OPTIONS} == {"model", "data", "zero", "optim", "logger", "task", "peft"}


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_config_file_composes(group, option):
    # What these options need besides: a corpus path, weights to adapt.
    needs = {("data", "custom"): ["data.path=/some/corpus"], ("peft", "lora"): ["train.init_from=/some/run"],
             ("peft", "ia3"): ["train.init_from=/some/run"]}
    overrides = [f"{group}={option}", *needs.get((group, option), [])]
    cfg = make_cfg(*overrides)
    check(cfg, world_size=1)
    assert cfg.model.name and cfg.data.name


def test_command_line_example_from_readme():
    cfg = make_cfg("model=gpt2", "zero.stage=2", "train.precision=bf16")
    assert (cfg.model.n_layer, cfg.zero.stage, cfg.train.precision) == (12, 2, Precision.bf16)
    assert cfg.train.run_dir == "runs/gpt2"


@pytest.mark.parametrize("override,error", [
    ("model.n_layr=3", (ConfigCompositionException, ConfigKeyError, ConfigAttributeError)),
    ("train.max_steps=lots", (ConfigCompositionException, ValidationError)),
    ("train.precision=fp8", (ConfigCompositionException, ValidationError)),
    ("train.resume=sometimes", (ConfigCompositionException, ValidationError)),
    ("data.builtin=nope", (ConfigCompositionException, ValidationError)),
    ("data.sources=[{name: a, builtin: nope}]", (ConfigCompositionException, ValidationError)),
])
def test_bad_keys_and_types_fail_at_compose(override, error):
    with pytest.raises(error):
        make_cfg(override)


@pytest.mark.parametrize("overrides,key", [
    (["train.global_batch_size=12", "train.micro_batch_size=8"], "train.global_batch_size"),
    (["data.seq_len=2048"], "data.seq_len"),
    (["optim.warmup_steps=300", "train.max_steps=200"], "optim.warmup_steps=300 must be in 0..train.max_steps=200"),
    (["model.n_head=3"], "model.n_embd"),
    (["dist.timeout_s=0"], "dist.timeout_s=0.0 must be positive"),
    (["zero.offload_param=true", "zero.stage=2"], "zero.offload_param"),
    (["data.sources=[{name: a, path: x, weight: -1}]"], "data.sources[0].weight"),
    (["data.sources=[{name: a, path: x}, {name: a, builtin: pydoc}]"], "data.sources: names must be unique"),
    (["data.sources=[{name: a, path: x, weight: 0}]"], "data.sources: some weight must be positive"),
    (["logger.backends=[console,tensorbord]"],
     "logger.backends=[console,tensorbord]: each must be one of console, jsonl, wandb, tensorboard, at most once"),
    (["logger.backends=[jsonl,jsonl]"], "logger.backends=[jsonl,jsonl]"),
    (["train.loss_chunk=-1"], "train.loss_chunk must be >= 0"),
    (["data.path=http://127.0.0.1/c", "data.stream.lanes=3", "data.num_workers=2"],
     "data.stream.lanes=3 must be a multiple of world size"),
    (["data.path=http://127.0.0.1/c", "data.mode=random"], "data.mode=random reads local directories"),
])
def test_check_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        check(make_cfg(*overrides), world_size=1)


@pytest.mark.parametrize("path,mode", [("data/owt", "random"), ("https://host/owt", "stream"),
                                       ("s3://bucket/owt", "stream"), ("'pipe:cat /d/{file}'", "stream"),
                                       ("'data/owt/train-{000000..000003}.tar'", "stream")])
def test_data_mode_follows_the_location(path, mode):
    assert data_mode(make_cfg(f"data.path={path}")) == DataMode(mode)
    assert data_mode(make_cfg(f"data.path={path}", "data.mode=stream")) == DataMode.stream


def test_deepspeed_config_is_derived():
    cfg = make_cfg("train.micro_batch_size=4", "train.global_batch_size=32", "zero=offload", "train.precision=fp16",
                   "optim.grad_clip=0.5")
    ds = deepspeed_config(cfg, world_size=2)
    assert grad_accum_steps(cfg, 2) == 4
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"] and ds["fp16"]["loss_scale"] == 0
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["reduce_bucket_size"] == cfg.model.n_embd**2  # not DeepSpeed's 5e8 (1 GB)
    assert "reduce_scatter" not in ds["zero_optimization"] and ds["zero_force_ds_cpu_optimizer"]
    # Muon at ZeRO 3 gathers whole gradients; under offload its AdamW half is DeepSpeed's CPU Adam.
    muon = deepspeed_config(make_cfg("zero=offload", "optim=muon"), world_size=1)
    assert muon["zero_optimization"]["reduce_scatter"] is False and not muon["zero_force_ds_cpu_optimizer"]


def test_cli_rejects_misspelt_key(tmp_path):
    result = run_train([f"train.run_dir={tmp_path}", "train.max_stepz=3"])
    assert result.returncode != 0
    assert "max_stepz" in result.stderr
    assert not any(tmp_path.iterdir())


def test_cli_rejects_bad_batch_arithmetic(tmp_path):
    result = run_train([f"train.run_dir={tmp_path / 'run'}", "train.global_batch_size=12", "logger.wandb=disabled"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: train.global_batch_size=12")


@pytest.mark.parametrize("override,message", [
    ("+optim.lrr=1e-3", "error: unknown key optim.lrr (did you mean optim.lr?)"),
    ("optim.lrr=1e-3", "error: unknown key optim.lrr (did you mean optim.lr?)"),
    ("+train.foo=1", "error: unknown key train.foo"),
    ("data=custom", "error: data.path is missing: data=custom trains on a corpus you prepared; "
                    "pass data.path=<directory made by python -m data_tools.prepare>"),
    ("train.max_steps=lots", "error: Error merging override train.max_steps=lots; Value 'lots' of type 'str' "
                             "could not be converted to Integer"),
])
def test_cli_config_errors_are_one_line(tmp_path, override, message):
    """Unknown keys fail with or without `+`, a missing data.path fails, and Hydra's own errors
    are one line (no second line about HYDRA_FULL_ERROR); nothing is written."""
    result = run_train([f"train.run_dir={tmp_path / 'run'}", "logger.wandb=disabled", override])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_one_line_errors_leave_the_environment_as_it_was(monkeypatch):
    """train.main run in a caller's process (a sweep, a notebook, a test) does not leave
    HYDRA_FULL_ERROR set behind it, which would turn later Hydra errors into tracebacks."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with one_line_errors():
        pass
    with pytest.raises(SystemExit), one_line_errors():
        raise ConfigError("bad")
    assert "HYDRA_FULL_ERROR" not in os.environ
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with one_line_errors():
        assert os.environ["HYDRA_FULL_ERROR"] == "1"
    assert os.environ["HYDRA_FULL_ERROR"] == "0"


def test_hydra_full_error_keeps_the_trace(tmp_path):
    result = run_train([f"train.run_dir={tmp_path}", "train.max_steps=lots"], env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.parametrize("overrides,key", [
    (["+optim.lrr=1e-3"], "unknown key optim.lrr (did you mean optim.lr?)"),
    (["data=custom"], "data.path is missing"),
])
def test_check_refuses_unknown_and_missing_keys(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        check(make_cfg(*overrides), world_size=1)


def test_defaults_too_large_for_a_small_run_are_lowered_with_a_note(tmp_path):
    """`train.py train.max_steps=2`, a new user's first smoke test, on a corpus of 20 validation windows: the
    default optim.warmup_steps (20) and train.eval_sequences (64) are lowered to fit, one note each; the same
    values given on the command line are refused."""
    docs = [f"Document {i}: the five boxing wizards jump quickly over the lazy dog. " * 3 for i in range(300)]
    prepare_corpus(docs, tmp_path / "small", source="test", val_fraction=0.05, block_tokens=64, progress=False,
                   workers=1)
    windows = len(open_split(tmp_path / "small", "val", 32))
    assert windows < 64
    defaults = {"optim.warmup_steps=2", "train.eval_sequences=8"}  # TINY's: here left to the defaults
    overrides = [*(o for o in TINY if o not in defaults), f"data.path={tmp_path / 'small'}",
                 f"train.run_dir={tmp_path / 'run'}", "train.max_steps=2", "train.eval_interval=0",
                 "train.sample_tokens=0", "logger.backends=[console]"]
    result = run_train(overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    fits = windows // 2 * 2  # a multiple of micro-batch x world size
    assert notes == [
        "note: optim.warmup_steps=2: its default 20 must be in 0..train.max_steps=2 (set optim.warmup_steps to "
        "choose another)",
        f"note: train.eval_sequences={fits}: its default 64 is more than the {windows} validation windows of "
        f"{tmp_path / 'small'} (set train.eval_sequences to choose another)"], result.stdout
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert (saved.optim.warmup_steps, saved.train.eval_sequences) == (2, fits)
    with pytest.raises(ConfigError, match=re.escape("train.eval_sequences=64 is more than the")):
        train_cfg([*overrides, "train.eval_sequences=64", f"train.run_dir={tmp_path / 'given'}"], tmp_path / "given")
