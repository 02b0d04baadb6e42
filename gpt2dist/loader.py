"""Training and validation batches from a prepared corpus.

Samples are windows of `seq_len + 1` tokens cut from the corpus blocks (`gpt2dist.shards`).
The order of windows is one global stream, independent of the number of ranks: an endless
concatenation of epochs, each a permutation of all windows seeded by (seed, epoch). The
stream is dealt out in micro-batches, micro-batch c going to rank c % world_size. So the
global batch of step s is the same whatever the world size, and a run resumes (on any
number of ranks) by starting the stream at the number of samples already consumed.
"""

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gpt2dist.shards import CorpusError, TokenBlocks


class Windows(Dataset):
    """Window i of a split: (input ids, target ids), each (seq_len,) int64."""

    def __init__(self, blocks: TokenBlocks, seq_len: int):
        if seq_len > blocks.block_tokens:
            raise CorpusError(
                f"{blocks.dir}: data.seq_len={seq_len} is longer than the corpus blocks ({blocks.block_tokens} tokens)"
            )
        self.blocks, self.seq_len = blocks, seq_len
        self.per_block = blocks.block_tokens // seq_len

    def __len__(self) -> int:
        return len(self.blocks) * self.per_block

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        block, w = divmod(int(i), self.per_block)
        tokens = torch.from_numpy(self.blocks.read(block, w * self.seq_len, self.seq_len + 1).astype(np.int64))
        return tokens[:-1], tokens[1:]


class GlobalOrderSampler(Sampler):
    """This rank's share of the global sample stream, from sample `start` on (endless)."""

    def __init__(self, num_samples: int, micro_batch: int, rank: int, world_size: int, seed: int,
                 start: int = 0, shuffle: bool = True):
        assert start % micro_batch == 0, "the stream is resumed at a micro-batch boundary"
        self.n, self.micro, self.rank, self.world = num_samples, micro_batch, rank, world_size
        self.seed, self.start, self.shuffle = seed, start, shuffle
        self._epoch, self._perm = -1, None

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of all samples for one epoch."""
        if epoch != self._epoch:
            index = np.arange(self.n, dtype=np.uint32 if self.n < 2**32 else np.int64)
            if self.shuffle:
                np.random.default_rng([self.seed, epoch]).shuffle(index)
            self._epoch, self._perm = epoch, index
        return self._perm

    def __iter__(self):
        chunk = self.start // self.micro + self.rank  # global micro-batch number
        while True:
            for q in range(chunk * self.micro, (chunk + 1) * self.micro):
                epoch, pos = divmod(q, self.n)
                yield int(self.order(epoch)[pos])
            chunk += self.world


def train_loader(blocks: TokenBlocks, seq_len: int, micro_batch: int, rank: int, world_size: int,
                 seed: int, start: int, num_workers: int) -> DataLoader:
    """Endless micro-batches for this rank, starting `start` samples into the global stream."""
    windows = Windows(blocks, seq_len)
    sampler = GlobalOrderSampler(len(windows), micro_batch, rank, world_size, seed, start)
    # Its own generator: making the iterator must not draw from the global RNG, which a
    # checkpoint restores (dropout would then differ after a resume).
    return DataLoader(windows, batch_size=micro_batch, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def val_batches(blocks: TokenBlocks, seq_len: int, micro_batch: int, rank: int, world_size: int,
                sequences: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: the first `sequences` windows of the unshuffled split, dealt
    out in micro-batches to the ranks. The same set for any world size, and at every evaluation.
    """
    windows = Windows(blocks, seq_len)
    assert sequences % (micro_batch * world_size) == 0
    if sequences > len(windows):
        raise CorpusError(
            f"{blocks.dir}: the {blocks.split} split has {len(windows)} windows of {seq_len} tokens, "
            f"fewer than train.eval_sequences={sequences}"
        )
    n = sequences // (micro_batch * world_size)
    sampler = iter(GlobalOrderSampler(len(windows), micro_batch, rank, world_size, seed=0, shuffle=False))
    batches = []
    for _ in range(n):
        xs, ys = zip(*(windows[next(sampler)] for _ in range(micro_batch)))
        batches.append((torch.stack(xs), torch.stack(ys)))
    return batches
