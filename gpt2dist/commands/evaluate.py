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

Multiple-choice files (`gpt2dist.evals.choices`) are JSON Lines in HellaSwag's format, one question a line:
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
"""

import json
import sys

from data_tools.sources import Documents, input_files
from gpt2dist.arguments import Parser, non_negative, positive
from gpt2dist.errors import Gpt2distError, report
from gpt2dist.training import dist
from gpt2dist.evals.choices import multiple_choice, read_choices
from gpt2dist.evals.downstream import text_loss
from gpt2dist.evals.generation import prompted_scores
from gpt2dist.evals.loss import corpus_loss


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
            results["text"] = text_loss(model, Documents(input_files(args.text)[0]), " ".join(args.text), args.seq_len,
                                        args.batch_size, args.max_sequences, env.rank, env.world_size)
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
