"""Evaluation of a trained model: loss and perplexity on a prepared corpus or raw text, and zero-
or few-shot multiple choice; the same, chosen by `evals.*`, as downstream evaluations during training.

    python -m gpt2dist.evaluate runs/gpt2 --corpus data/owt
    python -m gpt2dist.evaluate runs/gpt2 --text held_out/ 'more/*.md'
    python -m gpt2dist.evaluate runs/gpt2 --choices hellaswag_val.jsonl --fewshot-file hellaswag_train.jsonl --fewshot-k 5
    python -m gpt2dist.evaluate hf/gpt2 --sft data/qa --shots 3 --template 'Q: {prompt}\nA:'
    python -m gpt2dist.evaluate hf/gpt2 --adapter exported/lora-adapter --sft data/qa

`--sft` scores a generation task (a corpus of `python -m data_tools.sft`) by prompting: greedy
answers to the prompts of a split (test by default), zero-shot or after `--shots` solved train
examples, with the BLEU and chrF that fine-tuning reports (`gpt2dist.evals.generation`), so
prompting, full fine-tuning and LoRA compare on the same test split.

Multiple-choice files are JSON Lines in HellaSwag's format, one question a line:
`{"ctx": "A man sits down at a piano. He", "endings": ["plays a song.", ...], "label": 0}`
(`context` is accepted for `ctx`). Each ending is scored by its log-likelihood after the context
(prefixed with a space); `acc` takes the ending with the highest sum, `acc_norm` the highest
mean per token, which does not favour short endings. Few-shot prompting prepends k solved
questions from another file, each "context ending" followed by a blank line.

Raw text (`--text`: files, directories or glob patterns, read as `data_tools.prepare` reads
them) is tokenized into a temporary held-out corpus and scored whole, in windows of `--seq-len`.
Loss and perplexity are `gpt2dist.evals.loss`'s, the implementation behind the validation loss
of training: under `torchrun --nproc_per_node=N -m gpt2dist.evaluate ...` (or srun) each rank
scores its share of the windows and rank 0 prints the result, the same as one process's.
Multiple choice is scored whole on every rank.

`run_evals` runs the downstream evaluations an `EvalConfig` (`evals.*`) asks for; the trainer
calls it every `evals.interval` steps, beside its periodic validation loss (`val_loss`).
"""

import json
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2dist.arguments import Parser, non_negative, positive
from gpt2dist.errors import BadFile, Gpt2distError, report
from gpt2dist.training import dist
from gpt2dist.config import EvalConfig
from gpt2dist.data.prepare import prepare_corpus
from gpt2dist.data.tokenizer import get_tokenizer
from gpt2dist.safe_json import rows, shown
from gpt2dist.evals.generation import prompted_scores
from gpt2dist.evals.loss import corpus_loss, model_device


class EvalError(Gpt2distError, ValueError):
    """An evaluation that cannot run as asked (too few few-shot examples, too little text, ...); a malformed
    evaluation file is a BadFile, naming the line and the key."""


@dataclass
class MultipleChoice:
    context: str
    endings: list[str]
    label: int  # index of the right ending


