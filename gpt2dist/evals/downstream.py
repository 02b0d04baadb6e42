"""Downstream evaluations: those `evals.*` (an `EvalConfig`) asks for during training, and the loss of
raw text (`gpt2dist evaluate --text`).

The trainer calls `run_evals` every `evals.interval` steps (and at the last), beside its periodic
validation loss (`val_loss`). Each evaluation is a row of `EVALS`: the `evals.*` key that turns it
on, and a function of (model, evals config, seq_len, batch_size) returning its metrics. A new one
is a function, its row, and its keys in `gpt2dist.config.EvalConfig`.
"""

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from gpt2dist.config import EvalConfig
from gpt2dist.data.prepare import prepare_corpus
from gpt2dist.evals.choices import EvalError, multiple_choice, read_choices
from gpt2dist.evals.loss import corpus_loss


def text_loss(model: torch.nn.Module, documents: Iterable[str], source: str, seq_len: int | None = None,
              batch_size: int = 8, max_sequences: int | None = None, rank: int = 0,
              world_size: int = 1) -> dict[str, float]:
    """`corpus_loss` of raw text, every document held out: `documents` tokenized into a temporary corpus
    (`source` names them in its errors) and scored whole, in windows of `seq_len` (default: the model's
    context)."""
    seq_len = seq_len or getattr(model, "module", model).config.block_size
    with tempfile.TemporaryDirectory(prefix="gpt2dist-text-") as tmp:
        try:
            corpus = Path(tmp) / "text"
            prepare_corpus(documents, corpus, source=source, val_fraction=1, block_tokens=seq_len, progress=False,
                           workers=1)
        except ValueError as e:  # unreadable input, or too little text for one window
            raise EvalError(str(e)) from None
        return corpus_loss(model, corpus, "val", seq_len, batch_size, max_sequences, rank, world_size)


def corpus_eval(model: torch.nn.Module, cfg: EvalConfig, seq_len: int | None, batch_size: int) -> dict[str, float]:
    """`evals.corpus`: loss and perplexity of the first `evals.sequences` windows of its `evals.split`."""
    loss = corpus_loss(model, cfg.corpus, cfg.split, seq_len, batch_size, cfg.sequences)
    return {"eval_loss": loss["loss"], "eval_perplexity": loss["perplexity"]}


def choices_eval(model: torch.nn.Module, cfg: EvalConfig, seq_len: int | None, batch_size: int) -> dict[str, float]:
    """`evals.choices`: multiple-choice accuracy (summed and per-token mean log-likelihood), with
    `evals.fewshot_k` shots from `evals.fewshot_file`."""
    questions = read_choices(cfg.choices)[: cfg.choices_limit]
    shots = read_choices(cfg.fewshot_file) if cfg.fewshot_file and cfg.fewshot_k else []
    mc = multiple_choice(model, questions, shots, cfg.fewshot_k, cfg.seed)
    return {"mc_acc": mc["acc"], "mc_acc_norm": mc["acc_norm"]}


Eval = Callable[[torch.nn.Module, EvalConfig, int | None, int], dict[str, float]]

# The downstream evaluations, in the order they run: the `evals.*` key that turns each on, and its function.
EVALS: dict[str, Eval] = {"corpus": corpus_eval, "choices": choices_eval}


def run_evals(model: torch.nn.Module, cfg: EvalConfig, seq_len: int | None = None,
              batch_size: int = 8) -> dict[str, float]:
    """The downstream evaluations `cfg` (`evals.*`) turns on (see `EVALS`), as metrics: eval_loss,
    eval_perplexity, mc_acc, mc_acc_norm.

    `model` is a GPT or a DeepSpeed engine; under ZeRO-3 every rank must call this, and each
    computes the whole (identical) result: a share of uneven size would leave ranks waiting on
    each other's forward passes. Puts the model in eval mode and back.
    """
    was_training, values = model.training, {}
    model.eval()
    try:
        for key, evaluation in EVALS.items():
            if getattr(cfg, key):
                values.update(evaluation(model, cfg, seq_len, batch_size))
    finally:
        model.train(was_training)
    return values
