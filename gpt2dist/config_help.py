"""The trainer's help, read from the schema itself: every key of `gpt2dist.config.Config` with its default (as
the command line writes it) and its documentation, the comments the schema's source gives the field (the
comment lines directly above it, joined, and the one at the end of its line); a section's documentation is
its dataclass's docstring; an enum's choices are its members, with their comments. The config groups and
their options are the directories and files of `conf/`, each described by its file's leading comment.

Nothing is written twice: a field documented in the schema is documented here, wherever its dataclass lives.
"""

import ast
import dataclasses
import difflib
import enum
import functools
import inspect
import io
import re
import textwrap
import tokenize
import typing
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import MISSING, OmegaConf

from gpt2dist.config import CONF_DIR, Config, ConfigError

WIDTH = 100  # columns the help is wrapped at
KEY_COLUMN = 40  # the widest `key=default` the documentation column moves right for; longer ones go above it
USAGE = "usage: gpt2dist train [group=option ...] [key=value ...]"


@dataclasses.dataclass(frozen=True)
class Key:
    """One key of the schema: `data.sources[].weight`, its default as the command line writes it, its
    documentation ("" when the schema has none), and the choices of an enum type (value, comment)."""

    name: str
    default: str
    doc: str
    choices: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Section:
    """A dataclass node of the schema (`train`, `data.stream`, `data.sources[]`), its docstring and its keys."""

    name: str
    doc: str
    keys: tuple[Key, ...]


@functools.cache
def _comments(cls: type) -> dict[str, str]:
    """The documentation of each name assigned in `cls`'s body (fields, or an enum's members), from its source:
    the comment lines directly above the assignment (joined) and the comment at the end of its line(s)."""
    source = textwrap.dedent(inspect.getsource(cls))
    own_line, trailing = {}, {}  # row -> comment text
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            text = token.string.lstrip("#").strip()
            (own_line if not token.line[:col].strip() else trailing)[row] = text
    body = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)).body
    docs = {}
    for node in body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if not isinstance(target, ast.Name):
            continue
        above, row = [], node.lineno - 1
        while row in own_line:
            above.insert(0, own_line[row])
            row -= 1
        after = [trailing[r] for r in range(node.lineno, node.end_lineno + 1) if r in trailing]
        docs[target.id] = " ".join(part for part in above + after if part)
    return docs


def _unwrap(kind):
    """Optional[X] -> X."""
    if typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def _list_item(kind):
    """List[X] -> X, else None."""
    return typing.get_args(kind)[0] if typing.get_origin(kind) in (list, typing.List) else None


@functools.cache
def _parser() -> OverridesParser:
    return OverridesParser.create()


