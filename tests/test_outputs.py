"""gpt2dist.outputs, the one writer of output directories, on real files: what it replaces, what it
refuses (changing nothing), and that a failure or a kill mid-write leaves the old output whole."""

import json
import os
import signal
import subprocess
import sys

import pytest

from gpt2dist import outputs
from gpt2dist.outputs import MARKER, OutputError
from tests.conftest import ROOT, clean_env


def contents(directory):
    """Every file and link under `directory`: bytes, or the link's target."""
    return {str(p.relative_to(directory)): os.readlink(p) if p.is_symlink() else p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file() or p.is_symlink()}


def ours(target, files=None, **kw):
    """An output of gpt2dist's at `target`, holding `files` (name -> text)."""
    with outputs.staged(target, "corpus", **kw) as tmp:
        for name, text in (files or {"manifest.json": "{}", "train-000000.tar": "shard"}).items():
            (tmp / name).write_text(text)
    return target


@pytest.fixture(params=["exchange", "rename aside"])
def swap(request, monkeypatch):
    """Both ways of putting the new output in place: one exchange, or (where the kernel has none) the
    old renamed aside first."""
    if request.param == "rename aside":
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    return request.param


def test_an_output_is_replaced_only_when_ours_and_asked(tmp_path, swap):
    out = ours(tmp_path / "out")
    marker = json.loads((out / MARKER).read_text())
    assert marker["written_by"] == "gpt2dist" and marker["kind"] == "corpus"
    assert marker["entries"] == {"manifest.json": 2, "train-000000.tar": 5}
    with pytest.raises(OutputError, match="pass --overwrite"):
        ours(out, {"manifest.json": "new"})
    ours(out, {"manifest.json": "new"}, overwrite=True)
    assert contents(out) == {MARKER: (out / MARKER).read_bytes(), "manifest.json": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old copy left


@pytest.mark.parametrize("theirs", [
    {"compress.json": "{}", "thesis.tex": "my thesis"},  # named like a compressed model's manifest
    {"manifest.json": '{"app": "theirs"}', "data.bin": "x"},  # another program's manifest.json
    {"manifest.json": "{}", "train-000000.tar/notes.txt": "mine"},  # a directory named like a shard
    {"gpt2dist-output.json": '{"written_by": "me"}', "notes.txt": "mine"},  # a marker that is not ours
])
def test_what_gpt2dist_did_not_write_is_never_replaced(tmp_path, theirs):
    out = tmp_path / "out"
    for name, text in theirs.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = contents(tmp_path)
    with pytest.raises(OutputError, match="not an output gpt2dist wrote"):
        ours(out, overwrite=True)
    assert contents(tmp_path) == before


def test_an_entry_added_or_changed_since_is_theirs(tmp_path):
    out = ours(tmp_path / "out")
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(OutputError, match="holds thesis.tex, which gpt2dist did not write"):
        ours(out, overwrite=True)
    (out / "thesis.tex").unlink()
    (out / "manifest.json").write_text("{edited by hand}")
    before = contents(tmp_path)
    with pytest.raises(OutputError, match="holds manifest.json"):
        ours(out, overwrite=True)
    assert contents(tmp_path) == before


def test_a_file_added_while_writing_is_swapped_back(tmp_path, swap):
    """The old output is checked again once swapped out: a file that arrived meanwhile puts it back."""
    out = ours(tmp_path / "out")
    with pytest.raises(OutputError, match="holds notes.txt"):
        with outputs.staged(out, "corpus", overwrite=True) as tmp:
            (tmp / "manifest.json").write_text("new")
            (out / "notes.txt").write_text("mine")
    assert (out / "notes.txt").read_text() == "mine" and (out / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_symlink_to_ours_is_followed(tmp_path):
    target = ours(tmp_path / "real")
    (tmp_path / "link").symlink_to(target)
    ours(tmp_path / "link", {"manifest.json": "new"}, overwrite=True)
    assert (tmp_path / "link").is_symlink() and (target / "manifest.json").read_text() == "new"


def test_the_working_directory_and_inputs_are_refused(tmp_path, monkeypatch):
    out = ours(tmp_path / "a" / "out")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.txt").write_text("text")
    before = contents(tmp_path)
    monkeypatch.chdir(out)
    for target in (".", out, tmp_path / "a"):
        with pytest.raises(OutputError, match="working directory"):
            ours(target, overwrite=True)
    monkeypatch.chdir(tmp_path)
    for target, inputs, said in [(tmp_path / "in", ["in"], "is an input"),
                                 (tmp_path / "in" / "out", ["in"], "is inside an input"),
                                 (tmp_path / "in", ["in/docs.txt"], "holds an input"),
                                 (tmp_path / "in" / "docs.txt", [], "is not a directory")]:
        with pytest.raises(OutputError, match=said):
            ours(target, inputs=inputs, overwrite=True)
    assert contents(tmp_path) == before


def test_modes_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with outputs.staged(tmp_path / "out", "adapter") as tmp:
            (tmp / "weights").write_bytes(b"w")
            os.chmod(tmp / "weights", 0o600)  # as safetensors' save_file leaves it
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "f").write_bytes(b"f")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    modes = {p.name: p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert modes == {"out": 0o750, "weights": 0o640, "sub": 0o750, "f": 0o640, MARKER: 0o640}


def test_a_failure_mid_write_leaves_the_old_output_and_no_new_parents(tmp_path):
    out = ours(tmp_path / "out")
    before = contents(tmp_path)
    with pytest.raises(RuntimeError):
        with outputs.staged(out, "corpus", overwrite=True) as tmp:
            (tmp / "manifest.json").write_text("half")
            raise RuntimeError("killed")
    assert contents(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError):
        with outputs.staged(tmp_path / "new" / "deep" / "out", "corpus"):
            raise RuntimeError("killed")
    assert not (tmp_path / "new").exists()


KILLED_MID_WRITE = """
import sys, time
from gpt2dist import outputs
with outputs.staged(sys.argv[1], "corpus", overwrite=True) as tmp:
    (tmp / "manifest.json").write_text("half")
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_kill_mid_write_leaves_the_old_output_and_ours_to_clean(tmp_path):
    out = ours(tmp_path / "out")
    before = contents(out)
    writer = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(out)], cwd=ROOT, env=clean_env(),
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    writer.stdout.close()
    assert contents(out) == before
    (left,) = [p for p in tmp_path.iterdir() if p.name != "out"]
    theirs = tmp_path / ".out.tmp-theirs"  # named like a staging directory, but not ours
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    outputs.remove_leftovers(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [theirs.name, "out"] and not left.exists()


def test_a_directory_written_in_place_is_claimed(tmp_path):
    older = tmp_path / "older"
    (older / "checkpoints").mkdir(parents=True)
    (older / "config.yaml").write_text("model: {}")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    before = contents(tmp_path)
    with pytest.raises(OutputError, match=r"holds files gpt2dist did not write \(notes.txt\)"):
        outputs.claim(theirs, "run")
    assert outputs.claim_check(tmp_path / "new" / "run", "run") == tmp_path / "new" / "run"
    assert contents(tmp_path) == before and not (tmp_path / "new").exists()  # checks create nothing
    outputs.claim(tmp_path / "new" / "run", "run")
    assert json.loads((tmp_path / "new" / "run" / MARKER).read_text())["kind"] == "run"
    outputs.claim(older, "run", recognise=lambda d: (d / "checkpoints").is_dir())  # an older gpt2dist's
    assert (older / MARKER).is_file()
    with pytest.raises(OutputError, match="holds a gpt2dist run output, not a stream-cache"):
        outputs.claim(older, "stream-cache")
    with pytest.raises(OutputError, match="not an output gpt2dist wrote"):  # nor replaced as one written whole
        ours(older, overwrite=True)
