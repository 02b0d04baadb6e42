"""The one writer of gpt2dist's output directories: what may be written, replaced or deleted, and how.

Every command that writes a directory goes through here: a prepared corpus, a part of one, an SFT or
classification corpus (data_tools), a compressed model (gpt2dist.compress), an export, merged or
`--adapter` (gpt2dist.export), a training run's directory and the stream cache.

Ownership is proven by content, not by file names: gpt2dist writes a marker, `gpt2dist-output.json`,
naming gpt2dist and the kind of output, and (for an output written whole) every file it holds with its
size. An output written whole (`staged`) is written into a staging directory beside the target, on the
same filesystem, its marker last, and swapped in by one rename (an exchange, where the kernel has
one): a failure or a kill at any point leaves the old output as it was. An existing target is replaced
only with `overwrite`, and only if it is empty, or an output gpt2dist wrote whole whose every entry is
one its marker lists, at the size it lists (a file added or changed since is someone's: refused); the
old output is checked again once swapped out, and swapped back if anything there is not ours. A
directory written in place over time (a run directory, the stream cache) is `claim`ed: its marker is
written on creation, and a directory not empty and not ours is refused (one an older gpt2dist made,
before markers, is recognised by its contents, per kind).

Always refused: an output that is an input, inside one, or holds one; the working directory or one
of its parents (replacing it would leave the shell in a deleted directory); a path that is a file. A
symbolic link to a directory is followed: the output goes where it points. Files and directories
are given the modes the umask says (0666 / 0777 less the umask), whatever the library that wrote them
chose. Refusals are one `OutputError` line naming the directory; nothing has been written then.
"""

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from gpt2dist.errors import BadFile, Gpt2distError
from gpt2dist.safe_json import read_json

MARKER = "gpt2dist-output.json"
FORMAT = "gpt2dist-output/1"
MAX_MARKER_BYTES = 16 * 2**20
STAGED = ("corpus", "part", "sft", "classify", "compressed", "export", "adapter")  # written whole
CLAIMED = ("run", "stream-cache")  # written in place over time
KINDS = STAGED + CLAIMED
STAGING = ".{}.tmp-"  # a staging directory's name beside its target: a killed writer leaves one
SHOWN = 3  # foreign entries named in a refusal


