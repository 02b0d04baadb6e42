"""Sampling text from a model: temperature, top-k, top-p, stop at <|endoftext|>, with a KV cache.

    python -m gpt2dist.generate runs/gpt2-tiny --prompt "The meaning of" --max-new-tokens 40

The model is a gpt2dist run or checkpoint directory, or a Hugging Face GPT-2 directory
(see `gpt2dist.models.weights`), with `--adapter` an adapter in PEFT's format on it. Each prompt is generated on its own; `--num-samples` continuations
of one prompt run as one batch.
"""

import sys

import torch

from gpt2dist.arguments import Parser, positive
from gpt2dist.errors import Gpt2distError, report
from gpt2dist.models.sampling import complete


def main(argv: list[str] | None = None) -> int:
    from gpt2dist.models.weights import default_device, load_model

    p = Parser("python -m gpt2dist.generate", __doc__)
    p.add_argument("model", help="run directory, checkpoint directory or Hugging Face GPT-2 directory")
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt (repeat for several); with no prompt at all, unconditional samples")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--max-new-tokens", type=positive, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default: 0.8)")
    p.add_argument("--top-k", type=positive, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=positive, default=1, help="continuations per prompt")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    p.add_argument("--adapter", help="an adapter directory in PEFT's format (adapter_config.json) to apply to the model")
    p.add_argument("--device", default=default_device())
    args = p.parse_args(argv)
    prompts = list(args.prompt)
    try:
        if args.prompts_file:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        prompts = prompts or [""]  # no prompt: unconditional samples, each a new document
        model = load_model(args.model, args.device, adapter=args.adapter, language_model=True)
    except (Gpt2distError, OSError, UnicodeDecodeError) as e:
        return report(e)
    generator = torch.Generator().manual_seed(args.seed)
    for prompt in prompts:
        for text in complete(model, prompt, args.num_samples, args.max_new_tokens, args.temperature, args.top_k,
                             args.top_p, generator, args.device, use_cache=not args.no_cache):
            print(f"{prompt}{text}\n" + "-" * 40, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
