"""Weight mapping between gpt2dist's GPT and Hugging Face's `GPT2LMHeadModel`.

Names are the same on both sides; Hugging Face keeps the four linear layers of each block as
`Conv1D`, whose weights are stored (in, out), so those are transposed. Attention masks
(`attn.bias`, `attn.masked_bias`) that old Hugging Face checkpoints carry are buffers, not
weights, and are skipped.
"""

import torch

from gpt2dist.model import GPT, GPTConfig

# Suffixes of the Conv1D weights in Hugging Face's GPT-2.
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def config_from_hf(hf_config) -> GPTConfig:
    """A GPTConfig with the shape of a `transformers.GPT2Config`."""
    return GPTConfig(
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=hf_config.n_embd,
        block_size=hf_config.n_positions,
        vocab_size=hf_config.vocab_size,
        dropout=0.0,
        layer_norm_epsilon=hf_config.layer_norm_epsilon,
    )


def from_hf_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 weights -> our state dict (the tied lm_head included)."""
    ours = {}
    for name, tensor in hf_state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        ours[name] = tensor.t() if name.endswith(_TRANSPOSED) else tensor
    ours.setdefault("lm_head.weight", ours["transformer.wte.weight"])
    return ours


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights -> Hugging Face GPT-2 names and layouts."""
    return {
        name: (tensor.t() if name.endswith(_TRANSPOSED) else tensor).contiguous()
        for name, tensor in model.state_dict().items()
    }
