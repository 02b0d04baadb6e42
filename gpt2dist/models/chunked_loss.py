"""The LM head and its loss, a chunk of tokens at a time: never all of (tokens, vocab) at once.

The plain path (`GPT.forward`) keeps the fp32 log-probabilities of every token over the whole
vocabulary for backward: 1024 x 50304 x 4 bytes = 197 MiB per 1024-token sequence, most of a
small model's activation memory. Here forward keeps only the LM head's input (tokens x n_embd),
and both passes compute the logits of `chunk` tokens at a time; backward computes them again.
The price is one more LM-head matrix multiply per step (3 -> 4), the trade gradient
checkpointing makes for the blocks.

The loss is the plain path's to the last bit: each token's log-probability comes from the same
kernels on the same row, and the mean goes through the same `nll_loss` summation. The gradients
agree to rounding: the head's weight gradient is summed chunk by chunk instead of in one matmul.
"""

import torch
import torch.nn.functional as F


def _log_probs(x: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(n, C) hidden states -> (n, padded vocab) fp32 log-probabilities, 0 probability on the padding."""
    logits = F.linear(x, weight)  # (n, Vp)
    logits[:, vocab_size:] = float("-inf")
    return F.log_softmax(logits.float(), dim=-1)


class ChunkedLMLoss(torch.autograd.Function):
    """Mean cross-entropy of softmax(x @ weight.T) (padding columns excluded) against targets."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, chunk: int):
        # x (N, C), weight (Vp, C), targets (N,)
        picked = torch.cat([_log_probs(x[s : s + chunk], weight, vocab_size).gather(1, targets[s : s + chunk, None])
                            for s in range(0, len(x), chunk)])  # (N, 1): each target's log-probability
        ctx.save_for_backward(x, weight, targets)
        ctx.vocab_size, ctx.chunk = vocab_size, chunk
        # nll_loss over one "class" sums exactly as cross_entropy's nll_loss does over the vocabulary.
        return F.nll_loss(picked, torch.zeros_like(targets))

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, targets = ctx.saved_tensors
        grad_x, grad_w = torch.empty_like(x), torch.zeros_like(weight)
        for s in range(0, len(x), ctx.chunk):
            xc, tc = x[s : s + ctx.chunk], targets[s : s + ctx.chunk]
            grad = _log_probs(xc, weight, ctx.vocab_size).exp_()  # (n, Vp): softmax
            grad[torch.arange(len(tc)), tc] -= 1  # d(-log p[target]) / d logits = softmax - one_hot
            grad = (grad * (grad_loss / len(x))).to(x.dtype)
            torch.mm(grad, weight, out=grad_x[s : s + ctx.chunk])
            grad_w.addmm_(grad.t(), xc)
        return grad_x, grad_w, None, None, None


def chunked_lm_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                    chunk: int) -> torch.Tensor:
    """Mean next-token loss of hidden states x (B, T, C) under the LM head `weight` (padded vocab, C),
    `chunk` tokens at a time; the same value as cross-entropy over the full logits."""
    return ChunkedLMLoss.apply(x.flatten(0, 1), weight, targets.flatten(), vocab_size, chunk)
