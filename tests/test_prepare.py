"""data_tools.prepare at corpus scale: compressed and Parquet inputs, parallel and deterministic
output, bad input (stop or --skip-bad), and data_tools.verify."""

import gzip
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from gpt2dist.data.shards import MANIFEST
from gpt2dist.data.tokenizer import get_tokenizer
from tests.conftest import ROOT, clean_env

DOCS = [f"Document {i}: " + "Sphinx of black quartz, judge my vow. " * (3 + i % 11) for i in range(300)]


def run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"data_tools.{tool}", *args], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=300)


def jsonl(docs) -> bytes:
    return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()


def shard_bytes(corpus) -> dict:
    return {f.name: f.read_bytes() for f in sorted(corpus.iterdir()) if f.suffix == ".tar"}


def test_compressed_and_parquet_inputs_give_the_same_shards(tmp_path):
    inputs = {
        "docs.jsonl": jsonl(DOCS),
        "docs.jsonl.gz": gzip.compress(jsonl(DOCS), mtime=0),
        "docs.jsonl.zst": zstandard.ZstdCompressor().compress(jsonl(DOCS)),
    }
    for name, data in inputs.items():
        (tmp_path / name).write_bytes(data)
    pq.write_table(pa.table({"id": list(range(len(DOCS))), "text": DOCS}), tmp_path / "docs.parquet",
                   row_group_size=64)  # several row groups, read batch by batch
    shards = {}
    for name in [*inputs, "docs.parquet"]:
        out = tmp_path / f"out-{name}"
        r = run("prepare", str(tmp_path / name), "--output", str(out), "--block-tokens", "64", "--shard-mb", "0.01")
        assert r.returncode == 0, r.stderr
        shards[name] = shard_bytes(out)
        assert json.loads((out / MANIFEST).read_text())["splits"]["train"]["documents"] > 250
    assert len(shards["docs.jsonl"]) > 2
    assert all(s == shards["docs.jsonl"] for s in shards.values())


def test_output_does_not_depend_on_the_number_of_workers(tmp_path):
    (tmp_path / "docs.jsonl").write_bytes(jsonl(DOCS))
    for workers in ("1", "2"):
        r = run("prepare", str(tmp_path / "docs.jsonl"), "--output", str(tmp_path / workers), "--block-tokens", "64",
                "--workers", workers)
        assert r.returncode == 0, r.stderr
    one = {f.name: f.read_bytes() for f in (tmp_path / "1").iterdir()}
    assert one == {f.name: f.read_bytes() for f in (tmp_path / "2").iterdir()}  # manifest included
    assert "tokens" in r.stderr and "MB/s" in r.stderr  # the progress bar


