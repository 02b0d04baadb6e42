"""Classification examples (a text and its label) as a prepared corpus.

One example per sequence: the text's tokens padded with <|endoftext|> to `seq_len`, as Hugging
Face's GPT-2 classifiers are fed (no <|endoftext|> before the text: the head reads the last token
that is not padding, see `gpt2dist.models.gpt`). A text longer than the sequence is a bad example,
not cut. The corpus is the pretraining format (`gpt2dist.data.shards`) with one example per block:

    block = tokens (seq_len) | label id                (block_tokens = seq_len)

The manifest says `"task": "classify"` and holds the label set (`labels`, in the order of the ids),
the example count of each split (train, val: the dev set, test) and of each label in each split.
A label id is stored in a token's slot, so a corpus holds at most MAX_LABELS labels (as many as the
tokenizer has ids, which `gpt2dist.data.shards.read_manifest` also holds every corpus to).
"""

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gpt2dist.data.sft import SPLITS, ExampleError, PreparedExamples, write_examples
from gpt2dist.data.shards import TOKEN_DTYPE
from gpt2dist.data.tokenizer import EOT, get_tokenizer

TASK = "classify"
MAX_LABELS = 50257  # the tokenizer's ids: each fits the block's uint16 slot, and read_manifest's bound


@dataclass
class LabelledText:
    text: str
    label: str
    where: str = field(default="", compare=False)  # FILE:LINE it was read from, for errors
    numeric: bool = field(default=False, compare=False)  # the label was an integer in the input (1, not "1")

    def key(self) -> list[str]:
        """What its split is hashed from (`gpt2dist.data.sft.hash_split`): the text alone, so that one text
        is never in two splits."""
        return [self.text]


def text_ids(text: str, seq_len: int) -> list[int]:
    """The tokens of a text, refused (ExampleError) when empty or longer than `seq_len`."""
    if not text.strip():
        raise ExampleError("empty text")
    ids = get_tokenizer().encode_ordinary(text)
    if len(ids) > seq_len:
        raise ExampleError(f"text of {len(ids)} tokens is longer than --seq-len {seq_len}")
    return ids


def label_ids(labels: list[str], named: str = "labels") -> dict[str, int]:
    """Each label's id, its index in `labels`; refused (ExampleError, naming `named`) when there are more
    than MAX_LABELS: the ids of the rest would wrap around in their uint16 slot and read back as others."""
    if len(labels) > MAX_LABELS:
        raise ExampleError(f"{named}: {len(labels):,} labels, more than the {MAX_LABELS:,} a classification corpus "
                           "holds (a label id is stored as a token)")
    return {label: i for i, label in enumerate(labels)}


def encode(example: LabelledText, seq_len: int, label_ids: dict[str, int]) -> np.ndarray:
    """The example's block (see the module docstring)."""
    ids = text_ids(example.text, seq_len)
    block = np.full(seq_len + 1, EOT, dtype=np.int64)
    block[: len(ids)] = ids
    block[-1] = label_ids[example.label]
    return block.astype(TOKEN_DTYPE)


def prepare_classify(splits: dict[str, list[LabelledText]], labels: list[str], out_dir: str | Path, seq_len: int,
                     source: str, overwrite: bool = False, skipped: int = 0, split_by: str = "files",
                     inputs: Iterable[str | Path] = ()) -> dict:
    """Write the examples of each split (train, val, test) as a corpus at `out_dir` (not one of the `inputs`,
    nor inside or holding one); returns its manifest.
    Every label must be in `labels`, which gives the ids in order. Every example is encoded before
    anything is written, so a bad one (ExampleError) leaves nothing."""
    ids = label_ids(labels)
    assert len(ids) == len(labels) and all(e.label in ids for s in splits.values() for e in s)
    blocks = {s: [encode(e, seq_len, ids) for e in splits.get(s, [])] for s in SPLITS}
    counts = {s: dict(Counter(e.label for e in splits.get(s, []))) for s in SPLITS}
    return write_examples(blocks, out_dir, overwrite, TASK, inputs, {
        "task": TASK, "source": source, "seq_len": seq_len, "split_by": split_by, "labels": list(labels),
        "label_counts": {s: {label: counts[s].get(label, 0) for label in labels} for s in SPLITS},
        "skipped_inputs": skipped})


class LabelledTexts(PreparedExamples):
    """Example i of one split of a classification corpus: (inputs (seq_len,), label ()), int64 each.
    The same interface as `gpt2dist.data.loader.Windows`: batches stack to (B, seq_len) and (B,)."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = torch.from_numpy(self.blocks.read(int(i), 0, self.seq_len + 1).astype(np.int64))
        return block[:-1], block[-1]
