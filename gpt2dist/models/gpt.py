"""GPT-2 as published (Radford et al. 2019), in one file.

Parameter names follow OpenAI / Hugging Face (`transformer.wte`, `transformer.h.N.attn.c_attn`,
`transformer.ln_f`, `lm_head`), so weights map one to one onto `GPT2LMHeadModel`; the only
difference is that our linear layers are `nn.Linear` ((out, in) weights) where Hugging Face
uses `Conv1D` ((in, out) weights). `gpt2dist.models.hf` does that transpose.

A classifier (`GPTConfig.labels`) adds the `score` head of `GPT2ForSequenceClassification`: a
linear layer without bias on the hidden state of each row's last token that is not padding.

This module is single-device code: it never imports DeepSpeed. Parallelism, precision and
optimizer state are applied from outside by `gpt2dist.training.engine`.
"""

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gpt2dist.data.tokenizer import EOT
from gpt2dist.models.chunked_loss import chunked_lm_loss


@dataclass
class GPTConfig:
    """Shape of the network. Mirrors `conf/model/*.yaml` (see `gpt2dist.config.ModelConfig`)."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # context length: number of learned positions
    vocab_size: int = 50257  # the tokenizer's
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    # The embedding and LM head get vocab_size rounded up to a multiple of this (50257 -> 50304 at 64):
    # GPU matrix multiplies run at full speed only on such shapes. The extra rows are zero and unused.
    pad_vocab_multiple: int = 64
    # Hidden width of each distinct block's MLP; None: 4 * n_embd everywhere. Structured pruning narrows them.
    mlp_hidden: tuple[int, ...] | None = None
    # Consecutive layers that run one block's weights (ALBERT's cross-layer sharing); 1: every layer its own.
    share_layers: int = 1
    # A classifier's class names, in the order of the score head's rows; empty: a language model.
    labels: tuple[str, ...] = ()
    pad_token_id: int = EOT  # a classifier's padding, as Hugging Face's config.pad_token_id

    def __post_init__(self):
        assert self.n_layer % self.share_layers == 0, "share_layers must divide n_layer"
        self.labels = tuple(self.labels)
        if self.mlp_hidden is not None:
            self.mlp_hidden = tuple(self.mlp_hidden)
            assert len(self.mlp_hidden) == self.n_blocks, "mlp_hidden needs one width per distinct block"

    def shape(self) -> dict:
        """What decides whether weights fit this network (the vocabulary's padding aside)."""
        return {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size",
                                              "mlp_hidden", "share_layers", "labels")}

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def n_blocks(self) -> int:
        """Blocks with weights of their own: n_layer layers run them share_layers times each, in order."""
        return self.n_layer // self.share_layers

    def mlp_width(self, block: int) -> int:
        return 4 * self.n_embd if self.mlp_hidden is None else self.mlp_hidden[block]

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_multiple) * self.pad_vocab_multiple


# The largest shape a file from elsewhere (config.json, compress.json) may claim, far beyond any GPT-2 (XL: 48
# layers of 1600, 25 heads, 1024 positions): a claim past these is refused before the weights are looked at.
LIMITS = {"n_layer": 2**12, "n_head": 2**10, "n_embd": 2**16, "block_size": 2**20, "vocab_size": 2**22,
          "mlp_width": 2**20, "labels": 2**16}
_BLOCK = re.compile(r"transformer\.h\.(\d+)\.")


def shape_mismatch(config: GPTConfig, shapes: Mapping[str, Sequence[int]]) -> tuple[str | None, str] | None:
    """The GPTConfig field (n_layer, n_embd, vocab_size, block_size, mlp_hidden, labels) that weights of these
    shapes (by our names, from a file's header: nothing loaded) contradict, and how; None if they fit. The
    field is None where the weights lack a tensor that shows the shape. Only the embeddings, the MLPs' c_fc
    biases and the classifier's head are looked at: they are stored plainly in every layout (Hugging Face's
    transposed Conv1D weights and torchao's quantized parts aside), so that a claim of far more layers, width
    or vocabulary than the weights hold is refused before any model is built for it."""
    blocks = {int(m.group(1)) for name in shapes if (m := _BLOCK.match(name))}
    if blocks != set(range(config.n_blocks)):
        held = f"blocks 0 to {max(blocks)}" if blocks == set(range(len(blocks))) and blocks else \
            f"{len(blocks)} blocks"
        return "n_layer", (f"{config.n_layer:,}" + (f" ({config.n_blocks:,} blocks)" if config.share_layers > 1 else "")
                           + f", but the weights hold {held}")
    expected = {"transformer.wte.weight": None, "transformer.wpe.weight": ("block_size", config.block_size),
                **{f"transformer.h.{b}.mlp.c_fc.bias": ("mlp_hidden", config.mlp_width(b))
                   for b in range(config.n_blocks)}}
    if config.labels:
        expected["score.weight"] = ("labels", config.num_labels)
    for name, (field, value) in ((n, e or ("vocab_size", config.vocab_size)) for n, e in expected.items()):
        shape = tuple(shapes.get(name, ()))
        if not shape:
            return None, f"no {name}, which every {'classifier' if field == 'labels' else 'GPT-2'} has"
        rows = shape[0]
        if len(shape) != (1 if field == "mlp_hidden" else 2) or len(shape) == 2 and shape[1] != config.n_embd:
            return "n_embd", f"{config.n_embd:,}, but {name} is {shape}"
        if field == "vocab_size" and not config.vocab_size <= rows <= config.padded_vocab_size or \
                field != "vocab_size" and rows != value:
            return field, f"{value:,}, but {name} holds {rows:,}"
    return None