class OutputError(Gpt2distError, FileExistsError):
    """An output directory gpt2dist may not write or replace (names it, and why)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_marker(directory: Path) -> dict | None:
    """The marker of a directory gpt2dist wrote, or None where there is none, or it does not say so."""
    path = directory / MARKER
    if not path.is_file() or path.is_symlink():
        return None
    try:
        marker = read_json(path, MAX_MARKER_BYTES)
    except (BadFile, OSError):
        return None
    if not (isinstance(marker, dict) and marker.get("written_by") == "gpt2dist" and marker.get("kind") in KINDS):
        return None
    entries = marker.get("entries")
    if entries is not None and not (isinstance(entries, dict) and all(
            isinstance(k, str) and type(v) is int for k, v in entries.items())):
        return None
    return marker


def _files(directory: Path) -> dict[str, int | None]:
    """Every entry under `directory` but the marker: a file's size by its relative path; None for anything
    else (a link, a device, ...); a directory only through what it holds (an empty or unreadable one is
    None too)."""
    found: dict[str, int | None] = {}

    def unreadable(e: OSError) -> None:  # a directory that cannot be listed: not known to be ours
        found[os.path.relpath(e.filename, directory)] = None

    for root, dirs, files in os.walk(directory, onerror=unreadable):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(directory))
            if rel == MARKER:
                continue
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                found[rel] = None
                dirs[:] = [d for d in dirs if d != name]
            elif path.is_file():
                found[rel] = path.stat().st_size
            elif not os.access(path, os.R_OK | os.X_OK) or not any(path.iterdir()):
                found[rel] = None
    return found


def foreign(directory: Path) -> list[str] | None:
    """What in an existing directory is not gpt2dist's, for a replacement: [] when it may go (empty, or
    an output written whole whose entries are all in its marker, at their sizes), the entries that are not
    ours otherwise, None when there is no marker of an output written whole."""
    if not any(directory.iterdir()):
        return []
    marker = read_marker(directory)
    if marker is None or marker["kind"] not in STAGED or marker.get("entries") is None:
        return None
    listed = marker["entries"]
    return sorted(rel for rel, size in _files(directory).items() if size is None or listed.get(rel) != size)


def _named(entries: list[str]) -> str:
    return ", ".join(entries[:SHOWN]) + (", ..." if len(entries) > SHOWN else "")


def _resolved(inputs: Iterable[str | Path]) -> list[Path]:
    """The inputs that are paths here (not URLs, commands or names that are no file), resolved."""
    paths = [Path(p).expanduser() for p in inputs if not str(p).startswith(("pipe:", "http://", "https://", "s3://"))]
    return [p.resolve() for p in paths if p.exists()]


def check_place(target: str | Path, inputs: Iterable[str | Path] = (), replaced: bool = True) -> Path:
    """The resolved target; refuses one that is an input, inside one, or holds one, and (where it would be
    `replaced`) the working directory or a parent of it."""
    out = Path(target).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{target}: exists and is not a directory")
    cwd = Path.cwd().resolve()
    if replaced and (out == cwd or out in cwd.parents):
        raise OutputError(f"{target}: is the working directory{'' if out == cwd else ' or holds it'}: "
                          "choose a new directory for the output")
    for source in _resolved(inputs):
        if out == source:
            raise OutputError(f"{target}: is an input of this command ({source}): choose another output directory")
        if source in out.parents:
            raise OutputError(f"{target}: is inside an input of this command ({source}): choose an output "
                              "directory outside it")
        if out in source.parents:
            raise OutputError(f"{target}: holds an input of this command ({source}): choose another output directory")
    return out


def check(target: str | Path, inputs: Iterable[str | Path] = (), overwrite: bool = False) -> Path:
    """Refuse, writing nothing, an output written whole that may not go to `target` (see the module
    docstring); returns the resolved target."""
    out = check_place(target, inputs)
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise OutputError(f"{target}: exists and is not empty (pass --overwrite to replace an output gpt2dist wrote)")
    theirs = foreign(out)
    if theirs is None:
        raise OutputError(f"{target}: not an output gpt2dist wrote (no {MARKER} of one written whole); gpt2dist "
                          "replaces only what it wrote: choose another output directory, or remove it yourself")
    if theirs:
        raise OutputError(f"{target}: holds {_named(theirs)}, which gpt2dist did not write (or which changed since): "
                          "not replacing it")
    return out


def _marker(kind: str, entries: dict | None) -> str:
    data = {"written_by": "gpt2dist", "format": FORMAT, "kind": kind}
    if entries is not None:
        data["entries"] = entries
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def _write_marker(directory: Path, kind: str, entries: dict | None) -> None:
    """The marker, written beside and renamed into place (a reader never sees half of one)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{MARKER}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_marker(kind, entries))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, directory / MARKER)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _follow_umask(directory: Path) -> None:
    """Give every file and directory under `directory` (itself too) the modes the umask says."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(Path(root) / name, 0o777 & ~mask)
        for name in files:
            if not (Path(root) / name).is_symlink():
                os.chmod(Path(root) / name, 0o666 & ~mask)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(new: Path, out: Path, target: str | Path) -> Path | None:
    """Put `new` at `out`; returns where the old output went (to be removed), or None if there was none.
    The old one is checked once out of the way, and put back if anything there is not ours."""
    if not out.exists():
        os.rename(new, out)
        return None
    if _exchange(new, out):
        old = new
        restore = lambda: _exchange(out, old)  # noqa: E731
    else:  # rename aside, then in: for an instant nothing is at `out`
        old = new.with_name(new.name + "-old")
        os.rename(out, old)
        os.rename(new, out)

        def restore():
            os.rename(out, new)
            os.rename(old, out)
    theirs = foreign(old)
    if theirs != []:  # changed while we wrote
        restore()
        theirs = sorted(_files(out)) if theirs is None else theirs  # (back at out now)
        raise OutputError(f"{target}: holds {_named(theirs)}, which gpt2dist did not write: not replacing it")
    return old


def _missing(directory: Path) -> list[Path]:
    """`directory` and those of its parents that do not exist, deepest first."""
    missing = []
    for d in [directory, *directory.parents]:
        if d.exists():
            break
        missing.append(d)
    return missing


def remove_leftovers(target: Path) -> None:
    """Remove what killed writers left beside `target` (its name may be a glob pattern): staging directories
    whose marker is ours."""
    for left in target.parent.glob(STAGING.format(target.name) + "*"):
        if left.is_dir() and not left.is_symlink() and read_marker(left) is not None:
            shutil.rmtree(left, ignore_errors=True)


@contextlib.contextmanager
def staged(target: str | Path, kind: str, inputs: Iterable[str | Path] = (), overwrite: bool = False) -> Iterator[Path]:
    """A new, empty directory beside `target` to write an output of `kind` into; swapped in as `target`
    when the block ends without an error (the marker listing what it holds written last), removed in any
    case. Checks first (`check`); a refusal writes nothing, not even the target's parents."""
    assert kind in STAGED, kind
    inputs = list(inputs)
    out = check(target, inputs, overwrite)
    created = _missing(out.parent)
    tmp = old = None
    done = False
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=STAGING.format(out.name), dir=out.parent))
        except OSError as e:
            raise OutputError(f"{target}: cannot be written there ({e.strerror or e})") from None
        _write_marker(tmp, kind, None)  # a staging directory is ours too: a rerun may remove it
        yield tmp
        check(target, inputs, overwrite)  # again: the target may have changed while we wrote
        _follow_umask(tmp)
        _write_marker(tmp, kind, {rel: size for rel, size in _files(tmp).items() if size is not None})
        old = _swap_in(tmp, out, target)
        done = True
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
        for d in [] if done else created:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()


