"""Sampling from a GPT (or a DeepSpeed engine wrapping one): temperature, top-k, top-p, stop at a token,
with a KV cache; and text continuations of a prompt, up to <|endoftext|>, as `gpt2dist generate`, the
SFT answers of `gpt2dist.evals.generation` and `gpt2dist lmeval`'s adapter take them."""

import torch

from gpt2dist.data.tokenizer import EOT, get_tokenizer
from gpt2dist.models.gpt import KVCache


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


def continuations(model: torch.nn.Module, ids: list[int], device: torch.device | str, num_samples: int = 1,
                  max_new_tokens: int = 64, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None,
                  use_cache: bool = True) -> list[str]:
    """`num_samples` continuations of the token ids `ids` (non-empty), sampled as one batch on `device`, each
    the text after `ids` up to <|endoftext|>. Temperature 0 is greedy."""
    idx = torch.tensor([ids] * num_samples, device=device)
    out = generate(model, idx, max_new_tokens, temperature, top_k, generator, top_p, EOT, use_cache)
    enc, texts = get_tokenizer(), []
    for row in out[:, len(ids):].tolist():
        texts.append(enc.decode(row[: row.index(EOT)] if EOT in row else row))
    return texts


def complete(model: torch.nn.Module, prompt: str, num_samples: int, max_new_tokens: int, temperature: float,
             top_k: int | None, top_p: float | None, generator: torch.Generator, device: torch.device | str,
             use_cache: bool = True) -> list[str]:
    """`num_samples` continuations of one prompt (text after the prompt, up to <|endoftext|>)."""
    ids = get_tokenizer().encode_ordinary(prompt) or [EOT]  # an empty prompt starts a new document
    return continuations(model, ids, device, num_samples, max_new_tokens, temperature, top_k, top_p, generator,
                         use_cache)
