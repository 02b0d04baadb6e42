"""Mean loss over a fixed set of windows, each rank scoring its share: the one implementation behind

- the periodic validation loss during training (`val_loss`, `val/<name>`, `forgetting/<name>`):
  `validation_sets` once at start-up, `mean_loss` every `train.eval_interval` steps;
- the loss and perplexity of `python -m gpt2dist.evaluate --corpus/--text`, and of the
  downstream evaluation `evals.corpus` during training: `corpus_loss`.

The windows are the first ones of an unshuffled split, dealt out in batches, batch c to rank
c % world_size. Each rank adds up its losses and tokens, and one all-reduce adds the ranks'
sums, so the mean is the same on any number of ranks (up to fp32 rounding).
"""

import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from gpt2dist.data.loader import Windows, open_split
from gpt2dist.data.sft import IGNORE
from gpt2dist.data.shards import CorpusError, TokenBlocks, require_kind

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), each (batch, seq_len) int64


def rank_batches(windows: Windows, n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
    """This rank's share of windows (or fine-tuning examples) [0, n): batches of `batch_size` in order
    (the last may be smaller), batch c going to rank c % world_size.

    Every rank gets as many batches: under ZeRO-3 each forward pass gathers parameters from all ranks,
    so a rank that stopped early would leave the others waiting. A rank short of one gets a padding
    batch, the first one's inputs with every target IGNORE, which scores nothing (the targets keep
    their shape: a token per position, or a classifier's one label per text)."""
    def batch(c: int) -> Batch:
        inputs, targets = zip(*(windows[i] for i in range(c * batch_size, min((c + 1) * batch_size, n))))
        return torch.stack(inputs), torch.stack(targets)  # (B, T) each

    batches = math.ceil(n / batch_size)
    for c in range(rank, math.ceil(batches / world_size) * world_size, world_size):
        if c < batches:
            yield batch(c)
        else:
            inputs, targets = batch(0)
            yield inputs, torch.full_like(targets, IGNORE)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a GPT's or a DeepSpeed engine's parameters are."""
    return getattr(model, "device", None) or next(model.parameters()).device


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: Iterable[Batch], world_size: int = 1) -> tuple[float, int]:
    """Mean next-token loss over every rank's `batches`, and the number of tokens scored (targets
    IGNORE, the prompts and padding of fine-tuning examples, are not scored).

    `batches` is this rank's share of `world_size` ranks (`rank_batches`); with more than one
    rank, every rank must call this (the sums are all-reduced). `model` is a GPT or a DeepSpeed
    engine; its mode (eval or train) is the caller's.
    """
    device = model_device(model)
    # Summed on the device: one host sync at the end, not one per batch.
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, tokens scored
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        _, loss = model(x, y)
        scored = (y != IGNORE).sum()
        # A batch with nothing to score (rank_batches' padding) has a NaN mean loss: it adds 0.
        sums += torch.stack([torch.where(scored > 0, loss.double() * scored, 0.0), scored.double()])
    if world_size > 1:
        torch.distributed.all_reduce(sums)
    loss_sum, tokens = sums.tolist()
    return loss_sum / tokens, int(tokens)


def corpus_loss(model: torch.nn.Module, corpus: str | Path, split: str = "val", seq_len: int | None = None,
                batch_size: int = 8, max_sequences: int | None = None, rank: int = 0,
                world_size: int = 1) -> dict[str, float]:
    """Mean next-token loss and perplexity over the first `max_sequences` windows (all by default)
    of one split, this rank scoring its share (see `mean_loss`). `seq_len` defaults to the
    model's context, capped by the corpus block size; of fine-tuning examples, to theirs (the
    loss is then the response-token loss).
    """
    gpt = getattr(model, "module", model)
    blocks = TokenBlocks(corpus, split)
    require_kind(blocks.manifest, blocks.dir, ("pretrain", "sft"), "text or fine-tuning examples that a language "
                 "model's loss scores (a classifier's test split is scored by task=classify's task.test)")
    default = blocks.manifest.get("seq_len") or min(gpt.config.block_size, blocks.block_tokens)
    windows = open_split(corpus, split, seq_len or default)
    n = len(windows) if max_sequences is None else min(max_sequences, len(windows))
    if n == 0:
        raise CorpusError(f"{blocks.dir}: the {split} split has no window of {windows.seq_len} tokens")
    loss, tokens = mean_loss(model, rank_batches(windows, n, batch_size, rank, world_size), world_size)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


def val_batches(windows: Windows, micro_batch: int, rank: int, world_size: int, sequences: int) -> list[Batch]:
    """The fixed validation set of training: this rank's share of the first `sequences` windows of
    the unshuffled split, in micro-batches. The same set for any world size, and at every evaluation.
    """
    # Every rank runs as many forward passes: under ZeRO-3 each one gathers parameters from all ranks.
    assert sequences % (micro_batch * world_size) == 0
    if sequences > len(windows):
        raise CorpusError(
            f"{windows.blocks.dir}: the {windows.blocks.split} split has {len(windows)} windows of "
            f"{windows.seq_len} tokens, fewer than train.eval_sequences={sequences}"
        )
    return list(rank_batches(windows, sequences, micro_batch, rank, world_size))


def fitting_sequences(corpora: Mapping[str, Path], seq_len: int, per_pass: int) -> tuple[int, int, Path] | None:
    """The most validation sequences that every corpus's val split holds, a multiple of `per_pass` (micro-batch
    x world size), with the window count and the corpus that set it; None when no val split has a window."""
    counts = [(len(open_split(path, "val", seq_len)), path) for path in corpora.values()]
    windows, path = min(((n, path) for n, path in counts if n), default=(0, None), key=lambda c: c[0])
    return None if path is None else (windows // per_pass * per_pass, windows, path)


def validation_sets(corpora: Mapping[str, Path], seq_len: int, micro_batch: int, rank: int, world_size: int,
                    sequences: int) -> tuple[dict[str, list[Batch]], list[str]]:
    """Each corpus's validation batches (`val_batches`), by name, and a warning for each corpus
    left out because its validation split has no window of `seq_len` tokens (prepared with
    --val-fraction 0, or too small): such a corpus still trains, without validation.
    """
    sets, warnings = {}, []
    for name, path in corpora.items():
        windows = open_split(path, "val", seq_len)
        if len(windows) == 0:
            warnings.append(f"{path}: the val split has no window of {seq_len} tokens: validation of "
                            f"{name} is off (prepare it with --val-fraction > 0 for a val_loss)")
        else:
            sets[name] = val_batches(windows, micro_batch, rank, world_size, sequences)
    return sets, warnings
