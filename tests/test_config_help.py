"""The trainer's help is the schema's own documentation: every key, its default as the command line writes
it, and the comment the schema gives it; every config group and option of conf/."""

import re
import subprocess
import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from gpt2dist.config import CONF_DIR, Config, ConfigError
from gpt2dist.config_help import help_text, key_docs
from gpt2dist.errors import report
from tests.conftest import make_cfg

# Keys the schema has no comment for today: they are to be documented in gpt2dist/config.py and taken off this
# list. A new key without documentation fails.
UNDOCUMENTED = {
    "model.n_layer", "model.n_head", "model.n_embd", "model.dropout",
    "optim.warmup_steps", "optim.beta1", "optim.beta2",
    "logger.wandb_project",
    "train.seed", "train.precision", "train.sample_prompt",
    "evals.split", "evals.fewshot_k",
    "guard.enabled",
    "task.name",
}


def leaf_keys(node, prefix: str = "") -> set[str]:
    """The keys of a plain config tree, a list of mappings by `key[]` (data.sources[].weight)."""
    keys = set()
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            keys |= leaf_keys(value, f"{name}.")
            continue
        keys.add(name)
        for item in value if isinstance(value, list) else ():
            if isinstance(item, dict):
                keys |= leaf_keys(item, f"{name}[].")
    return keys


def key_lines(text: str) -> dict[str, str]:
    """The `  key=default` lines of a help text, key -> default (wrapped documentation is indented deeper)."""
    return dict(re.findall(r"^  (?! )([^=\s]+)=(\S+)", text, flags=re.M))


@pytest.mark.parametrize("overrides", [[], ["data=mixture"]])
def test_every_composed_key_is_in_the_help(overrides):
    composed = leaf_keys(OmegaConf.to_container(make_cfg(*overrides), resolve=False))
    assert "train.max_steps" in composed
    assert composed - key_docs().keys() == set()
    lines = key_lines(help_text())
    assert composed - lines.keys() == set()


def test_the_mixture_entries_are_keys():
    composed = leaf_keys(OmegaConf.to_container(make_cfg("data=mixture"), resolve=False))
    assert {"data.sources[].name", "data.sources[].weight", "data.sources[].builtin"} <= composed


def test_every_key_is_documented():
    undocumented = {key for key, (_, doc) in key_docs().items() if not doc}
    assert undocumented - UNDOCUMENTED == set(), "document these keys in gpt2dist/config.py"
    assert UNDOCUMENTED - key_docs().keys() == set(), "not keys of the schema (any more)"


def test_docs_are_the_schemas_comments():
    docs = key_docs()
    assert docs["train.max_steps"] == ("200", "optimizer steps")
    assert "least recently used" in docs["data.stream.cache_gb"][1]
    # The comment lines above a field, joined.
    assert docs["data.stream.lanes"][1] == ("Sequential shard streams, interleaved micro-batch by micro-batch; a "
                                            "multiple of world size x max(1, data.num_workers), and fixed for a "
                                            "run (an elastic restart keeps it).")
    # A list-of-dataclass field's entries.
    assert docs["data.sources[].weight"][1].startswith("share of training samples")


def test_defaults_as_the_command_line_writes_them():
    docs = key_docs()
    assert docs["logger.backends"][0] == "[console,jsonl,wandb]"
    assert docs["train.run_dir"][0] == "runs/${model.name}"
    assert docs["train.init_from"][0] == "null"
    assert docs["train.precision"][0] == "fp32"
    assert docs["model.name"][0] == "???"
    assert docs["data.cache_dir"][0] == "'~/.cache/gpt2dist'"  # Hydra reads an unquoted ~ as an error


def test_every_default_reads_back_as_the_schemas():
    schema = OmegaConf.to_container(OmegaConf.structured(Config), resolve=False, enum_to_str=True)
    parser = OverridesParser.create()
    for key, (default, _) in key_docs().items():
        if "[]" in key:
            continue
        expected = schema
        for part in key.split("."):
            expected = expected[part]
        assert parser.parse_override(f"{key}={default}").value() == expected, key


def test_enum_choices_are_listed():
    train = help_text("train")
    assert "one of fp32; bf16; fp16: with dynamic loss scaling" in " ".join(train.split())


def test_help_lists_every_group_and_option():
    text = help_text()
    assert text.startswith("usage: gpt2dist train [group=option ...] [key=value ...]\n")
    options = {f"{f.parent.relative_to(CONF_DIR).as_posix()}={f.stem}" for f in CONF_DIR.rglob("*.yaml")
               if f.parent != CONF_DIR}
    assert {"model=gpt2", "zero=stage3", "hydra/launcher=slurm", "peft=lora", "task=sft"} <= options
    listed = {line.split()[0].rstrip("*") for line in text.splitlines() if re.match(r"  [\w/]+=\S", line)}
    assert options <= listed
    assert "  model=gpt2-tiny*" in text  # conf/config.yaml's default


def test_help_is_wrapped():
    assert max(len(line) for line in help_text().splitlines()) <= 100


def test_one_section():
    text = help_text("train")
    assert text.splitlines()[0] == "train:"
    keys = key_lines(text)
    assert keys.keys() == {key for key in key_docs() if key.startswith("train.")}
    assert keys["train.max_steps"] == "200"
    assert "Config groups" not in text
    assert key_lines(help_text("data.stream")).keys() == {k for k in key_docs() if k.startswith("data.stream.")}
    assert "data.sources[].weight" in key_lines(help_text("data"))
    assert help_text("data.sources") == help_text("data.sources[]")


def test_unknown_section_is_one_line(capsys):
    with pytest.raises(ConfigError, match=r"^unknown config section trian \(did you mean train\?\): the sections "
                                          r"are model, data, data\.stream, data\.sources\[\], zero,") as e:
        help_text("trian")
    assert report(e.value) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config section trian") and err.count("\n") == 1


def test_import_adds_nothing_heavy():
    # Beyond what gpt2dist.config imports, only the standard library.
    code = ("import sys, gpt2dist.config; before = set(sys.modules); import gpt2dist.config_help; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['gpt2dist']"