BAD_FILES = {
    "empty.txt": (b"", "empty.txt: empty file"),
    "blank.jsonl": (b"\n\n", "blank.jsonl: empty file"),
    "latin1.txt": (b"caf\xe9", "latin1.txt: not valid UTF-8 (byte 3)"),
    "broken.jsonl": (b'{"text": "a"}\n{"text": \n', "broken.jsonl:2: malformed JSON"),
    "nofield.jsonl": (b'{"text": "a"}\n{"body": "b"}\n', "nofield.jsonl:2: no string field 'text'"),
    "cut.jsonl.gz": (gzip.compress(jsonl(DOCS))[:200], "cut.jsonl.gz: cannot read"),
    "junk.jsonl.zst": (b"not zstd at all", "junk.jsonl.zst: cannot read"),
    # zstandard's reader would end at the cut without a word, the documents after it lost
    "cut.jsonl.zst": (zstandard.ZstdCompressor().compress(jsonl(DOCS * 4))[:-100],
                      "cut.jsonl.zst: cannot read (truncated: the file ends inside a zstd frame)"),
    "junk.parquet": (b"PAR1 not really", "junk.parquet: not a readable Parquet file"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_input_stops_with_one_error_line(tmp_path, name):
    content, message = BAD_FILES[name]
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    r = run("prepare", str(tmp_path / name), "--output", str(out), "--block-tokens", "16")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], r.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1
    assert list(tmp_path.iterdir()) == [tmp_path / name]  # no output, no temp directory


def test_parquet_without_the_column_or_with_nulls(tmp_path):
    pq.write_table(pa.table({"body": DOCS[:5]}), tmp_path / "a.parquet")
    r = run("prepare", str(tmp_path / "a.parquet"), "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and "a.parquet: no column 'text' (columns: body)" in r.stderr
    pq.write_table(pa.table({"text": [DOCS[0], None]}), tmp_path / "b.parquet")
    r = run("prepare", str(tmp_path / "b.parquet"), "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and "b.parquet: row 2: 'text' is null" in r.stderr


def test_skip_bad_counts_and_keeps_the_good(tmp_path):
    good = tmp_path / "in" / "good.jsonl"
    good.parent.mkdir()
    good.write_bytes(jsonl(DOCS[:100]))
    (tmp_path / "in" / "mixed.jsonl").write_bytes(jsonl(DOCS[100:102]) + b"{oops\n" + b'{"t": 1}\n' + b"\xff\n" +
                                                   b"[" * 100_000 + b"]" * 100_000 + b"\n" + b'{"text": NaN}\n')
    (tmp_path / "in" / "empty.txt").write_bytes(b"")
    (tmp_path / "in" / "cut.jsonl.gz").write_bytes(gzip.compress(jsonl(DOCS))[:300])
    out = tmp_path / "out"
    r = run("prepare", str(tmp_path / "in"), "--output", str(out), "--block-tokens", "64", "--skip-bad",
            "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / MANIFEST).read_text())
    assert m["skipped_inputs"] == 7  # 5 bad lines, an empty file, a truncated file
    assert m["splits"]["train"]["documents"] >= 102  # the good lines (and whatever the cut file gave first)
    assert "skipped 7 bad inputs" in r.stdout
    assert "mixed.jsonl:3: malformed JSON" in r.stderr and "mixed.jsonl:5: not valid UTF-8" in r.stderr
    assert "mixed.jsonl:6: malformed JSON (nested too deeply)" in r.stderr and "mixed.jsonl:7: malformed JSON (NaN" in r.stderr


def test_verify_finds_damaged_shards(tmp_path):
    (tmp_path / "docs.jsonl").write_bytes(jsonl(DOCS))
    corpus = tmp_path / "corpus"
    assert run("prepare", str(tmp_path / "docs.jsonl"), "--output", str(corpus), "--block-tokens", "64",
               "--shard-mb", "0.01").returncode == 0
    r = run("verify", str(corpus))
    assert r.returncode == 0 and r.stdout.startswith(f"ok: {corpus}"), r.stderr
    first, second = corpus / "train-000000.tar", corpus / "train-000001.tar"
    data = bytearray(first.read_bytes())
    data[1000] ^= 1  # one flipped bit, same size
    first.write_bytes(bytes(data))
    second.write_bytes(second.read_bytes()[:-512])
    r = run("verify", str(corpus))
    assert r.returncode == 2
    errors = r.stderr.strip().splitlines()
    assert errors == [f"error: {first}: SHA-256 differs from the manifest (damaged or replaced)",
                      f"error: {second}: {second.stat().st_size:,} bytes, but the manifest says "
                      f"{second.stat().st_size + 512:,}"]
    (corpus / MANIFEST).write_text("{")
    r = run("verify", str(corpus))
    assert r.returncode == 2 and "manifest.json: malformed JSON" in r.stderr


def test_an_output_gpt2dist_did_not_write_is_never_deleted(tmp_path):
    """The inputs' own directory (as `--output .` would be) is refused with one line, with or without
    --overwrite, and left as it was."""
    (tmp_path / "docs.jsonl").write_bytes(jsonl(DOCS[:20]))
    (tmp_path / "notes.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for extra in ([], ["--overwrite"]):
        r = run("prepare", str(tmp_path / "docs.jsonl"), "--output", str(tmp_path), "--block-tokens", "16", *extra)
        assert r.returncode == 2
        assert r.stderr.strip().splitlines() == [f"error: {tmp_path}: holds an input of this command "
                                                 f"({tmp_path / 'docs.jsonl'}): choose another output directory"]
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_overwrite_replaces_only_a_prepared_corpus(tmp_path):
    from gpt2dist.data.prepare import prepare_corpus

    def prepare(docs, **kw):
        return prepare_corpus(docs, out, source="docs", block_tokens=16, progress=False, workers=1, **kw)

    out = tmp_path / "corpus"
    out.mkdir()  # an empty directory is fine
    prepare(DOCS[:20])
    prepare(DOCS[20:60], overwrite=True)
    assert json.loads((out / MANIFEST).read_text())["splits"]["train"]["documents"] > 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no temporary or old copy left
    (out / "README").write_text("my notes about this corpus")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="holds README, which gpt2dist did not write"):
        prepare(DOCS[:20], overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_symlink_loops_read_each_file_once(tmp_path):
    from data_tools.sources import input_files

    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("a")
    (tmp_path / "d" / "sub" / "b.txt").write_text("b")
    (tmp_path / "d" / "sub" / "back").symlink_to(tmp_path / "d")  # a loop (two would grow exponentially)
    (tmp_path / "d" / "z-link.txt").symlink_to(tmp_path / "d" / "sub" / "b.txt")
    for spec in (f"{tmp_path}/d/**/*.txt", f"{tmp_path}/d"):
        files, skips = input_files([spec])
        assert [f.relative_to(tmp_path).as_posix() for f in files] == ["d/a.txt", "d/sub/b.txt"]
        assert skips == {"repeated": 2}  # d through back, b.txt through z-link.txt


def test_any_text_file_is_a_document_binaries_are_skipped(tmp_path):
    src = tmp_path / "src"
    (src / ".git").mkdir(parents=True)
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    files = {"notes.md": "# Notes\n" + DOCS[0], "tool.py": "print('hello')\n" + DOCS[1], "README": DOCS[2],
             "page.html": "<p>" + DOCS[3] + "</p>", "notes.rst.gz": gzip.compress(DOCS[4].encode(), mtime=0)}
    for name, content in files.items():
        (src / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (src / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
    (src / "docs.jsonl").write_bytes(jsonl(DOCS[5:8]))
    out = tmp_path / "out"
    r = run("prepare", str(src), "--exclude", "*.html", "--output", str(out), "--block-tokens", "16",
            "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / MANIFEST).read_text())["splits"]["train"]["documents"] == 4 + 3
    assert ("skipped 3 files: 1 hidden (name starts with '.'), 1 excluded by --include/--exclude, "
            "1 binary (NUL bytes)") in r.stdout
    r = run("prepare", str(src / "notes.md"), str(src / "README"), "--output", str(tmp_path / "named"),
            "--block-tokens", "16")
    assert r.returncode == 0, r.stderr  # named directly, whatever the extension
    r = run("prepare", str(src), "--include", "*.md", "--output", str(tmp_path / "md"), "--block-tokens", "16",
            "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "md" / MANIFEST).read_text())["splits"]["train"]["documents"] == 1


def test_val_fraction_one_and_the_split_the_error_counts(tmp_path):
    from gpt2dist.data.prepare import is_validation, prepare_corpus

    def prepare(docs, out, val_fraction):
        return prepare_corpus(docs, tmp_path / out, source="docs", val_fraction=val_fraction, block_tokens=16,
                              progress=False, workers=1)

    held_out = prepare(DOCS[:10], "held-out", 1)  # an evaluation corpus: everything to validation
    assert held_out["splits"]["train"]["documents"] == 0 and held_out["splits"]["val"]["documents"] == 10
    # Lots of validation text, a few train tokens: the error counts the train split's, not all.
    enc = get_tokenizer()
    docs = [d for d in DOCS if is_validation(d.encode(), 0.5)][:20] + [
        d for d in ("a", "b", "c", "d", "e") if not is_validation(d.encode(), 0.5)]
    train_tokens = sum(len(enc.encode_ordinary(d)) + 1 for d in docs if not is_validation(d.encode(), 0.5))
    assert 0 < train_tokens < 17
    with pytest.raises(ValueError, match=f"^docs: the train split's {train_tokens} tokens are not enough for one "
                                         "block of 17 tokens$"):
        prepare(docs, "small", 0.5)
    with pytest.raises(ValueError, match="val_fraction=1.5 is not between 0 and 1"):
        prepare(DOCS, "bad", 1.5)
