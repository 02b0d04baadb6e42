"""A corpus that every machine already has: Python's own documentation and standard library.

- `pydoc`: the English reference documentation that ships in `pydoc_data.topics` (~0.5 MB).
- `pycode`: the source of the top-level standard-library modules (~4.5 MB of Python).
- `stdlib`: both.
- `docsig`: a fine-tuning task (task=sft), not a corpus: the summary of a standard-library function's
  docstring -> its `def` line, from every public top-level function of the stdlib's modules
  (read with `ast`, nothing imported); split by hash (10% dev, 10% test), prepared per data.seq_len.
- `docpkg`: a classification task (task=classify): the summary of a public function's, method's or
  class's docstring -> the standard-library package it is in (asyncio, email, unittest or xml);
  split and prepared as docsig.

Prepared once into `<cache_dir>/builtin-<kind>-py<version>` and reused (prepared again if the
shard format has changed since).
"""

import ast
import functools
import sys
import sysconfig
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

from gpt2dist.data.classify import LabelledText, prepare_classify, text_ids
from gpt2dist.data.prepare import prepare_corpus
from gpt2dist.data.sft import Example, ExampleError, encode, prepare_sft, split_by_hash
from gpt2dist.data.shards import CorpusError, read_manifest

class Builtin(str, Enum):
    """The built-in corpora (`data.builtin`); a new kind is a member here and its documents below."""

    stdlib = "stdlib"
    pydoc = "pydoc"
    pycode = "pycode"
    docsig = "docsig"  # a task=sft task: docstring -> signature
    docpkg = "docpkg"  # a task=classify task: docstring -> package

    def __str__(self) -> str:  # in interpolations: data.name is builtin-${data.builtin}
        return self.value


def documents(kind: Builtin | str) -> Iterator[str]:
    if kind in ("stdlib", "pydoc"):
        from pydoc_data.topics import topics

        for name in sorted(topics):
            yield topics[name]
    if kind in ("stdlib", "pycode"):
        for path in stdlib_modules():
            yield path.read_text(encoding="utf-8", errors="replace")


def stdlib_modules() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def docsig_examples() -> Iterator[Example]:
    """(docstring summary, `def` line) of each public top-level function of the standard library."""
    for path in stdlib_modules():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:  # a few test inputs ship deliberately broken
            continue
        for node in tree.body:
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if doc and not node.name.startswith("_"):
                summary = doc.split("\n\n")[0].strip()
                yield Example(f'{path.stem}: """{summary}"""\n', f"def {node.name}({ast.unparse(node.args)}):")


DOCPKG_LABELS = ("asyncio", "email", "unittest", "xml")  # packages with distinct vocabularies, ~100-300 docstrings each


def docpkg_examples() -> Iterator[LabelledText]:
    """(docstring summary, package) of each public function, method and class of the DOCPKG_LABELS packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for package in DOCPKG_LABELS:
        for path in sorted((root / package).rglob("*.py")):
            if "test" in path.relative_to(root).parts:  # a test suite's docstrings, where it ships
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                    doc = ast.get_docstring(node)
                    if doc:
                        yield LabelledText(doc.split("\n\n")[0].strip(), package)


def source_corpus(path: str | None, builtin: Builtin, cache_dir: str | Path, progress: bool = True,
                  seq_len: int | None = None) -> Path:
    """A training source's prepared corpus: its `path`, or else the built-in corpus `builtin` (a task
    is prepared for `seq_len`)."""
    return Path(path).expanduser() if path else builtin_corpus(builtin, cache_dir, progress, seq_len)


def builtin_corpus(kind: Builtin | str, cache_dir: str | Path, progress: bool = True, seq_len: int | None = None) -> Path:
    """The prepared built-in corpus of this kind, preparing it on first use."""
    kind = Builtin(kind).value
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = Path(cache_dir).expanduser() / f"builtin-{kind}-py{version}"
    if kind in (Builtin.docsig, Builtin.docpkg):
        return _builtin_task(kind, out.with_name(f"{out.name}-seq{seq_len}"), seq_len)
    try:
        read_manifest(out)
    except CorpusError:  # not prepared yet, or by an older version in another format
        # Small blocks: the validation split of this small corpus still has several.
        prepare_corpus(documents(kind), out, source=f"builtin:{kind}", val_fraction=0.05, block_tokens=2048,
                       progress=progress, overwrite=True)
    return out


def _builtin_task(kind: str, out: Path, seq_len: int) -> Path:
    """The docsig or docpkg task at `out`, prepared on first use; examples too long for seq_len are left out
    (counted)."""
    try:
        read_manifest(out)
        return out
    except CorpusError:
        pass
    if kind == Builtin.docsig:
        examples, check, prepare = docsig_examples(), lambda e: encode(e, seq_len), prepare_sft
    else:
        examples, check = docpkg_examples(), lambda e: text_ids(e.text, seq_len)
        prepare = functools.partial(prepare_classify, labels=list(DOCPKG_LABELS))
    fitting, skipped = [], 0
    for example in examples:
        try:
            check(example)
            fitting.append(example)
        except ExampleError:
            skipped += 1
    prepare(split_by_hash(fitting, 0.1, 0.1), out_dir=out, seq_len=seq_len, source=f"builtin:{kind}", overwrite=True,
            skipped=skipped, split_by="hash (dev 0.1, test 0.1)")
    return out
