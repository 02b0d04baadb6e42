"""Multiple choice: questions in HellaSwag's format, scored by the log-likelihood of each ending after
the context, zero- or few-shot; and `continuation_logprobs`, the log-likelihoods behind it (and
behind `gpt2dist lmeval`'s adapter).

Multiple-choice files are JSON Lines, one question a line:
`{"ctx": "A man sits down at a piano. He", "endings": ["plays a song.", ...], "label": 0}`
(`context` is accepted for `ctx`). Each ending is scored by its log-likelihood after the context
(prefixed with a space); `acc` takes the ending with the highest sum, `acc_norm` the highest
mean per token, which does not favour short endings. Few-shot prompting prepends k solved
questions from another file, each "context ending" followed by a blank line.

A question is scored whole on every rank (under ZeRO-3 each forward pass gathers from all ranks).
"""

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2dist.data.tokenizer import get_tokenizer
from gpt2dist.errors import BadFile, Gpt2distError
from gpt2dist.evals.loss import model_device
from gpt2dist.safe_json import rows, shown


class EvalError(Gpt2distError, ValueError):
    """An evaluation that cannot run as asked (too few few-shot examples, too little text, ...); a malformed
    evaluation file is a BadFile, naming the line and the key."""


@dataclass
class MultipleChoice:
    context: str
    endings: list[str]
    label: int  # index of the right ending


@torch.no_grad()
def continuation_logprobs(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]],
                          batch_size: int = 8) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the continuation's log-likelihood after the context,
    and whether greedy decoding would produce it. Contexts must be non-empty; a pair longer than
    the model's context loses tokens from the start of its context.
    """
    block_size = getattr(model, "module", model).config.block_size
    device, results = model_device(model), []
    if any(len(cont) > block_size for _, cont in pairs):
        raise EvalError(f"a continuation is longer than the model's context of {block_size} tokens")
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        seqs = [(ctx + cont)[-(block_size + 1) :][:-1] for ctx, cont in chunk]  # model inputs
        width = max(len(s) for s in seqs)
        # Right padding: causal attention keeps the pads from touching earlier positions.
        idx = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
        logprobs = torch.log_softmax(model(idx)[0].float(), dim=-1)  # (B, width, vocab)
        for row, (seq, (_, cont)) in enumerate(zip(seqs, chunk)):
            n = len(cont)
            lp = logprobs[row, len(seq) - n : len(seq)]  # (n, vocab): the positions predicting cont
            target = torch.tensor(cont, device=device)
            total = lp.gather(1, target[:, None]).sum().item()
            results.append((total, bool((lp.argmax(dim=-1) == target).all())))
    return results


def read_choices(path: str | Path) -> list[MultipleChoice]:
    """Questions from a multiple-choice JSONL file (see the module docstring), each row read by
    `gpt2dist.safe_json` and checked (BadFile naming the line and the key)."""
    path, questions = Path(path), []
    try:
        with open(path, "rb") as f:
            for where, raw in rows(f, path):
                if isinstance(raw, BadFile):
                    raise raw
                questions.append(_question(raw, where))
    except OSError as e:
        raise BadFile(path, f"unreadable ({e.strerror or e})") from None
    if not questions:
        raise BadFile(path, "no questions")
    return questions


def _question(raw: dict, where: str) -> MultipleChoice:
    """A row of a multiple-choice file as a question: a non-empty context, a list of endings (strings),
    and the index of the right one (an integer, or the string of one, as Hugging Face's HellaSwag has it)."""
    context_key = "context" if "context" in raw and "ctx" not in raw else "ctx"
    for key in (context_key, "endings", "label"):
        if key not in raw:
            raise BadFile(where, "missing: a question has ctx (or context), endings and label", key)
    context, endings, label = raw[context_key], raw["endings"], raw["label"]
    if not isinstance(context, str) or not context:
        raise BadFile(where, f"{'empty' if context == '' else shown(context) + ' is not a string'} (the endings are "
                             "scored after it)", context_key)
    if not isinstance(endings, list) or not endings or not all(isinstance(e, str) for e in endings):
        raise BadFile(where, f"{shown(endings)} is not a list of strings", "endings")
    if isinstance(label, str) and label.isascii() and label.isdigit() and len(label) <= 18:
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise BadFile(where, f"{shown(label)} is not the index of one of the {len(endings)} endings", "label")
    return MultipleChoice(context, endings, label)


def fewshot_prompt(question: MultipleChoice, shots: list[MultipleChoice]) -> str:
    """The context to score the endings after: the solved shots, then the question's context."""
    return "".join(f"{s.context} {s.endings[s.label]}\n\n" for s in shots) + question.context


def multiple_choice(model: torch.nn.Module, questions: list[MultipleChoice], fewshot: list[MultipleChoice] = (),
                    k: int = 0, seed: int = 1234) -> dict[str, float]:
    """Accuracy by summed (`acc`) and per-token mean (`acc_norm`) log-likelihood of the endings.

    Each question gets its own k shots, drawn from `fewshot` (never the question itself).
    """
    enc, rng = get_tokenizer(), random.Random(seed)
    correct = correct_norm = 0
    for q in questions:
        pool = [s for s in fewshot if s != q]
        if k > len(pool):
            raise EvalError(f"{k} few-shot examples asked for, but only {len(pool)} are available")
        context = enc.encode_ordinary(fewshot_prompt(q, rng.sample(pool, k)))
        endings = [enc.encode_ordinary(" " + e) for e in q.endings]
        scores = [total for total, _ in continuation_logprobs(model, [(context, e) for e in endings])]
        correct += max(range(len(scores)), key=scores.__getitem__) == q.label
        norm = [s / len(e) for s, e in zip(scores, endings)]
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == q.label
    return {"acc": correct / len(questions), "acc_norm": correct_norm / len(questions), "questions": len(questions)}
