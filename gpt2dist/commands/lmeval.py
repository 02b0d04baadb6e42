"""lm-evaluation-harness (`pip install lm-eval`) on gpt2dist models, with no Hugging Face export.

    python -m gpt2dist.lmeval runs/gpt2 --tasks hellaswag,lambada_openai --num-fewshot 0
    python -m gpt2dist.lmeval runs/gpt2 --tasks my_task --include-path my_tasks/

The model is anything `gpt2dist.models.weights.load_model` reads (with `--adapter`, or the model
argument `adapter=`, an adapter in PEFT's format on it). `GPT2DistLM` is registered with
lm-eval as "gpt2dist" (`model_args="pretrained=runs/gpt2"`) once this module is imported, for
use from Python through `lm_eval.simple_evaluate`. lm-eval downloads its standard tasks' data
from the Hugging Face hub; tasks of your own can read local files (`dataset_path: json`).
"""

import difflib
import json
import sys

import torch
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from gpt2dist.arguments import Parser, non_negative, positive
from gpt2dist.errors import Gpt2distError, report
from gpt2dist.evals.choices import continuation_logprobs
from gpt2dist.models.sampling import continuations
from gpt2dist.data.tokenizer import EOT, get_tokenizer
from gpt2dist.models.weights import WeightsError, default_device, load_model


@register_model("gpt2dist")
class GPT2DistLM(TemplateLM):
    """lm-eval's model interface over a gpt2dist GPT: log-likelihoods, rolling log-likelihoods
    (perplexity tasks) and greedy or sampled generation."""

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str | None = 8,
                 max_batch_size: int | None = None, adapter: str | None = None):
        super().__init__()
        self.device_name = device or default_device()
        self.model = load_model(pretrained, self.device_name, adapter=adapter, language_model=True)
        self.block_size = self.model.config.block_size
        # lm-eval passes "auto" for automatic batch sizes; we take a fixed one.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.enc = get_tokenizer()

    @property
    def eot_token_id(self) -> int:
        return EOT

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.enc.encode_ordinary(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return continuation_logprobs(self.model, [(ctx, cont) for _, ctx, cont in requests], self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of the model's context."""
        results = []
        for (text,) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=EOT, max_seq_len=self.block_size, context_len=1)]
            results.append(sum(total for total, _ in continuation_logprobs(self.model, windows, self.batch_size)))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations cut before the first of the `until` strings (or <|endoftext|>)."""
        results = []
        for context, kwargs in (r.args for r in requests):
            kwargs = dict(kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = kwargs.pop("max_gen_toks", 256)
            temperature = kwargs.pop("temperature", 0.0) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-self.block_size :] or [EOT]
            text, = continuations(self.model, ids, self.device_name, 1, max_new, temperature, kwargs.pop("top_k", None),
                                  kwargs.pop("top_p", None), torch.Generator().manual_seed(1234))
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
        return results


def check_tasks(tasks: list[str], task_manager: TaskManager) -> None:
    """Refuse task names lm-eval does not know (its own, or under --include-path), suggesting the nearest."""
    known = task_manager.all_tasks
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else " (see `lm-eval ls tasks`, or --include-path)"
            raise WeightsError(f"--tasks: unknown lm-eval task {task!r}{hint}")


def main(argv: list[str] | None = None) -> int:
    p = Parser("python -m gpt2dist.lmeval", __doc__)
    p.add_argument("model", help="run directory, checkpoint directory or Hugging Face GPT-2 directory")
    p.add_argument("--adapter", help="an adapter directory in PEFT's format (adapter_config.json) to apply to the model")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="a directory of task YAML files of your own")
    p.add_argument("--num-fewshot", type=non_negative, default=None)
    p.add_argument("--limit", type=float, default=None, help="examples per task (or a fraction, below 1)")
    p.add_argument("--batch-size", type=positive, default=8)
    p.add_argument("--device", default=default_device())
    p.add_argument("--output", help="write lm-eval's results here as JSON")
    args = p.parse_args(argv)
    tasks = args.tasks.split(",")
    task_manager = TaskManager(include_path=args.include_path)
    try:
        check_tasks(tasks, task_manager)  # before the model is loaded: a typo fails in seconds
        lm = GPT2DistLM(args.model, args.device, args.batch_size, adapter=args.adapter)
    except Gpt2distError as e:
        return report(e)
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                              task_manager=task_manager, log_samples=False)
    print(json.dumps(results["results"], indent=1, default=str))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
