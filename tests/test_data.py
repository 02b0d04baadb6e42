"""Preparing shards from text and reading them back: format, errors, sample order."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds

from gpt2dist.data.loader import MIX_PERIOD, Permutation, SampleStream, Windows, train_loader
from gpt2dist.data.shards import MANIFEST, CorpusError, TokenBlocks
from gpt2dist.data.tokenizer import EOT, get_tokenizer
from gpt2dist.evals.loss import rank_batches, val_batches
from tests.conftest import ROOT, clean_env

DOCS = [f"Document number {i}. " + "The quick brown fox jumps over the lazy dog. " * (5 + i % 7) for i in range(60)]


def prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_tools.prepare", *args], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def text_inputs(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i, doc in enumerate(DOCS[:20]):
        (src / f"{i:02d}.txt").write_text(doc)
    with open(src / "sub" / "rest.jsonl", "w") as f:
        for doc in DOCS[20:]:
            f.write(json.dumps({"id": 1, "body": doc}) + "\n")
    return src


def test_prepare_txt_and_jsonl(tmp_path, text_inputs):
    out = tmp_path / "corpus"
    r = prepare(str(text_inputs), "--output", str(out), "--text-field", "body", "--block-tokens", "64",
                "--val-fraction", "0.2", "--shard-mb", "0.001")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / MANIFEST).read_text())
    assert m["tokenizer"] == "gpt2" and m["dtype"] == "<u2" and m["block_tokens"] == 64
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["documents"] + val["documents"] == len(DOCS) and val["documents"] > 0
    assert len(train["shards"]) > 1  # --shard-mb splits it
    enc = get_tokenizer()
    assert m["input_tokens"] == sum(len(enc.encode_ordinary(d)) + 1 for d in DOCS)
    for split in (train, val):
        assert split["tokens"] + split["dropped_tokens"] + 1 == sum(
            len(enc.encode_ordinary(d)) + 1 for d in DOCS if (split is val) == (d in _val_docs(out, DOCS)))


def _val_docs(out, docs):
    from gpt2dist.data.prepare import is_validation
    return {d for d in docs if is_validation(d.encode(), json.loads((out / MANIFEST).read_text())["val_fraction"])}


def test_blocks_rebuild_the_token_stream(tmp_path, text_inputs):
    out = tmp_path / "corpus"
    assert prepare(str(text_inputs), "--output", str(out), "--text-field", "body", "--block-tokens", "64",
                   "--val-fraction", "0").returncode == 0
    blocks = TokenBlocks(out, "train")
    enc = get_tokenizer()
    stream = [t for d in DOCS for t in enc.encode_ordinary(d) + [EOT]]
    for b in range(len(blocks)):  # block b is stream[64 b : 64 b + 65]
        assert blocks.read(b, 0, 65).tolist() == stream[64 * b: 64 * b + 65]
    # The shards are standard webdataset: streaming them gives the same blocks in order.
    urls = [str(out / s["file"]) for s in blocks.shards]
    streamed = [np.frombuffer(s["tokens"], dtype="<u2") for s in wds.WebDataset(urls, shardshuffle=False)]
    assert len(streamed) == len(blocks)
    assert all((a == blocks.read(i, 0, 65)).all() for i, a in enumerate(streamed))


def test_prepare_is_deterministic(tmp_path, text_inputs):
    for name in ("a", "b"):
        assert prepare(str(text_inputs), "--output", str(tmp_path / name), "--text-field", "body",
                       "--block-tokens", "64").returncode == 0
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


@pytest.mark.parametrize("content,message", [
    (b'{"text": "fine"}\n{"text": broken\n', "bad.jsonl:2: malformed JSON"),
    (b'{"text": "fine"}\n{"body": "other"}\n', "bad.jsonl:2: no string field 'text'"),
    (b'{"text": "caf\xe9"}\n', "bad.jsonl:1: not valid UTF-8"),
])
def test_bad_input_names_the_file_and_damages_nothing(tmp_path, text_inputs, content, message):
    out = tmp_path / "corpus"
    assert prepare(str(text_inputs), "--output", str(out), "--text-field", "body", "--block-tokens", "64").returncode == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    r = prepare(str(bad), "--output", str(out), "--overwrite")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("error: ") and message in last and r.stderr.count("error: ") == 1
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # the old corpus is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".corpus")] == []  # no temp left


def test_missing_input_and_existing_output(tmp_path, text_inputs):
    r = prepare(str(tmp_path / "nope*.txt"), "--output", str(tmp_path / "c"))
    assert r.returncode == 2 and "nope*.txt" in r.stderr
    assert prepare(str(text_inputs), "--output", str(tmp_path / "c"), "--block-tokens", "64", "--text-field", "body").returncode == 0
    r = prepare(str(text_inputs), "--output", str(tmp_path / "c"), "--block-tokens", "64", "--text-field", "body")
    assert r.returncode == 2 and "pass --overwrite" in r.stderr


def test_damaged_shards_are_errors_naming_the_shard(corpus, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(corpus, broken)
    shard = broken / TokenBlocks(broken, "train").shards[0]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated: caught when the corpus is opened
    with pytest.raises(CorpusError, match="train-000000.tar: .* bytes, but the manifest says"):
        TokenBlocks(broken, "train")
    offset = TokenBlocks(corpus, "train")._index(0)[0]  # same size, garbage tokens: caught when read
    shard.write_bytes(data[:offset] + b"\xff" * 8 + data[offset + 8:])
    with pytest.raises(CorpusError, match="train-000000.tar: token ids beyond the vocabulary"):
        TokenBlocks(broken, "train").read(0, 0, 10)
    (broken / MANIFEST).unlink()
    with pytest.raises(CorpusError, match="no manifest"):
        TokenBlocks(broken, "train")


def test_windows_cover_each_block_once(corpus):
    blocks = TokenBlocks(corpus, "train")
    windows = Windows(blocks, seq_len=64)
    assert len(windows) == len(blocks) * 4  # 256-token blocks hold four 64-token windows
    x, y = windows[5]
    whole = blocks.read(1, 64, 65)
    assert x.tolist() == whole[:-1].tolist() and y.tolist() == whole[1:].tolist()


@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 4097])
def test_permutation_is_a_seeded_bijection(n):
    order = Permutation(n, (1, 0, 0))(np.arange(n))
    assert sorted(order.tolist()) == list(range(n))
    assert (order == Permutation(n, (1, 0, 0))(np.arange(n))).all()
    if n >= 1000:
        assert (order != Permutation(n, (1, 0, 1))(np.arange(n))).mean() > 0.99  # another epoch: another order


def test_every_sample_once_per_epoch():
    stream = SampleStream([50], [1.0], seed=3)
    source, window = stream.locate(np.arange(100))
    assert (source == 0).all()
    assert sorted(window[:50].tolist()) == list(range(50)) and sorted(window[50:].tolist()) == list(range(50))
    assert window[:50].tolist() != window[50:].tolist()  # a new permutation each epoch
    assert (SampleStream([50], [1.0], seed=4).locate(np.arange(50))[1] != window[:50]).any()  # seeded
    # Seeking is computed, not replayed: position 10^12 costs what position 10 does.
    (s,), (w,) = stream.locate(np.array([10**12]))
    assert s == 0 and 0 <= w < 50


def test_mixture_draws_by_weight_and_covers_each_source():
    stream = SampleStream([1000, 30, 500], [0.75, 0.25, 0.0], seed=1)
    source, window = stream.locate(np.arange(3 * MIX_PERIOD))
    assert np.bincount(source, minlength=3).tolist() == [22_500, 7_500, 0]  # exact over whole periods
    assert stream.drawn(3 * MIX_PERIOD) == [22_500, 7_500, 0]
    assert stream.drawn(1234) == np.bincount(source[:1234], minlength=3).tolist()
    assert 0 < (source[:100] == 1).sum() < 60  # interleaved, not in runs
    small = window[source == 1]  # source 1 cycles through its 30 windows epoch after epoch
    for e in range(3):
        assert sorted(small[30 * e: 30 * e + 30].tolist()) == list(range(30))
    assert sorted(window[source == 0][:1000].tolist()) == list(range(1000))
    again = SampleStream([1000, 30, 500], [0.75, 0.25, 0.0], seed=1).locate(np.arange(5000, 5100))
    assert (again[0] == source[5000:5100]).all() and (again[1] == window[5000:5100]).all()


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _loader(sources, weights, micro, rank, world_size, start, workers=0, seed=3):
    windows = [Windows(TokenBlocks(c, "train"), 32) for c in sources]
    stream = SampleStream([len(w) for w in windows], weights, seed)
    return train_loader(windows, stream, micro, rank, world_size, start, workers)


def test_loader_is_world_size_independent_and_resumes_anywhere(corpus):
    single = _take(_loader([corpus], [1.0], 2, rank=0, world_size=1, start=0), 8)
    ranks = [_take(_loader([corpus], [1.0], 2, rank=r, world_size=2, start=0), 4)
             for r in (0, 1)]
    merged = [batch for pair in zip(*ranks) for batch in pair]  # micro-batch c came from rank c % 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(merged, single))
    resumed = _take(_loader([corpus], [1.0], 2, rank=1, world_size=2, start=6), 2)
    assert torch.equal(resumed[0][0], single[4][0]) and torch.equal(resumed[1][0], single[6][0])


def test_workers_give_the_same_batches(corpus, code_corpus):
    batches = [_take(_loader([corpus, code_corpus], [0.6, 0.4], 4, rank=0, world_size=1, start=8, workers=w), 5)
               for w in (0, 2)]
    for (x0, y0), (x1, y1) in zip(*batches):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
        assert torch.equal(x0[:, 1:], y0[:, :-1])


def test_val_batches_split_across_ranks(corpus):
    windows = Windows(TokenBlocks(corpus, "val"), 32)
    whole = val_batches(windows, 2, rank=0, world_size=1, sequences=8)
    halves = [val_batches(windows, 2, rank=r, world_size=2, sequences=8) for r in (0, 1)]
    assert torch.equal(torch.cat([b[0] for b in whole]),
                       torch.cat([halves[0][0][0], halves[1][0][0], halves[0][1][0], halves[1][1][0]]))
    assert torch.equal(whole[0][0][1], windows[1][0])
    with pytest.raises(CorpusError, match="eval_sequences=100000"):
        val_batches(windows, 10, rank=0, world_size=1, sequences=100_000)


def test_rank_batches_deal_every_window_once(corpus):
    """evaluate's shares need not be even: 7 windows in batches of 2 are dealt 4 to rank 0, 3 to rank 1."""
    windows = Windows(TokenBlocks(corpus, "val"), 32)
    shares = [list(rank_batches(windows, 7, 2, rank=r, world_size=2)) for r in (0, 1)]
    assert [[len(x) for x, _ in share] for share in shares] == [[2, 2], [2, 1]]
    order = [shares[0][0], shares[1][0], shares[0][1], shares[1][1]]
    assert torch.equal(torch.cat([x for x, _ in order]), torch.stack([windows[i][0] for i in range(7)]))