def text_loss(model: torch.nn.Module, inputs: list[str], seq_len: int | None = None, batch_size: int = 8,
              max_sequences: int | None = None, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """`corpus_loss` of raw text files (files, directories or glob patterns), every document held out."""
    from data_tools.sources import Documents, input_files

    seq_len = seq_len or getattr(model, "module", model).config.block_size
    with tempfile.TemporaryDirectory(prefix="gpt2dist-text-") as tmp:
        try:
            corpus = Path(tmp) / "text"
            prepare_corpus(Documents(input_files(inputs)[0]), corpus, source=" ".join(inputs), val_fraction=1,
                           block_tokens=seq_len, progress=False, workers=1)
        except ValueError as e:  # unreadable input, or too little text for one window
            raise EvalError(str(e)) from None
        return corpus_loss(model, corpus, "val", seq_len, batch_size, max_sequences, rank, world_size)


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


def run_evals(model: torch.nn.Module, cfg: EvalConfig, seq_len: int | None = None,
              batch_size: int = 8) -> dict[str, float]:
    """The downstream evaluations `cfg` (`evals.*`) asks for, as metrics: eval_loss, eval_perplexity,
    mc_acc, mc_acc_norm.

    `model` is a GPT or a DeepSpeed engine; under ZeRO-3 every rank must call this, and each
    computes the whole (identical) result: a share of uneven size would leave ranks waiting on
    each other's forward passes. Puts the model in eval mode and back.
    """
    was_training, values = model.training, {}
    model.eval()
    try:
        if cfg.corpus:
            loss = corpus_loss(model, cfg.corpus, cfg.split, seq_len, batch_size, cfg.sequences)
            values.update(eval_loss=loss["loss"], eval_perplexity=loss["perplexity"])
        if cfg.choices:
            questions = read_choices(cfg.choices)[: cfg.choices_limit]
            shots = read_choices(cfg.fewshot_file) if cfg.fewshot_file and cfg.fewshot_k else []
            mc = multiple_choice(model, questions, shots, cfg.fewshot_k, cfg.seed)
            values.update(mc_acc=mc["acc"], mc_acc_norm=mc["acc_norm"])
    finally:
        model.train(was_training)
    return values


def main(argv: list[str] | None = None) -> int:
    from gpt2dist.models.weights import default_device, load_model

    p = Parser("python -m gpt2dist.evaluate", __doc__)
    p.add_argument("model", help="run directory, checkpoint directory or Hugging Face GPT-2 directory")
    p.add_argument("--adapter", help="an adapter directory in PEFT's format (adapter_config.json) to apply to the model")
    p.add_argument("--corpus", help="a prepared corpus (python -m data_tools.prepare) to score")
    p.add_argument("--text", nargs="+", metavar="INPUT",
                   help="raw text to score whole: files, directories or glob patterns (as data_tools.prepare reads)")
    p.add_argument("--split", default="val", help="corpus split (default: val)")
    p.add_argument("--seq-len", type=positive, help="tokens per scored window (default: the model's context)")
    p.add_argument("--max-sequences", type=positive, help="score only the first N windows")
    p.add_argument("--choices", help="multiple-choice JSONL (HellaSwag format)")
    p.add_argument("--limit", type=positive, help="score only the first N questions (or --sft examples)")
    p.add_argument("--fewshot-file", help="solved questions to draw few-shot examples from")
    p.add_argument("--fewshot-k", type=non_negative, default=0, help="examples prepended to each question (default: 0)")
    p.add_argument("--sft", help="a fine-tuning corpus (python -m data_tools.sft) whose --sft-split is answered")
    p.add_argument("--sft-split", default="test", help="split of --sft (default: test)")
    p.add_argument("--shots", type=non_negative, default=0, help="--sft: solved train examples before each prompt (default: 0)")
    p.add_argument("--template", default="{prompt}", help="--sft: the prompt's text, {prompt} marking it (default: {prompt})")
    p.add_argument("--max-new-tokens", type=positive, default=64, help="--sft: the longest answer (default: 64)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draw")
    p.add_argument("--batch-size", type=positive, default=8)
    p.add_argument("--device", help="default: cuda (under torchrun or srun, this rank's GPU) if there is one, else cpu")
    args = p.parse_args(argv)
    if not args.corpus and not args.text and not args.choices and not args.sft:
        p.error("nothing to evaluate: pass --corpus, --text, --choices and/or --sft")
    if "{prompt}" not in args.template:
        p.error("--template must hold {prompt}")
    if args.fewshot_k and not args.fewshot_file:
        p.error("--fewshot-k needs --fewshot-file")
    env = dist.detect()
    if env.world_size > 1:  # launched as several ranks: join them, as training does (one process needs no group)
        env = dist.init()
    try:
        questions = read_choices(args.choices)[: args.limit] if args.choices else []
        shots = read_choices(args.fewshot_file) if args.fewshot_file else []
        device = args.device or (f"cuda:{env.local_rank}" if default_device() == "cuda" else "cpu")
        model = load_model(args.model, device, adapter=args.adapter, language_model=True)
        results = {}
        if args.corpus:
            results[args.split] = corpus_loss(model, args.corpus, args.split, args.seq_len, args.batch_size,
                                              args.max_sequences, env.rank, env.world_size)
        if args.text:
            results["text"] = text_loss(model, args.text, args.seq_len, args.batch_size, args.max_sequences,
                                        env.rank, env.world_size)
        if questions:
            results["multiple_choice"] = multiple_choice(model, questions, shots, args.fewshot_k, args.seed)
        if args.sft:
            results[f"sft_{args.sft_split}"] = prompted_scores(model, args.sft, args.sft_split, args.shots, args.template,
                                                               args.seed, args.limit, args.max_new_tokens)
    except Gpt2distError as e:
        return report(e)
    finally:
        if env.world_size > 1:
            dist.close()
    if env.is_main:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
