"""Sampling text from a model (temperature and top-k)."""

import torch


@torch.no_grad()
def generate(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Append `max_new_tokens` sampled tokens to idx (B, T); returns (B, T + max_new_tokens).

    `model` is a GPT, or a DeepSpeed engine wrapping one (then every rank must call this).
    """
    block_size = getattr(model, "module", model).config.block_size
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -block_size:])
        logits = logits[:, -1, :].float() / max(temperature, 1e-6)  # (B, vocab)
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("inf")
        probs = torch.softmax(logits, dim=-1)
        next_id = torch.multinomial(probs.cpu(), num_samples=1, generator=generator).to(idx.device)  # (B, 1)
        idx = torch.cat((idx, next_id), dim=1)
    return idx
