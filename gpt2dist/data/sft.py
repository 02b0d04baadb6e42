"""Supervised fine-tuning examples (a prompt and its response) as a prepared corpus.

One example per sequence: each is `<|endoftext|> prompt response <|endoftext|>`, padded with
<|endoftext|> to `seq_len + 1` tokens, so no example ever attends to another's tokens. The loss is
taken on the response and its closing <|endoftext|> only: the other targets (the prompt, the
padding) are IGNORE, which `torch.nn.functional.cross_entropy` skips. A response that does not fit
is cut at the end of the sequence (counted as truncated in the manifest).

The corpus is the pretraining format (`gpt2dist.data.shards`) with one example per block:

    block = tokens (seq_len + 1) | prompt end | example end      (block_tokens = seq_len + 2)

where `prompt end` is the index of the first response token and `example end` the number of
real tokens, so the shards, their checksums and `data_tools.verify` are the same as for
pretraining. The manifest says `"task": "sft"` and holds the example count of each split
(train, val: the dev set, test).
"""

import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt2dist.errors import Gpt2distError
from gpt2dist.data.prepare import staged
from gpt2dist.data.shards import FORMAT, TOKEN_DTYPE, CorpusError, SplitWriter, TokenBlocks, write_manifest
from gpt2dist.data.tokenizer import EOT, TOKENIZER, VOCAB_SIZE, get_tokenizer

TASK = "sft"
SPLITS = ("train", "val", "test")
IGNORE = -100  # the target index cross_entropy skips
SHARD_EXAMPLES = 8192


@dataclass
class Example:
    prompt: str
    response: str

    def key(self) -> list[str]:
        """What its split is hashed from."""
        return [self.prompt, self.response]


class ExampleError(Gpt2distError, ValueError):
    """An example that cannot be trained on (the message says why; the caller adds file and line)."""


def encode(example: Example, seq_len: int) -> tuple[np.ndarray, bool]:
    """The example's block (see the module docstring), and whether its response was cut."""
    enc = get_tokenizer()
    prompt = [EOT, *enc.encode_ordinary(example.prompt)]
    response = [*enc.encode_ordinary(example.response), EOT]
    if not example.response.strip():
        raise ExampleError("empty response")
    if len(prompt) + 1 > seq_len + 1:  # room for at least one response token
        raise ExampleError(f"prompt of {len(prompt) - 1} tokens leaves no room for a response in "
                           f"--seq-len {seq_len}")
    tokens = (prompt + response)[: seq_len + 1]
    block = np.full(seq_len + 3, EOT, dtype=np.int64)
    block[: len(tokens)] = tokens
    block[-2:] = len(prompt), len(tokens)
    return block.astype(TOKEN_DTYPE), len(prompt) + len(response) > seq_len + 1


def hash_split(example, dev_fraction: float, test_fraction: float) -> str:
    """A stable split (train, val or test) for an example (an SFT or classification one), from its `key()`."""
    u = zlib.crc32(json.dumps(example.key()).encode()) % 1_000_000 / 1_000_000
    return "val" if u < dev_fraction else "test" if u < dev_fraction + test_fraction else "train"


def split_by_hash(examples: Iterable, dev_fraction: float, test_fraction: float) -> dict[str, list]:
    splits = {s: [] for s in SPLITS}
    for example in examples:
        splits[hash_split(example, dev_fraction, test_fraction)].append(example)
    return splits


def prompt_ids(prompt: str) -> list[int]:
    """The tokens a model is given to generate a response: the example's start, as trained."""
    return [EOT, *get_tokenizer().encode_ordinary(prompt)]


def prepare_sft(splits: dict[str, list[Example]], out_dir: str | Path, seq_len: int, source: str,
                overwrite: bool = False, skipped: int = 0, split_by: str = "files", inputs: Iterable[str | Path] = ()
                ) -> dict:
    """Write the examples of each split (train, val, test) as a corpus at `out_dir` (not one of the `inputs`,
    nor inside or holding one); returns its manifest. Every example is encoded before anything is written,
    so a bad one (ExampleError) leaves nothing."""
    blocks = {s: [encode(e, seq_len) for e in splits.get(s, [])] for s in SPLITS}
    return write_examples({s: [block for block, _ in b] for s, b in blocks.items()}, out_dir, overwrite, TASK, inputs, {
        "task": TASK, "source": source, "seq_len": seq_len, "split_by": split_by,
        "truncated_responses": sum(cut for b in blocks.values() for _, cut in b), "skipped_inputs": skipped})


def write_examples(blocks: dict[str, list[np.ndarray]], out_dir: str | Path, overwrite: bool, kind: str,
                   inputs: Iterable[str | Path], about: dict) -> dict:
    """Write encoded examples, one block each, by split (train, val, test), as a corpus at `out_dir` (an
    output of `kind`, gpt2dist.outputs), its manifest saying `about` them (task, seq_len, ...) and counting
    them by split; returns the manifest."""
    if not blocks["train"]:
        raise ExampleError("no training examples")
    block_tokens = len(blocks["train"][0]) - 1
    with staged(out_dir, overwrite, kind, inputs) as tmp:
        writers = {s: SplitWriter(tmp, s, block_tokens, SHARD_EXAMPLES) for s in SPLITS}
        for split, encoded in blocks.items():
            for block in encoded:
                writers[split].add_block(block)
        manifest = {
            "format": FORMAT,
            "tokenizer": TOKENIZER,
            "vocab_size": VOCAB_SIZE,
            "eot_token": EOT,
            "dtype": TOKEN_DTYPE.str,
            "block_tokens": block_tokens,
            **about,
            "examples": {s: len(b) for s, b in blocks.items()},
            "splits": {s: w.close() for s, w in writers.items()},
        }
        write_manifest(tmp, manifest)
    return manifest


class PreparedExamples:
    """One split of a corpus of examples, one per block, prepared for `seq_len` (SFT's and classification's)."""

    def __init__(self, blocks: TokenBlocks, seq_len: int):
        if blocks.manifest.get("seq_len") != seq_len:
            raise CorpusError(f"{blocks.dir}: examples prepared for seq_len {blocks.manifest.get('seq_len')}, "
                              f"not data.seq_len={seq_len}: pass data.seq_len={blocks.manifest.get('seq_len')}")
        self.blocks, self.seq_len = blocks, seq_len

    def __len__(self) -> int:
        return len(self.blocks)


class Examples(PreparedExamples):
    """Example i of one split of an SFT corpus: (inputs, targets), each (seq_len,) int64, the targets
    IGNORE outside the response. The same interface as `gpt2dist.data.loader.Windows`."""

    def parts(self, i: int) -> tuple[np.ndarray, int, int]:
        """(tokens (seq_len + 1,), index of the first response token, number of real tokens)."""
        block = self.blocks.read(int(i), 0, self.seq_len + 3).astype(np.int64)
        return block[:-2], int(block[-2]), int(block[-1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, start, end = self.parts(i)
        targets = tokens[1:].copy()  # target t is token t + 1: the response's are start - 1 .. end - 2
        targets[: start - 1] = IGNORE
        targets[end - 1 :] = IGNORE
        return torch.from_numpy(tokens[:-1]), torch.from_numpy(targets)

    def prompt_and_reference(self, i: int) -> tuple[list[int], list[int]]:
        """Example i's prompt tokens (as `prompt_ids` makes them) and its reference response (without
        <|endoftext|>)."""
        tokens, start, end = self.parts(i)
        response = tokens[start:end].tolist()
        return tokens[:start].tolist(), response[:-1] if response and response[-1] == EOT else response
