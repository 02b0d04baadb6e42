"""Scores of a classifier (task=classify) on a split of a classification corpus: the cross-entropy on
the labels, accuracy and macro-F1. The trainer's dev evaluation (val_accuracy, val_macro_f1) and
its final test evaluation both score here.

Each rank fills a confusion matrix with its share of the batches, and one all-reduce adds the
ranks' matrices up: the scores are the same on any number of ranks, and no prediction is gathered.
"""

from collections.abc import Iterable

import torch

from gpt2dist.data.sft import IGNORE
from gpt2dist.evals.loss import Batch, model_device


def confusion_scores(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 of a confusion matrix (row: true label, column: predicted label). Macro-F1
    is the mean F1 over the labels that occur as a true label or a prediction, as scikit-learn's
    `f1_score(average="macro")` takes it."""
    tp = confusion.diag()
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    occurs = tp + fp + fn > 0
    f1 = 2 * tp[occurs] / (2 * tp + fp + fn)[occurs]
    return {"accuracy": float(tp.sum() / confusion.sum()), "macro_f1": float(f1.mean())}


@torch.no_grad()
def scores(model: torch.nn.Module, batches: Iterable[Batch], num_labels: int, world_size: int = 1) -> dict[str, float]:
    """Mean loss, accuracy and macro-F1 of a classifier over every rank's `batches` ((inputs, labels) pairs,
    this rank's share: `gpt2dist.evals.loss.rank_batches`, which gives every rank as many, as
    ZeRO-3 needs; its padding batch's labels are all IGNORE and count for nothing here); with several
    ranks every rank calls this. `model` is a classifier GPT or a DeepSpeed engine; its mode (eval or
    train) is the caller's."""
    device = model_device(model)
    counts = torch.zeros(num_labels * num_labels + 1, dtype=torch.float64, device=device)  # the matrix, the loss sum
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits, loss = model(x, y)
        kept = y != IGNORE
        if kept.any():
            counts[:-1] += torch.bincount(y[kept] * num_labels + logits.argmax(-1)[kept], minlength=num_labels**2)
            counts[-1] += loss.double() * kept.sum()
    if world_size > 1:
        torch.distributed.all_reduce(counts)
    confusion = counts[:-1].view(num_labels, num_labels)
    return {"loss": float(counts[-1] / confusion.sum()), **confusion_scores(confusion)}
