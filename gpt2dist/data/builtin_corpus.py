"""A corpus that every machine already has: Python's own documentation and standard library.

- `pydoc`: the English reference documentation that ships in `pydoc_data.topics` (~0.5 MB).
- `pycode`: the source of the top-level standard-library modules (~4.5 MB of Python).
- `stdlib`: both.

Prepared once into `<cache_dir>/builtin-<kind>-py<version>` and reused (prepared again if the
shard format has changed since).
"""

import sys
import sysconfig
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

from gpt2dist.data.prepare import prepare_corpus
from gpt2dist.data.shards import CorpusError, read_manifest

class Builtin(str, Enum):
    """The built-in corpora (`data.builtin`); a new kind is a member here and its documents below."""

    stdlib = "stdlib"
    pydoc = "pydoc"
    pycode = "pycode"

    def __str__(self) -> str:  # in interpolations: data.name is builtin-${data.builtin}
        return self.value


def documents(kind: Builtin | str) -> Iterator[str]:
    if kind in ("stdlib", "pydoc"):
        from pydoc_data.topics import topics

        for name in sorted(topics):
            yield topics[name]
    if kind in ("stdlib", "pycode"):
        for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            yield path.read_text(encoding="utf-8", errors="replace")


def source_corpus(path: str | None, builtin: Builtin, cache_dir: str | Path, progress: bool = True) -> Path:
    """A training source's prepared corpus: its `path`, or else the built-in corpus `builtin`."""
    return Path(path).expanduser() if path else builtin_corpus(builtin, cache_dir, progress)


def builtin_corpus(kind: Builtin | str, cache_dir: str | Path, progress: bool = True) -> Path:
    """The prepared built-in corpus of this kind, preparing it on first use."""
    kind = Builtin(kind).value
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = Path(cache_dir).expanduser() / f"builtin-{kind}-py{version}"
    try:
        read_manifest(out)
    except CorpusError:  # not prepared yet, or by an older version in another format
        # Small blocks: the validation split of this small corpus still has several.
        prepare_corpus(documents(kind), out, source=f"builtin:{kind}", val_fraction=0.05, block_tokens=2048,
                       progress=progress, overwrite=True)
    return out