def claim_check(directory: str | Path, kind: str, recognise: Callable[[Path], bool] = lambda d: False,
                inputs: Iterable[str | Path] = (), what: str | None = None) -> Path:
    """Refuse, writing nothing, a directory that an output of `kind` written in place may not use: one
    not empty and not ours (no marker of this kind, and not `recognise`d as an older gpt2dist's). Returns
    it resolved. `what` names it in a refusal (a setting, say)."""
    assert kind in CLAIMED, kind
    what = what or str(directory)
    out = check_place(directory, inputs, replaced=False)
    if not out.is_dir():
        return out
    present = sorted(p.name for p in out.iterdir() if not p.name.startswith(f".{MARKER}."))
    marker = read_marker(out)
    if marker is not None:
        if marker["kind"] != kind:
            raise OutputError(f"{what}: holds a gpt2dist {marker['kind']} output, not a {kind} directory: "
                              "choose another directory")
        return out
    if present and not recognise(out):
        raise OutputError(f"{what} holds files gpt2dist did not write ({_named(present)}); choose another "
                          "directory (nothing there was changed)")
    return out


def claim(directory: str | Path, kind: str, recognise: Callable[[Path], bool] = lambda d: False,
          inputs: Iterable[str | Path] = (), what: str | None = None) -> Path:
    """Create (if needed) and mark a directory written in place over time, after `claim_check`; safe to
    call from several processes at once. Returns it resolved."""
    out = claim_check(directory, kind, recognise, inputs, what)
    out.mkdir(parents=True, exist_ok=True)
    if read_marker(out) is None:
        _write_marker(out, kind, None)
    return out


def remove(directory: Path) -> bool:
    """Remove an output gpt2dist wrote whole, if every entry in it is ours; returns whether it did."""
    if directory.is_symlink() or not directory.is_dir() or foreign(directory) != [] or read_marker(directory) is None:
        return False
    shutil.rmtree(directory)
    return True
