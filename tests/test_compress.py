"""Compression: quantized and pruned models keep what a model knows, load in every command, refuse bad
input, keep their sparsity through recovery training; shared layers train, resume and export."""

import json

import pytest
import torch
from lm_eval.api.instance import Instance
from transformers import GPT2LMHeadModel

from gpt2dist.commands.compress import main as compress_main
from gpt2dist.commands.evaluate import main as evaluate_main
from gpt2dist.commands.export import main as export_main
from gpt2dist.outputs import MARKER
from gpt2dist.fileio import sha256_of
from gpt2dist.commands.generate import main as generate_main
from gpt2dist.commands.lmeval import GPT2DistLM
from gpt2dist.models import compressed
from gpt2dist.models.gpt import GPT, GPTConfig
from gpt2dist.models.hf import export_hf
from gpt2dist.models.prune import prunable, sparsity
from gpt2dist.models.quantize import METHODS, linear_weight_bytes
from gpt2dist.models.weights import load_model
from tests.conftest import train


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """A small GPT (MLPs 256 wide: int4 groups of 32 fit) as a Hugging Face directory."""
    torch.manual_seed(0)
    return export_hf(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)), tmp_path_factory.mktemp("src") / "hf")


def compress(*args) -> None:
    assert compress_main([str(a) for a in args]) == 0


def relative_error(model: GPT, reference: GPT, idx: torch.Tensor) -> float:
    with torch.no_grad():
        out, ref = model(idx)[0].float(), reference(idx)[0]
    return ((out - ref).norm() / ref.norm()).item()


# Relative logit error allowed per method (measured: 0.005, 0.08, 0.008, 0.006, 0.0007) and the
# expected ratio of fp32 to quantized linear-weight bytes (int4 is kept in int8 on a CPU by torchao, and
# each group of 32 adds an fp32 scale and an int8 zero point).
EXPECTED = {"int8-weight": (0.02, 4), "int4-weight": (0.2, 4 / (1 + 5 / 32)), "int8-dynamic": (0.03, 4), "bf16": (0.02, 2),
            "fp16": (0.005, 2)}


@pytest.mark.parametrize("method", METHODS)
def test_quantized_model_round_trip(source_dir, tmp_path, method):
    out = tmp_path / method
    compress("quantize", source_dir, out, "--method", method)
    manifest = json.loads((out / "compress.json").read_text())
    assert manifest["method"] == method
    assert manifest["source_sha256"] == compressed.source_sha256(source_dir)
    assert sorted(p.name for p in out.iterdir()) == ["compress.json", MARKER, "merges.txt", "model.safetensors",
                                                     "tokenizer_config.json", "vocab.json"]  # nothing pickled
    model, fp32 = load_model(out), load_model(source_dir)
    max_error, ratio = EXPECTED[method]
    assert relative_error(model, fp32, torch.randint(0, 50257, (4, 32))) < max_error
    assert linear_weight_bytes(fp32) / linear_weight_bytes(model) == pytest.approx(ratio, rel=0.07)


