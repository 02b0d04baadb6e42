"""Training batches from one or several prepared corpora (sources); validation takes its
batches from the same `Windows` (`gpt2dist.evals.loss`).

Samples are windows of `seq_len + 1` tokens cut from the corpus blocks (`gpt2dist.data.shards`).
All training samples form one global stream, independent of the number of ranks and workers:

- Position q of the stream draws from the source that a seeded schedule assigns to q. The
  schedule repeats every `MIX_PERIOD` positions and holds each source in proportion to its
  weight, so over any period the sources are drawn exactly by weight.
- A source's own samples, k = 0, 1, 2, ..., run through its windows epoch after epoch, each
  epoch in the order of a seeded permutation of all its windows (a full shuffle, keyed by
  (seed, source, epoch)): every window once per epoch.
- The stream is dealt out in micro-batches, micro-batch c going to rank c % world_size.

Each of these is computed from q alone, in O(1) time and memory: the permutation is a Feistel
network, not a table. So the global batch of step s is the same whatever the world size, and a
run resumes, on any number of ranks, by starting at the number of samples consumed, at the
same cost at step 10 as at step 100,000.
"""

from collections.abc import Iterable, Sequence
from itertools import count
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gpt2dist.data import classify, sft
from gpt2dist.data.shards import CorpusError, TokenBlocks, corpus_task

MIX_PERIOD = 10_000  # mixture weights are exact over every this many samples (to 1/MIX_PERIOD)
FEISTEL_ROUNDS = 6


