"""Generation: the KV cache changes nothing but speed, greedy decoding equals Hugging Face's, and
the sampling filters keep only the tokens they should."""

import json

import pytest
import torch

from gpt2dist.commands.generate import main as generate_main
from gpt2dist.models.sampling import generate, sample_next
from gpt2dist.models.hf import export_hf
from gpt2dist.models.gpt import GPT, GPTConfig, KVCache
from tests.conftest import ROOT, from_hf, run_python
from tests.test_model import tiny_hf


def tiny_gpt(seed: int = 0, block_size: int = 64) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=block_size)).eval()


def prompt(seed: int, batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_incremental_logits_equal_full_forward():
    model, idx = tiny_gpt(), prompt(1, length=20)
    cache = KVCache(model.config, 2, 20, "cpu", torch.float32)
    with torch.no_grad():
        full = model(idx)[0]
        parts = [model(idx[:, :7], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, None, None), (1.0, None, None), (0.8, 50, 0.9)])
def test_cached_generation_equals_uncached(temperature, top_k, top_p):
    model, idx = tiny_gpt(2), prompt(3)
    runs = [generate(model, idx, 24, temperature, top_k, torch.Generator().manual_seed(4), top_p, use_cache=cache)
            for cache in (True, False)]
    assert torch.equal(*runs)


def test_cache_slides_like_uncached_past_the_context():
    """Past block_size both keep the last block_size tokens as context."""
    model, idx = tiny_gpt(5, block_size=16), prompt(6, length=10)
    cached, uncached = (generate(model, idx, 20, 0.0, use_cache=cache) for cache in (True, False))
    assert cached.shape == (2, 30) and torch.equal(cached, uncached)


def test_each_new_token_runs_one_position():
    model, idx = tiny_gpt(7), prompt(8, length=12)
    positions = []
    model.transformer.wte.register_forward_hook(lambda module, args, out: positions.append(args[0].size(1)))
    generate(model, idx, 6, 0.0)
    assert positions == [12, 1, 1, 1, 1, 1]  # the prompt once, then only the newest token


def test_greedy_equals_transformers_generate(tmp_path):
    hf = tiny_hf(seed=9)
    ours = from_hf(hf, tmp_path)
    idx = prompt(10, length=6)
    expected = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=30, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(ours, idx, 30, temperature=0.0), expected)


def test_stop_token_ends_each_row_and_generation():
    model, idx = tiny_gpt(11), prompt(12)
    free = generate(model, idx, 12, 0.0)[:, 8:].tolist()
    stop = free[0][3]  # a token row 0 produces by its 4th step
    ends = [row.index(stop) + 1 if stop in row else 12 for row in free]
    # Each row stops at its first `stop` and is padded with it; generation ends when all have stopped.
    expected = [row[:end] + [stop] * (max(ends) - end) for row, end in zip(free, ends)]
    assert generate(model, idx, 12, 0.0, stop_token=stop)[:, 8:].tolist() == expected


def test_filters():
    g = torch.Generator().manual_seed(13)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(200, 1)
    assert (sample_next(logits, 0.0) == 0).all()
    assert (sample_next(logits, 1.0, top_k=1, generator=g) == 0).all()
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).flatten().tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=g).flatten().tolist()) == {0, 1}  # 0.5 + 0.3 >= 0.7
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).flatten().tolist()) == {0}
    assert set(sample_next(logits, 1.0, generator=g).flatten().tolist()) == {0, 1, 2, 3}


def test_generate_command(tmp_path, capsys):
    model_dir = export_hf(tiny_gpt(14), tmp_path / "hf")
    (tmp_path / "prompts.txt").write_text("Once upon a time\n\nThe answer is\n")
    assert generate_main([str(model_dir), "--prompt", "Hello", "--prompts-file", str(tmp_path / "prompts.txt"),
                          "--max-new-tokens", "5", "--num-samples", "2", "--temperature", "0.9", "--top-p", "0.9"]) == 0
    out = capsys.readouterr().out
    blocks = out.split("-" * 40 + "\n")[:-1]
    starts = ["Hello", "Hello", "Once upon a time", "Once upon a time", "The answer is", "The answer is"]
    assert len(blocks) == 6 and all(b.startswith(p) for b, p in zip(blocks, starts))
    assert generate_main([str(model_dir), "--max-new-tokens", "5", "--num-samples", "2"]) == 0  # no prompt
    unprompted = capsys.readouterr().out.split("-" * 40 + "\n")[:-1]
    assert len(unprompted) == 2  # two unconditional samples (before: "error: no prompts")
    assert generate_main([str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nothing'}: no such file or directory\n"


def test_zero3_generation_runs_as_many_steps_on_every_rank():
    """Under ZeRO-3 each forward pass gathers the weights from every rank: a rank whose rows all stopped
    keeps stepping (padding with the stop token) until every rank's have, instead of leaving the others
    waiting in a forward pass it never runs."""
    result = run_python([str(ROOT / "tests" / "zero3_generate.py")], nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = dict(line.split(": ", 1) for line in result.stdout.splitlines() if line.startswith("rank "))
    (stop0, tokens0), (stop1, tokens1) = [(int(k.split()[-1]), json.loads(v)) for k, v in sorted(ranks.items())]
    assert tokens0 == [stop0] * len(tokens0) and len(tokens1) > 1 and stop1 not in tokens1[:-1]
    assert len(tokens0) == len(tokens1)