def test_quantized_model_loads_in_every_command(source_dir, tmp_path, capsys):
    out = tmp_path / "int8"
    compress("quantize", source_dir, out, "--method", "int8-dynamic")
    capsys.readouterr()
    assert generate_main([str(out), "--prompt", "Alice likes", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("Alice likes") and len(printed.out.splitlines()[0]) > len("Alice likes")
    assert f"loaded {out}" in printed.err and "compressed: int8-dynamic" in printed.err
    text = tmp_path / "facts.txt"
    text.write_text("Alice likes deep red paint on the door. " * 40)
    assert evaluate_main([str(out), "--text", str(text), "--seq-len", "32", "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["text"]["perplexity"] > 1 and "compressed: int8-dynamic" in printed.err
    lm = GPT2DistLM(str(out), "cpu")
    assert "compressed: int8-dynamic" in capsys.readouterr().err
    assert len(lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("Alice likes paint.",), 0)])) == 1


def test_bad_input_one_line_exit_2(source_dir, tmp_path, capsys):
    quantized, other = tmp_path / "q", tmp_path / "theirs"
    compress("quantize", source_dir, quantized, "--method", "int8-weight")
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    before = sha256_of(quantized / "model.safetensors")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((source_dir / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes((source_dir / "model.safetensors").read_bytes()[:1000])
    cases = {
        ("quantize", source_dir, tmp_path / "a", "--method", "int3"): "--method",
        ("prune", source_dir, tmp_path / "a", "--sparsity", "1.5"): "--sparsity",
        ("prune-mlp", source_dir, tmp_path / "a", "--fraction", "-0.1", "--corpus", tmp_path): "--fraction",
        ("quantize", quantized, tmp_path / "a", "--method", "int4-weight"): "already quantized",
        ("quantize", source_dir, quantized, "--method", "bf16"): "pass --overwrite",
        ("quantize", source_dir, other, "--method", "bf16", "--overwrite"): "not an output gpt2dist wrote",
        ("quantize", corrupt, tmp_path / "a", "--method", "bf16"): "model.safetensors",
    }
    capsys.readouterr()
    for args, named in cases.items():
        assert exit_status([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and named in err, (args, err)
    assert not (tmp_path / "a").exists()
    assert sha256_of(quantized / "model.safetensors") == before and (other / "notes.txt").read_text() == "mine"


def exit_status(argv: list[str]) -> int:
    """compress's exit status, whether main returns it or argparse exits with it."""
    try:
        return compress_main(argv)
    except SystemExit as e:
        return e.code


def test_sparsity_is_exact_after_recovery_training(corpus, tmp_path):
    source = tiny_source(tmp_path / "hf")
    pruned = tmp_path / "pruned"
    compress("prune", source, pruned, "--sparsity", "0.6")
    before = load_model(pruned)
    zeros = {name: p == 0 for name, p in prunable(before).items()}
    assert sparsity(before, zeros) == pytest.approx(0.6, abs=1e-4)
    metrics = train(corpus, tmp_path / "run", f"train.init_from={pruned}")
    after = load_model(tmp_path / "run")
    assert metrics[-1]["loss"] < metrics[1]["loss"]  # it trained
    for name, p in prunable(after).items():
        assert torch.equal(p == 0, zeros[name]), name  # the same zeros, and no others
        assert not torch.equal(p, prunable(before)[name])  # the kept weights moved


def tiny_source(path):
    """A GPT of the shape of conftest.TINY, as a Hugging Face directory."""
    return export_hf(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)), path)


def test_structured_pruning_removes_neurons(corpus, tmp_path):
    out, source = tmp_path / "mlp", tiny_source(tmp_path / "hf")
    compress("prune-mlp", source, out, "--fraction", "0.25", "--corpus", corpus, "--sequences", "8",
             "--seq-len", "64")
    full, small = load_model(source), load_model(out)
    assert small.config.mlp_hidden == (96, 96)
    assert small.transformer.h[0].mlp.c_fc.weight.shape == (96, 32)
    assert small.transformer.h[1].mlp.c_proj.weight.shape == (32, 96)
    assert small.num_params() == full.num_params() - 2 * 32 * (32 + 32 + 1)
    # Removing a neuron equals zeroing it in the full model: the same logits.
    with torch.no_grad():
        for b_full, b_small in zip(full.transformer.h, small.transformer.h):
            kept = (b_full.mlp.c_fc.weight[:, None, :] == b_small.mlp.c_fc.weight[None]).all(-1).any(-1)
            assert kept.sum() == 96
            b_full.mlp.c_fc.bias[~kept] = -1e4  # GELU(-1e4) = 0
    idx = torch.randint(0, 50257, (2, 16))
    torch.testing.assert_close(small(idx)[0], full(idx)[0])
    hf_dir = tmp_path / "exported"
    assert export_main([str(out), str(hf_dir)]) == 0
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    torch.testing.assert_close(hf(idx).logits, small(idx)[0], atol=1e-4, rtol=1e-4)
    metrics = train(corpus, tmp_path / "run", f"train.init_from={out}", "model.mlp_hidden=[96,96]",
                    "train.max_steps=2")
    assert metrics[-1]["step"] == 2


def test_shared_layers_train_resume_and_export(corpus, tmp_path):
    run = tmp_path / "run"
    shared = ("model.n_layer=4", "model.share_layers=2")
    train(corpus, run, *shared, "train.max_steps=2", "optim.warmup_steps=1")
    metrics = train(corpus, run, *shared, "train.max_steps=4", "optim.warmup_steps=1")
    assert metrics[-1]["step"] == 4
    model = load_model(run)
    assert len(model.transformer.h) == 2 and model.config.n_layer == 4
    unshared = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    assert model.num_params() == unshared.num_params()
    assert export_main([str(run), str(tmp_path / "hf")]) == 0
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.n_layer == 4
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-4, rtol=1e-4)