def pad_vocab(embedding: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """A token embedding (vocab_size or padded_vocab_size rows) with config's padded rows (zeros)."""
    rows = config.padded_vocab_size - embedding.shape[0]
    return embedding if rows == 0 else torch.cat([embedding, embedding.new_zeros(rows, embedding.shape[1])])


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual = True  # scaled at init, see GPT._init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        """kv: this layer's (keys, values, start) of a KVCache, when decoding incrementally."""
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv is None:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )  # (B, nh, T, hs)
        else:
            keys, values, start = kv
            keys[:, :, start : start + T] = k
            values[:, :, start : start + T] = v
            k, v = keys[:, :, : start + T], values[:, :, : start + T]  # (B, nh, start + T, hs)
            # The query at position start + i sees keys 0 .. start + i. (is_causal would align
            # the mask to the top left, which is wrong once start > 0.)
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, hidden)
        self.c_proj = nn.Linear(hidden, config.n_embd)
        self.c_proj.residual = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in Hugging Face).
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, mlp_hidden: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, mlp_hidden)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv)
        x = x + self.mlp(self.ln_2(x))
        return x


class KVCache:
    """Keys and values of the positions a GPT has already processed, so that decoding one more
    token costs one position's work instead of the whole context's.

    `pos` positions are filled; a forward pass with the cache appends its T positions.
    """

    def __init__(self, config: GPTConfig, batch_size: int, length: int, device: torch.device | str,
                 dtype: torch.dtype):
        assert length <= config.block_size, f"cache of {length} positions > block_size {config.block_size}"
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, length, hs)  # (L, B, nh, length, hs)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = length
        self.pos = 0


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.loss_chunk = 0  # > 0: the LM head and loss this many tokens at a time (see chunked_loss)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, config.mlp_width(b)) for b in range(config.n_blocks)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        if config.labels:
            self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        self.apply(self._init_weights)
        with torch.no_grad():
            # Padding rows stay zero: no token id reaches them and their logits are dropped, so
            # they get no gradient, and weight decay keeps zero at zero.
            self.transformer.wte.weight[config.vocab_size :].zero_()

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer)
        # because each block adds two of them to the residual stream.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual", False):
                std /= math.sqrt(2 * self.config.n_layer)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Parameters counted once (the tied LM head shares the token embedding), vocabulary padding excluded."""
        padding = (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        return sum(p.numel() for p in self.parameters()) - padding

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx: (B, T) token ids. Returns (logits (B, T, vocab), loss or None).

        With a cache, idx continues the cached positions (the cache is updated in place).
        With targets and loss_chunk > 0, the logits are never formed: returns (None, loss).
        A classifier returns (logits (B, num_labels), loss or None); its targets are labels (B,).
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        limit = cache.length if cache is not None else self.config.block_size
        assert start + T <= limit, f"{start} cached + {T} new tokens > {limit} positions"
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i in range(self.config.n_layer):
            block = self.transformer.h[i // self.config.share_layers]
            if cache is not None:
                x = block(x, (cache.keys[i], cache.values[i], start))
            elif self.gradient_checkpointing and self.training:
                # Recompute the block in backward instead of keeping its activations.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if self.config.labels:
            return self._classify(idx, x, targets)
        if targets is not None and self.loss_chunk > 0:
            return None, chunked_lm_loss(x, self.lm_head.weight, targets, self.config.vocab_size, self.loss_chunk)
        logits = self.lm_head(x)  # (B, T, padded vocab)
        # The padding columns leave the softmax as -inf, written in place: slicing them off instead
        # made the loss copy all of (B, T, vocab) and its gradient. No gradient is lost: the
        # softmax gives -inf columns a zero gradient, and their weight rows are zero anyway.
        logits.detach()[..., self.config.vocab_size :] = float("-inf")
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits[..., : self.config.vocab_size], loss

    def _classify(self, idx: torch.Tensor, x: torch.Tensor, labels: torch.Tensor | None):
        """The score head on the hidden state of each row's rightmost token that is not padding (as Hugging
        Face's GPT2ForSequenceClassification finds it), and the cross-entropy on `labels` (B,)."""
        B, T = idx.shape
        positions = torch.arange(T, device=idx.device)
        last = (positions * (idx != self.config.pad_token_id)).argmax(-1)  # (B,)
        logits = self.score(x[torch.arange(B, device=idx.device), last])  # (B, num_labels)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return logits, loss