def cli_value(value) -> str:
    """`value` as a command-line override writes it: null, true, 200, 6e-05, [console,jsonl,wandb], an enum by
    its value; a string quoted only where Hydra would not read it back as itself (`'~/.cache/gpt2dist'`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return cli_value(value.value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(cli_value(v) for v in value) + "]"
    if isinstance(value, str) and value != MISSING:
        try:
            if _parser().parse_override(f"k={value}").value() == value:
                return value
        except HydraException:
            pass
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING


def _choices(kind) -> tuple[tuple[str, str], ...]:
    if not (isinstance(kind, type) and issubclass(kind, enum.Enum)):
        return ()
    docs = _comments(kind)
    return tuple((str(member.value), docs.get(member.name, "")) for member in kind)


def _walk(schema: type, prefix: str) -> list[Section]:
    """The section `prefix` (a dataclass `schema`) and the sections below it, depth first."""
    docs, hints = _comments(schema), typing.get_type_hints(schema)
    keys, below = [], []
    for f in dataclasses.fields(schema):
        kind, name = _unwrap(hints[f.name]), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(kind):
            below += _walk(kind, f"{name}.")
            continue
        keys.append(Key(name, cli_value(_default(f)), docs.get(f.name, ""), _choices(kind)))
        item = _list_item(kind)
        if dataclasses.is_dataclass(item):  # data.sources: the keys of each entry, data.sources[].weight
            below += _walk(item, f"{name}[].")
    doc = " ".join((inspect.getdoc(schema) or "").split()) if schema.__doc__ != _auto_doc(schema) else ""
    return ([Section(prefix.rstrip("."), doc, tuple(keys))] if keys else []) + below


def _auto_doc(schema: type) -> str:
    """The docstring @dataclass makes up for a class without one (its signature), which documents nothing."""
    return schema.__name__ + str(inspect.signature(schema)).replace(" -> None", "")


@functools.cache
def sections() -> tuple[Section, ...]:
    """Every section of the schema, in its order: model, data, data.stream, data.sources[], zero, ..."""
    return tuple(_walk(Config, ""))


def key_docs() -> dict[str, tuple[str, str]]:
    """Every key of the schema -> (its default as the command line writes it, its documentation; "" if none)."""
    return {key.name: (key.default, key.doc) for section in sections() for key in section.keys}


def groups() -> dict[str, list[tuple[str, str]]]:
    """The config groups under conf/ (`model`, ..., `hydra/launcher`) -> their options (file stem, the first
    sentences of the file's leading comment), sorted."""
    found = {}
    for directory in sorted(p for p in CONF_DIR.rglob("*") if p.is_dir()):
        options = [(f.stem, _leading_comment(f)) for f in sorted(directory.glob("*.yaml"))]
        if options:
            found[directory.relative_to(CONF_DIR).as_posix()] = options
    return found


def _leading_comment(path: Path, limit: int = 2 * 72) -> str:
    """The first sentences, up to about two lines, of the paragraph a config file's comment opens with (it ends
    at a blank comment line, an indented one such as an example command, or the first non-comment line)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or not line[1:].strip() or line.startswith("#  "):
            break
        lines.append(line[1:].strip())
    sentences = re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(lines))
    text = sentences[0]
    for sentence in sentences[1:]:
        if len(text) + 1 + len(sentence) > limit:
            break
        text += " " + sentence
    return text.rstrip(":")


def _default_options() -> dict[str, str]:
    """The option conf/config.yaml's defaults list picks for each group."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))["defaults"]
    return {group: option for entry in defaults if isinstance(entry, dict) for group, option in entry.items()}


def _column(rows: list[tuple[str, str]], indent: str) -> list[str]:
    """`indent + left  right` rows with the rights aligned in one column and wrapped at WIDTH; a left wider
    than KEY_COLUMN has its right on the lines below it."""
    width = min(max((len(left) for left, _ in rows), default=0), KEY_COLUMN)
    pad = " " * (len(indent) + width + 2)
    out = []
    for left, right in rows:
        if len(left) > width:
            out.append(indent + left)
            head = pad
        else:
            head = indent + left.ljust(width + 2)
        out.append(textwrap.fill(right, WIDTH, initial_indent=head, subsequent_indent=pad) if right
                   else head.rstrip())
    return out


def _key_text(key: Key) -> str:
    """The key's documentation, and its choices unless the documentation already names each of them."""
    if not key.choices or all(re.search(rf"\b{re.escape(value)}\b", key.doc) for value, _ in key.choices):
        return key.doc
    choices = "; ".join(f"{value}: {doc}" if doc else value for value, doc in key.choices)
    return f"{key.doc} (one of {choices})" if key.doc else f"one of {choices}"


def _section_lines(section: Section) -> list[str]:
    title = f"{section.name}: {section.doc}" if section.doc else f"{section.name}:"
    return [textwrap.fill(title, WIDTH, subsequent_indent="  "),
            *_column([(f"{k.name}={k.default}", _key_text(k)) for k in section.keys], "  ")]


def _group_lines() -> list[str]:
    chosen = _default_options()
    rows = [(f"{group}={name}{'*' if chosen.get(group) == name else ''}", doc)
            for group, options in groups().items() for name, doc in options]
    return ["Config groups (group=option; * marks conf/config.yaml's default):", *_column(rows, "  ")]


def _selected(section: str) -> list[Section]:
    """The section named (`data` also gives data.stream and data.sources[]; `data.sources` means
    data.sources[]); a ConfigError naming the sections otherwise."""
    name = re.sub(r"\[\d*\]", "[]", section.strip().rstrip("."))
    names = [s.name for s in sections()]
    if name not in names and f"{name}[]" in names:
        name += "[]"
    chosen = [s for s in sections() if s.name == name or s.name.startswith((f"{name}.", f"{name}[]"))]
    if not chosen:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown config section {section}{hint}: the sections are {', '.join(names)}")
    return chosen


def help_text(section: str | None = None) -> str:
    """What `gpt2dist train --help` prints: the usage, the config groups and their options, then every section
    with its keys, defaults and documentation. With `section` (`train`, `data.stream`) only that section and
    the ones below it; an unknown one is a ConfigError that lists them."""
    if section is not None:
        return "\n".join(line for s in _selected(section) for line in _section_lines(s) + [""]).rstrip() + "\n"
    lines = [USAGE, "",
             "Overrides compose conf/config.yaml: a group picks a file of conf/<group>/, a key sets one value",
             "(the schema's defaults are shown; the files conf/config.yaml picks set some others).", ""]
    lines += _group_lines() + [""]
    for s in sections():
        lines += _section_lines(s) + [""]
    return "\n".join(lines).rstrip() + "\n"
