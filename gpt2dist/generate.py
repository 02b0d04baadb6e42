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
from gpt2dist.models.gpt import KVCache
from gpt2dist.data.tokenizer import EOT, get_tokenizer


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row, from logits (B, vocab); returns (B, 1). Temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    if top_p is not None and top_p < 1.0:
        # Keep the most likely tokens whose total probability first reaches top_p.
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, vocab)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        sorted_logits[before >= top_p] = -float("inf")
        logits = torch.full_like(logits, -float("inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), num_samples=1, generator=generator).to(logits.device)  # (B, 1)


@torch.no_grad()
def generate(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None, top_p: float | None = None,
             stop_token: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """Append up to `max_new_tokens` sampled tokens to idx (B, T); returns (B, T + n).

    With `stop_token`, generation ends once every row has produced it; rows that stopped earlier
    are padded with it. `model` is a GPT, or a DeepSpeed engine wrapping one (then every rank must
    call this; at ZeRO-3 every rank runs as many steps, see `_all_stopped`). The KV cache gives the same tokens as recomputing the context every step; once
    the context outgrows block_size, each step recomputes the last block_size tokens, as without it.
    """
    gpt = getattr(model, "module", model)
    block_size = gpt.config.block_size
    B, T = idx.shape
    length = min(block_size, T + max_new_tokens)
    dtype = gpt.transformer.wte.weight.dtype
    cache = None
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        if not use_cache:
            logits, _ = model(idx[:, -block_size:])
        elif cache is not None and cache.pos < cache.length:
            logits, _ = model(idx[:, -1:], cache=cache)  # only the newest token is not cached yet
        else:  # the first step, or a full context: (re)fill the cache
            cache = KVCache(gpt.config, B, length, idx.device, dtype)
            logits, _ = model(idx[:, -length:], cache=cache)
        next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
        if stop_token is not None:
            next_id[finished] = stop_token
            finished |= next_id[:, 0] == stop_token
        idx = torch.cat((idx, next_id), dim=1)
        if stop_token is not None and _all_stopped(finished, model):
            break
    return idx


def _all_stopped(finished: torch.Tensor, model: torch.nn.Module) -> bool:
    """Whether every row has stopped; with a DeepSpeed engine at ZeRO-3 on several ranks, on every rank:
    each forward pass gathers the weights from all of them, so a rank whose rows stopped first keeps
    stepping (its rows padded with the stop token) rather than leave the others waiting in a forward
    pass it never runs."""
    stopped = finished.all()
    partitioned = getattr(model, "zero_optimization_partition_weights", None)
    if partitioned is not None and partitioned() and torch.distributed.get_world_size() > 1:
        stopped = stopped.to(torch.int32)
        torch.distributed.all_reduce(stopped, op=torch.distributed.ReduceOp.MIN)
    return bool(stopped)


def complete(model: torch.nn.Module, prompt: str, num_samples: int, max_new_tokens: int, temperature: float,
             top_k: int | None, top_p: float | None, generator: torch.Generator, device: torch.device | str,
             use_cache: bool = True) -> list[str]:
    """`num_samples` continuations of one prompt (text after the prompt, up to <|endoftext|>)."""
    enc = get_tokenizer()
    ids = enc.encode_ordinary(prompt) or [EOT]  # an empty prompt starts a new document
    idx = torch.tensor([ids] * num_samples, device=device)
    out = generate(model, idx, max_new_tokens, temperature, top_k, generator, top_p, EOT, use_cache)
    texts = []
    for row in out[:, len(ids):].tolist():
        if EOT in row:
            row = row[: row.index(EOT)]
        texts.append(enc.decode(row))
    return texts


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
