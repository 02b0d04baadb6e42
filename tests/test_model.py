"""The model is GPT-2: parameter counts as published and logits equal to Hugging Face's."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2dist.config import CONF_DIR, load_model_preset
from gpt2dist.models.gpt import GPT, GPTConfig
from gpt2dist.models.hf import export_hf
from gpt2dist.models.weights import load_into
from tests.conftest import from_hf

PUBLISHED = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


def tiny_hf(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=50257,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(cfg).eval()
    # Random, non-default LayerNorm parameters so a missed mapping cannot hide.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln_" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return hf


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_gpt2(name):
    cfg = load_model_preset(name)
    with torch.device("meta"):  # shapes only: no memory for 1.5B parameters
        model = GPT(cfg)
    assert model.num_params() == PUBLISHED[name]


def test_all_presets_listed():
    assert set(PUBLISHED) | {"gpt2-tiny"} == {p.stem for p in (CONF_DIR / "model").glob("*.yaml")}


def test_hf_to_ours_logits_match(tmp_path):
    hf = tiny_hf()
    ours = from_hf(hf, tmp_path)
    idx = torch.randint(0, 50257, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def test_ours_to_hf_logits_match(tmp_path):
    """Through the export path: a Hugging Face directory that from_pretrained loads."""
    torch.manual_seed(2)
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)
    ours = GPT(cfg).eval()
    hf = GPT2LMHeadModel.from_pretrained(export_hf(ours, tmp_path)).eval()
    idx = torch.randint(0, 50257, (3, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=1e-5, rtol=0)
    # The head stays tied on both sides after loading.
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()


def test_loss_is_next_token_cross_entropy_like_hf(tmp_path):
    hf = tiny_hf(seed=4)
    ours = from_hf(hf, tmp_path)
    idx = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, loss = ours(idx[:, :-1], idx[:, 1:])
        hf_loss = hf(idx, labels=idx).loss  # HF shifts labels itself
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(6)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))
    idx = torch.randint(0, 50257, (2, 16))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(idx, idx)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_init_scales_residual_projections():
    torch.manual_seed(7)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=32))
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 8) ** 0.5) < 1e-3
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 1e-3


def test_padded_vocabulary_changes_nothing_but_the_shape(tmp_path):
    """The embedding has 50304 rows (a multiple of 64); logits, loss and gradients are those of
    the same model without padding, and the padding rows get no gradient."""
    hf = tiny_hf(seed=8)
    padded = from_hf(hf, tmp_path / "hf")
    plain = load_into(GPT(GPTConfig(**{**padded.config.__dict__, "pad_vocab_multiple": 1})), tmp_path / "hf").eval()
    assert padded.transformer.wte.weight.shape[0] == 50304 and plain.transformer.wte.weight.shape[0] == 50257
    assert padded.num_params() == plain.num_params()
    idx = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(9))
    (logits_p, loss_p), (logits_u, loss_u) = (m(idx[:, :-1], idx[:, 1:]) for m in (padded, plain))
    assert logits_p.shape == logits_u.shape == (2, 32, 50257)
    torch.testing.assert_close(logits_p, logits_u, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_p, loss_u, atol=1e-6, rtol=0)
    loss_p.backward(), loss_u.backward()
    grad = padded.transformer.wte.weight.grad
    assert torch.count_nonzero(grad[50257:]) == 0
    torch.testing.assert_close(grad[:50257], plain.transformer.wte.weight.grad, atol=1e-6, rtol=0)
    assert torch.count_nonzero(GPT(padded.config).transformer.wte.weight[50257:]) == 0  # initialised to zero
    exported = GPT2LMHeadModel.from_pretrained(export_hf(padded, tmp_path / "exported"))
    assert exported.transformer.wte.weight.shape == (50257, 64)


def sliced_cross_entropy(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss as first written: logits sliced to the vocabulary, then reshaped (a copy)."""
    pos = torch.arange(idx.shape[1])
    x = model.transformer.wte(idx) + model.transformer.wpe(pos)
    for block in model.transformer.h:
        x = block(x)
    logits = model.lm_head(model.transformer.ln_f(x))[..., : model.config.vocab_size]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def loss_and_grads(model: GPT, loss_fn, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    loss = loss_fn(model, idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def tiny_gpt(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))


def test_loss_and_gradients_are_those_of_the_sliced_logits_to_the_last_bit():
    """Masking the padding columns in place changed the loss's memory traffic, not one bit of
    its value or of any gradient (the golden loss curve depends on it)."""
    model = tiny_gpt(10)
    idx = torch.randint(0, 50257, (3, 25), generator=torch.Generator().manual_seed(11))
    loss, grads = loss_and_grads(model, lambda m, x, y: m(x, y)[1], idx)
    ref_loss, ref_grads = loss_and_grads(model, sliced_cross_entropy, idx)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_loss_never_copies_the_logits():
    """No copy of (tokens, vocab) floats in forward or backward: the LM head's output and its
    gradient are the largest tensors of a small model's step, and copying them cost ~15%."""
    model = tiny_gpt(12)
    idx = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(13))
    big = 2 * 32 * 50257  # elements of the logits
    with torch.profiler.profile(record_shapes=True) as prof:
        model(idx[:, :-1], idx[:, 1:])[1].backward()
    copies = [e for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
              and any(torch.Size(s).numel() >= big for s in e.input_shapes if s)]
    assert not copies, [(e.name, e.input_shapes) for e in copies]


@pytest.mark.parametrize("chunk", [24, 1000])  # not dividing the 64 tokens, more than all of them
def test_chunked_loss_equals_the_plain_loss(chunk):
    """model.loss_chunk: the same loss to the last bit, the same gradients to rounding, padding
    rows still without gradient, and no logits returned."""
    model = tiny_gpt(14)
    idx = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(15))
    plain_loss, plain_grads = loss_and_grads(model, lambda m, x, y: m(x, y)[1], idx)
    model.loss_chunk = chunk
    logits, _ = model(idx[:, :-1], idx[:, 1:])
    assert logits is None
    loss, grads = loss_and_grads(model, lambda m, x, y: m(x, y)[1], idx)
    assert torch.equal(loss, plain_loss)
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    assert torch.count_nonzero(model.transformer.wte.weight.grad[50257:]) == 0


def test_chunked_loss_keeps_no_logits_for_backward():
    """What forward keeps for backward shrinks from the fp32 log-probabilities of every token
    over the vocabulary (64 x 50304 x 4 bytes here) to the LM head's input."""
    model = tiny_gpt(16)
    idx = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(17))

    def saved(chunk: int) -> int:
        model.loss_chunk = chunk
        sizes = {}

        def pack(t):
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(idx[:, :-1], idx[:, 1:])
        return sum(sizes.values()) - model.transformer.wte.weight.nbytes

    assert saved(0) > 64 * 50304 * 4 > 10 * saved(16)