class Windows:
    """Window i of a split: tokens [i * seq_len, (i + 1) * seq_len + 1) of its block.

    A block of L tokens gives L // seq_len windows: the last L % seq_len targets of each block
    (and the split's tail shorter than a block, dropped at preparation) are never trained on.
    """

    def __init__(self, blocks: TokenBlocks, seq_len: int):
        if seq_len > blocks.block_tokens:
            raise CorpusError(
                f"{blocks.dir}: data.seq_len={seq_len} is longer than the corpus blocks ({blocks.block_tokens} tokens)"
            )
        self.blocks, self.seq_len = blocks, seq_len
        self.per_block = blocks.block_tokens // seq_len

    def __len__(self) -> int:
        return len(self.blocks) * self.per_block

    def tokens(self, i: int) -> np.ndarray:
        """(seq_len + 1,) uint16: the inputs and, shifted by one, the targets."""
        block, w = divmod(int(i), self.per_block)
        return self.blocks.read(block, w * self.seq_len, self.seq_len + 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.from_numpy(self.tokens(i).astype(np.int64))
        return tokens[:-1], tokens[1:]


def open_split(path: Path, split: str, seq_len: int) -> "Windows | sft.Examples | classify.LabelledTexts":
    """The samples of one split: windows of a pretraining corpus, or examples of a fine-tuning one
    (`gpt2dist.data.sft`, `gpt2dist.data.classify`); all index as samples[i] -> (inputs, targets)."""
    blocks = TokenBlocks(path, split)
    samples = {sft.TASK: sft.Examples, classify.TASK: classify.LabelledTexts}.get(corpus_task(blocks.manifest), Windows)
    return samples(blocks, seq_len)


def train_windows(path: Path, seq_len: int, weight: float) -> "Windows | sft.Examples":
    """The training samples of a corpus; an empty train split (a held-out corpus) only with weight 0."""
    windows = open_split(path, "train", seq_len)
    if len(windows) == 0 and weight > 0:
        raise CorpusError(f"{path}: the train split is empty (a held-out corpus, prepared with --val-fraction 1?): "
                          "give it weight 0 to evaluate it only")
    return windows


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-mixed 64-bit hash (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A seeded permutation of range(n), evaluated per position in O(1) memory.

    A balanced Feistel network is a bijection on [0, 4^h) for any round function; values that
    land at n or beyond are sent through it again (cycle walking), which keeps a bijection of
    range(n). 4^h < 4n, so that takes fewer than four passes on average.
    """

    def __init__(self, n: int, key: Sequence[int]):
        assert n > 0
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.keys = np.random.default_rng(list(key)).integers(0, 2**63, FEISTEL_ROUNDS, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        half, mask = np.uint64(self.half), np.uint64((1 << self.half) - 1)
        left, right = x >> half, x & mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        out = self._feistel(np.asarray(positions, dtype=np.uint64))
        outside = out >= self.n
        while outside.any():
            out[outside] = self._feistel(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)


class SampleStream:
    """The global training stream over sources of the given sizes (windows) and weights."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int):
        weights = np.asarray(weights, dtype=np.float64)
        assert len(sizes) == len(weights) and (weights >= 0).all() and weights.sum() > 0
        self.sizes, self.seed = list(sizes), seed
        # Samples per period by largest remainder: the counts sum to MIX_PERIOD exactly.
        exact = weights / weights.sum() * MIX_PERIOD
        counts = np.floor(exact).astype(np.int64)
        counts[np.argsort(counts - exact, kind="stable")[: MIX_PERIOD - counts.sum()]] += 1
        self.per_period = counts
        schedule = np.repeat(np.arange(len(counts)), counts)
        np.random.default_rng([seed, len(counts)]).shuffle(schedule)  # sources interleaved within a period
        self.schedule = schedule
        self.seen = np.zeros((len(counts), MIX_PERIOD + 1), dtype=np.int64)  # seen[s, r]: s in schedule[:r]
        self.seen[schedule, np.arange(1, MIX_PERIOD + 1)] = 1
        self.seen = np.cumsum(self.seen, axis=1)
        self._perms: dict[int, Permutation] = {}

    def drawn(self, q: int) -> list[int]:
        """Samples each source contributes to stream positions [0, q)."""
        period, r = divmod(q, MIX_PERIOD)
        return [int(n) for n in period * self.per_period + self.seen[:, r]]

    def _permutation(self, source: int, epoch: int) -> Permutation:
        if (source, epoch) not in self._perms:
            self._perms = {(source, epoch): Permutation(self.sizes[source], (self.seed, source, epoch)),
                           **{k: v for k, v in self._perms.items() if k[0] != source}}  # one epoch per source
        return self._perms[(source, epoch)]

    def locate(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, window within that source) of stream positions q."""
        period, r = np.divmod(q, MIX_PERIOD)
        source = self.schedule[r]
        k = period * self.per_period[source] + self.seen[source, r]  # the source's own sample number
        window = np.empty_like(k)
        for s in np.unique(source):
            mine = source == s
            epoch, pos = np.divmod(k[mine], self.sizes[s])
            out = np.empty_like(pos)
            for e in np.unique(epoch):
                out[epoch == e] = self._permutation(int(s), int(e))(pos[epoch == e])
            window[mine] = out
        return source, window


class MicroBatches(Dataset):
    """Global micro-batch c of the stream: (inputs, targets), each (micro_batch, seq_len) int64."""

    def __init__(self, sources: Sequence["Windows | sft.Examples"], stream: SampleStream, micro_batch: int):
        self.sources, self.stream, self.micro = list(sources), stream, micro_batch

    def __getitem__(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        source, window = self.stream.locate(np.arange(c * self.micro, (c + 1) * self.micro, dtype=np.int64))
        inputs, targets = zip(*(self.sources[s][w] for s, w in zip(source, window)))
        return torch.stack(inputs), torch.stack(targets)  # (B, T) each


def train_loader(sources: Sequence[Windows], stream: SampleStream, micro_batch: int, rank: int, world_size: int,
                 start: int, num_workers: int) -> DataLoader:
    """Endless micro-batches for this rank, starting `start` samples into the global stream."""
    assert start % micro_batch == 0, "the stream is resumed at a micro-batch boundary"
    # The sampler hands out global micro-batch numbers: this rank's are rank, rank + world, ...
    # Workers each fetch whole micro-batches; the DataLoader returns them in sampler order.
    chunks = count(start // micro_batch + rank, world_size)
    # Its own generator: making the iterator must not draw from the global RNG, which a
    # checkpoint restores (dropout would then differ after a resume).
    return DataLoader(MicroBatches(sources, stream, micro_batch), batch_size=None, sampler=chunks,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(stream.seed))


class DevicePrefetch:
    """(inputs, targets) already on the device: taking a batch starts copying the next one
    (from pinned memory, without blocking the host), so that the copy overlaps the GPU's work."""

    def __init__(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device):
        self.batches, self.device = iter(batches), device
        self.ready = None  # fetched by the first step, where the ranks agree on a data error (stream mode)

    def _copy(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.ready if self.ready is not None else self._copy(next(self.batches))
        self.ready = self._copy(next(self.batches))
        return batch
