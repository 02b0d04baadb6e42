"""Hugging Face directories in and out: checkpoints of every ZeRO stage export to a directory that
transformers loads with our logits, and Hugging Face GPT-2 directories load into gpt2dist."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel

from gpt2dist.commands.export import main as export_main
from gpt2dist.models.hf import config_from_hf
from gpt2dist.models.gpt import GPT, GPTConfig
from gpt2dist.evals.loss import corpus_loss
from gpt2dist.models.weights import WeightsError, checkpoint_weights, find_checkpoint, load_into, load_model
from tests.conftest import read_metrics, run_train, tiny_overrides, train
from tests.test_model import tiny_hf

RUNS = {
    "stage0": ["train.max_steps=2"],
    "stage0-bf16": ["train.max_steps=2", "train.precision=bf16"],
    "stage2": ["train.max_steps=2", "zero=stage2"],
}


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict:
    """Run directories of short real trainings: in this process, and ZeRO-3 on 2 ranks under torchrun."""
    dirs = {}
    for name, extra in RUNS.items():
        dirs[name] = tmp_path_factory.mktemp(name)
        train(corpus, dirs[name], *extra, "optim.lr=3e-3")
    dirs["stage3-2ranks"] = tmp_path_factory.mktemp("stage3")
    result = run_train(tiny_overrides(corpus, dirs["stage3-2ranks"], "train.max_steps=2", "zero=stage3",
                                      "optim.lr=3e-3"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return dirs


def tokens(seed: int, batch: int = 2, length: int = 64) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("run", ["stage0", "stage2", "stage3-2ranks"])
def test_loaded_checkpoint_reproduces_the_trainers_val_loss(corpus, runs, run):
    """The consolidated weights are the trained ones: the final val_loss the trainer logged (on the
    first 8 validation windows) comes out again from the loaded model."""
    model = load_model(runs[run])
    logged = read_metrics(runs[run])[-1]["val_loss"]
    assert corpus_loss(model, corpus, "val", seq_len=32, max_sequences=8)["loss"] == pytest.approx(logged, abs=1e-5)


@pytest.mark.parametrize("run", sorted([*RUNS, "stage3-2ranks"]))
def test_export_loads_in_transformers_with_our_logits(runs, tmp_path, capsys, run):
    assert export_main([str(runs[run]), str(tmp_path / "hf")]) == 0
    assert f"wrote {tmp_path / 'hf'}" in capsys.readouterr().out
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(runs[run])
    idx = tokens(1)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=1e-5, rtol=0)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied again on load


def test_bf16_checkpoint_exports_the_fp32_master_weights(runs):
    """Mixed precision keeps fp32 master weights in the optimizer: those are exported, not the
    bf16 copy the module holds."""
    weights = checkpoint_weights(find_checkpoint(runs["stage0-bf16"]))
    w = weights.tensor("transformer.h.0.attn.c_attn.weight")
    assert w.dtype == torch.float32 and not torch.equal(w, w.bfloat16().float())


def save_hf(hf: GPT2LMHeadModel, hf_dir, layout: str) -> None:
    """A Hugging Face directory as users download them: safetensors, sharded safetensors with their index, a
    legacy .bin, or OpenAI's gpt2 layout (a GPT2Model: no `transformer.` prefix, with the attention mask
    buffers)."""
    hf_dir.mkdir()
    hf.config.save_pretrained(hf_dir)
    if layout == "safetensors":
        state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    elif layout == "sharded":
        names = sorted(k for k in hf.state_dict() if k != "lm_head.weight")
        weight_map = {name: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, name in enumerate(names)}
        for file in set(weight_map.values()):
            save_file({n: hf.state_dict()[n].contiguous() for n, f in weight_map.items() if f == file}, hf_dir / file,
                      metadata={"format": "pt"})
        (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif layout == "bin":
        torch.save(hf.state_dict(), hf_dir / "pytorch_model.bin")
    else:
        state = dict(hf.transformer.state_dict())
        state.update({f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 64, 64)) for i in range(hf.config.n_layer)})
        torch.save(state, hf_dir / "pytorch_model.bin")


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "openai-gpt2"])
def test_import_hf_directory_gives_hf_logits(tmp_path, layout):
    hf = tiny_hf(seed=3)
    save_hf(hf, tmp_path / "hf", layout)
    ours = load_model(tmp_path / "hf")
    idx = tokens(2)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def test_init_from_hf_weights_for_continued_training(tmp_path):
    hf = tiny_hf(seed=5)
    save_hf(hf, tmp_path / "hf", "safetensors")
    model = load_into(GPT(config_from_hf(hf.config)), tmp_path / "hf").eval()
    idx = tokens(6)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)
    with pytest.raises(WeightsError, match="'n_embd': 64.* does not match .*'n_embd': 32"):
        load_into(GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=64)), tmp_path / "hf")


def test_export_import_round_trip_is_exact(runs, tmp_path):
    assert export_main([str(runs["stage2"]), str(tmp_path / "hf")]) == 0
    a, b = load_model(runs["stage2"]), load_model(tmp_path / "hf")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_init_from_another_vocabulary_padding(runs):
    """A padded run's weights load into an unpadded model, unchanged (HF directories, unpadded, load
    into padded models: test_init_from_hf_weights_for_continued_training)."""
    padded = load_model(runs["stage2"])
    unpadded = load_into(GPT(GPTConfig(**{**padded.config.__dict__, "pad_vocab_multiple": 1})), runs["stage2"])
    assert unpadded.transformer.wte.weight.shape[0] == 50257 < padded.transformer.wte.weight.shape[0]
    assert torch.equal(unpadded.transformer.wte.weight, padded.transformer.wte.weight[:50257])
    idx = tokens(7)
    with torch.no_grad():
        torch.testing.assert_close(unpadded.eval()(idx)[0], padded(idx)[0], atol=1e-6, rtol=0)


class RunsCode:
    def __reduce__(self):
        return (exec, ("open('pwned', 'w').write('')",))


def test_pickled_code_in_a_downloaded_checkpoint_is_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hf_dir = tmp_path / "hf"
    save_hf(tiny_hf(), hf_dir, "bin")
    state = torch.load(hf_dir / "pytorch_model.bin", weights_only=True)
    state["payload"] = RunsCode()  # unpickling it runs code
    torch.save(state, hf_dir / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="pytorch_model.bin: refused: it holds builtins.exec"):
        load_model(hf_dir)
    assert not (tmp_path / "pwned").exists()


def test_damaged_checkpoint_is_named(runs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["stage2"], run_dir)
    ckpt = find_checkpoint(run_dir)
    shard = next(ckpt.glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    assert export_main([str(run_dir), str(tmp_path / "out")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after DeepSpeed's progress notes
    assert last.startswith(f"error: {ckpt}: cannot consolidate the ZeRO-2 checkpoint")


def test_other_architectures_and_bad_paths_are_refused(tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    save_hf(tiny_hf(), hf_dir, "safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(WeightsError, match="config.json: activation_function: 'relu'"):
        load_model(hf_dir)
    with pytest.raises(WeightsError, match="no such file"):
        load_model(tmp_path / "missing")
    assert export_main([str(hf_dir), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {hf_dir}: not a gpt2dist run")


def test_exported_tokenizer_encodes_as_tiktoken(tmp_path):
    """AutoTokenizer loads from an exported directory and encodes raw text exactly as tiktoken's
    encode_ordinary (a literal <|endoftext|> is text, as in data preparation)."""
    from transformers import AutoTokenizer

    from gpt2dist.data.builtin_corpus import documents
    from gpt2dist.models.hf import export_hf
    from gpt2dist.data.tokenizer import EOT, VOCAB_SIZE, get_tokenizer

    export_hf(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)), tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    GPT2LMHeadModel.from_pretrained(tmp_path)  # the model from the same directory
    enc = get_tokenizer()
    texts = ["Héllo wörld 🤖 — 你好 ﬁ\r\n\n\n   spaces\t\ttabs  trailing   ", " it's 1234567 <|endoftext|>x",
             *(d for _, d in zip(range(40), documents("pydoc")))]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == enc.encode_ordinary(text), text[:80]
        assert tok.decode(ids) == text
    assert tok.eos_token_id == EOT and len(tok) == VOCAB_SIZE and tok.model_max_length == 64
