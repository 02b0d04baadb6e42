"""Adapting a GPT-2 to a task: SFT examples prepared with a loss mask, fine-tuning from a Hugging Face
directory with dev BLEU/chrF, the best checkpoint and a test evaluation, and LoRA/IA3 through peft:
adapter-only checkpoints that resume exactly, a changed base refused, and exports that peft and
transformers load with our logits."""

import json
import math
import os
import runpy
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import GPT2Config, GPT2LMHeadModel

from data_tools.sft import main as sft_main
from gpt2dist import safe_load
from gpt2dist.data.loader import open_split
from gpt2dist.data.sft import IGNORE
from gpt2dist.data.shards import CorpusError
from gpt2dist.config import ConfigError
from gpt2dist.data.tokenizer import EOT, get_tokenizer
from gpt2dist.commands.export import main as export_main
from gpt2dist.models.weights import load_model
from gpt2dist.training.checkpoint import CHECKPOINTS, CheckpointError
from tests.conftest import ROOT, TINY, read_metrics, run_train, train, train_cfg, without_timing
from tests.test_faults import kill_repeatedly, resumed_steps
from tests.test_hf_interop import save_hf, tokens
from tests.test_model import tiny_hf

WORDS = ["apple", "banana", "cherry", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"]


def rows(words: list[str]) -> str:
    return "".join(json.dumps({"prompt": f"Reverse {w}:", "response": f" {w[::-1]}"}) + "\n" for w in words)


@pytest.fixture(scope="module")
def sft_corpus(tmp_path_factory):
    """Reverse-a-word examples, split by files: 24 train, 4 dev, 5 test (uneven over 2 ranks), 16 tokens each."""
    d = tmp_path_factory.mktemp("sft")
    for name, words in (("train", WORDS * 2), ("dev", WORDS[:4]), ("test", WORDS[4:9])):
        (d / f"{name}.jsonl").write_text(rows(words))
    out = d / "corpus"
    assert sft_main(["--output", str(out), "--seq-len", "16", "--train", str(d / "train.jsonl"),
                     "--dev", str(d / "dev.jsonl"), "--test", str(d / "test.jsonl")]) == 0
    return out


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A tiny Hugging Face GPT-2 directory: the pretrained model to adapt."""
    out = tmp_path_factory.mktemp("base") / "hf"
    save_hf(tiny_hf(seed=1), out, "safetensors")
    return out


def sft_overrides(corpus, base, run_dir, *extra) -> list[str]:
    return [*TINY, "model.n_head=4", "model.n_embd=64", "data.seq_len=16", "task=sft", "task.generate_examples=2",
            "task.max_new_tokens=6", "train.sample_tokens=0", "train.eval_sequences=4", f"data.path={corpus}", f"train.init_from={base}",
            f"train.run_dir={run_dir}", *extra]


def test_examples_are_scored_on_the_response_only(sft_corpus):
    manifest = json.loads((sft_corpus / "manifest.json").read_text())
    assert manifest["task"] == "sft" and manifest["examples"] == {"train": 24, "val": 4, "test": 5}
    enc = get_tokenizer()
    examples = open_split(sft_corpus, "train", 16)
    for i in range(len(examples)):
        x, y = examples[i]
        scored = y[y != IGNORE].tolist()
        assert scored[-1] == EOT and enc.decode(scored[:-1]) == f" {WORDS[i % 12][::-1]}"
        assert enc.decode(x[1 : len(enc.encode_ordinary(f"Reverse {WORDS[i % 12]}:")) + 1].tolist()) == \
            f"Reverse {WORDS[i % 12]}:"


def test_hash_split_is_stable_and_counted(tmp_path):
    (tmp_path / "all.jsonl").write_text(rows([w + str(n) for n in range(5) for w in WORDS]))
    splits = []
    for out in ("a", "b"):
        assert sft_main(["--output", str(tmp_path / out), "--seq-len", "16", str(tmp_path / "all.jsonl")]) == 0
        splits.append(json.loads((tmp_path / out / "manifest.json").read_text())["examples"])
    assert splits[0] == splits[1] and sum(splits[0].values()) == 60 and min(splits[0].values()) > 0


@pytest.mark.parametrize("row, why", [
    ('{"prompt": "Reverse x:"}', "no string field 'response'"),
    ('{"prompt": "Reverse x:", "response": "  "}', "empty response"),
    (json.dumps({"prompt": "word " * 40, "response": "x"}), "leaves no room for a response"),
    ('{"prompt": "Reverse x:", ', "malformed JSON"),
    ('{"prompt": "Reverse x:", "response": "x", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
])
def test_bad_row_is_one_line_naming_file_and_line_and_writes_nothing(tmp_path, capsys, row, why):
    path = tmp_path / "rows.jsonl"
    path.write_text(rows(WORDS[:3]) + row + "\n")
    assert sft_main(["--output", str(tmp_path / "out"), "--seq-len", "16", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:4: ") and why in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    assert sft_main(["--output", str(tmp_path / "out"), "--seq-len", "16", "--skip-bad", str(path)]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped_inputs"] == 1


def test_task_and_corpus_must_agree(corpus, sft_corpus, hf_base, tmp_path):
    with pytest.raises(CorpusError, match="use task=sft"):
        train(sft_corpus, tmp_path / "a", "data.seq_len=16")
    with pytest.raises(CorpusError, match="use task=pretrain"):
        train_cfg(sft_overrides(corpus, hf_base, tmp_path / "b"), tmp_path / "b")


def test_sft_from_hf_keeps_the_best_and_scores_the_test_split(sft_corpus, hf_base, tmp_path):
    run_dir = tmp_path / "run"
    overrides = sft_overrides(sft_corpus, hf_base, run_dir, "train.epochs=1", "train.keep_best=val_loss",
                              "train.ckpt_interval=0", "train.keep_last=1", "optim.warmup_steps=1")
    metrics = train_cfg([o for o in overrides if not o.startswith("train.max_steps=")], run_dir)  # epochs set it
    steps = math.ceil(24 / 4)  # one epoch of 24 examples, 4 per step
    assert max(m["step"] for m in metrics) == steps
    dev = [m for m in metrics if "val_bleu" in m]
    assert dev and all(0 <= m["val_chrf"] <= 100 for m in dev)
    best = min((m for m in dev if m["step"] > 0), key=lambda m: m["val_loss"])
    best_tag = (run_dir / CHECKPOINTS / "best").read_text()
    assert best_tag == f"step_{best['step']:08d}" and (run_dir / CHECKPOINTS / best_tag / "checkpoint.json").is_file()
    result = json.loads((run_dir / "test.json").read_text())
    assert result["checkpoint"] == best_tag and result["examples"] == 5
    assert {"test_loss", "test_bleu", "test_chrf"} <= result.keys() and math.isfinite(result["test_loss"])


def adapter_run(sft_corpus, base, run_dir, *extra):
    return train_cfg(sft_overrides(sft_corpus, base, run_dir, "task.test=false", "optim.lr=1e-2", *extra), run_dir)


def test_lora_checkpoint_holds_the_adapters_and_resumes_exactly(sft_corpus, hf_base, tmp_path):
    extra = ["peft=lora", "peft.dropout=0.1", "train.max_steps=4"]
    full = adapter_run(sft_corpus, hf_base, tmp_path / "full", *extra)
    module = safe_load.load(tmp_path / "full" / CHECKPOINTS / "step_00000004" / "mp_rank_00_model_states.pt",
                            CheckpointError)["module"]
    assert module and all(".lora_" in name for name in module)  # no frozen base weights, tied head included
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / CHECKPOINTS / "step_00000004")
    resumed = adapter_run(sft_corpus, hf_base, tmp_path / "resumed", *extra)
    assert [(m["step"], m.get("loss"), m.get("val_loss")) for m in resumed] == \
        [(m["step"], m.get("loss"), m.get("val_loss")) for m in full]  # bit-identical, adapter dropout included


def test_lora_with_gradient_checkpointing_trains_the_same_adapters(sft_corpus, hf_base, tmp_path):
    """Under LoRA only the adapters need gradients, and the checkpointed blocks' inputs come from a frozen
    embedding; recomputing the blocks in backward must still reach them: the same losses and the
    same adapter weights as without checkpointing (fp32)."""
    extra = ["peft=lora", "train.max_steps=3", "train.eval_interval=0", "task.generate_examples=0"]
    plain = adapter_run(sft_corpus, hf_base, tmp_path / "plain", *extra)
    ckpt = adapter_run(sft_corpus, hf_base, tmp_path / "ckpt", *extra, "train.gradient_checkpointing=true")
    assert [m["loss"] for m in ckpt if "loss" in m] == pytest.approx([m["loss"] for m in plain if "loss" in m],
                                                                     rel=1e-6)
    ours, theirs = (load_model(tmp_path / name).state_dict() for name in ("ckpt", "plain"))
    lora = [name for name in ours if "lora_" in name]
    assert lora and all(ours[n].abs().sum() > 0 for n in lora if "lora_B" in n)  # trained: LoRA's B starts at zero
    for name in lora:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)


def test_lora_compiled_trains_as_eager_and_answers_eagerly(sft_corpus, hf_base, tmp_path, capsys):
    """train.compile=true with LoRA on task=sft: the compiled training forward gives eager's losses, and the
    SFT answers scored at validation (generated, a new shape per token) run eager: the same val_bleu."""
    extra = ["peft=lora", "train.max_steps=2", "train.eval_interval=2"]
    eager = adapter_run(sft_corpus, hf_base, tmp_path / "eager", *extra)
    compiled = adapter_run(sft_corpus, hf_base, tmp_path / "compiled", *extra, "train.compile=true")
    assert "train.compile=true: " not in capsys.readouterr().out  # compiled: no line saying it trained eager
    for key in ("loss", "val_loss", "val_bleu"):
        assert [m[key] for m in compiled if key in m] == pytest.approx([m[key] for m in eager if key in m], rel=1e-4)
    assert any("val_bleu" in m for m in compiled)


def test_resume_with_other_adapters_or_on_a_changed_base_is_refused(sft_corpus, hf_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(hf_base, base)
    adapter_run(sft_corpus, base, tmp_path / "run", "peft=lora", "train.max_steps=2", "train.eval_interval=0",
                "task.generate_examples=0")
    for other in (["peft=none"], ["peft=lora", "peft.r=4"]):
        with pytest.raises(CheckpointError, match="resume with the same adapters"):
            adapter_run(sft_corpus, base, tmp_path / "run", *other, "train.max_steps=4")
    save_hf(tiny_hf(seed=2), tmp_path / "other", "safetensors")
    shutil.copy(tmp_path / "other" / "model.safetensors", base / "model.safetensors")
    with pytest.raises(CheckpointError, match="SHA-256"):
        adapter_run(sft_corpus, base, tmp_path / "run", "peft=lora", "train.max_steps=4")


@pytest.mark.parametrize("method, stage", [("lora", 0), ("ia3", 3)])
def test_adapter_exports_load_in_peft_and_transformers_with_our_logits(sft_corpus, hf_base, tmp_path, method, stage):
    run_dir = tmp_path / "run"
    adapter_run(sft_corpus, hf_base, run_dir, f"peft={method}", f"zero.stage={stage}", "train.max_steps=2",
                "train.eval_interval=0", "task.generate_examples=0")
    assert_exports_match(run_dir, hf_base, tmp_path)


def assert_exports_match(run_dir, hf_base, tmp_path):
    """The run's PEFT-format and merged exports give, in peft and transformers, the logits of the run's model."""
    assert export_main([str(run_dir), str(tmp_path / "adapter"), "--adapter"]) == 0
    assert export_main([str(run_dir), str(tmp_path / "merged")]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in tmp_path.glob("*/*.safetensors")} == {0o666 & ~umask}  # not 0600
    idx = tokens(7, length=32)
    with torch.no_grad():
        ours = load_model(run_dir)(idx)[0]
        base = GPT2LMHeadModel.from_pretrained(hf_base).eval()
        before = base(idx).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(idx).logits
        merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()(idx).logits
    assert (ours - before).abs().max() > 1e-3  # the adapter changed the model
    torch.testing.assert_close(adapted, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, ours, atol=1e-5, rtol=0)


def test_lora_at_zero2_on_two_ranks_in_bf16(sft_corpus, hf_base, tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(sft_overrides(sft_corpus, hf_base, run_dir, "peft=lora", "zero=stage2", "train.precision=bf16",
                                     "train.max_steps=2", "train.micro_batch_size=1", "train.eval_sequences=2",
                                     "task.test=false", "optim.warmup_steps=1"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(math.isfinite(m["loss"]) for m in read_metrics(run_dir) if "loss" in m)
    ckpt = run_dir / CHECKPOINTS / "step_00000002"
    assert sum(f.stat().st_size for f in ckpt.iterdir()) < 200_000  # adapters and their Adam moments, not the base
    model = load_model(run_dir)  # consolidated from both ranks' shards, on the base
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == 2 * (64 * 8 + 8 * 192)


def test_lora_at_zero3_on_two_ranks_killed_9_resumes_bit_identical(sft_corpus, hf_base, tmp_path):
    """kill -9 at a random moment (tests/test_faults.py's test; once: each start of 2 ranks costs ~15 s, most of
    it imports) of a LoRA run at ZeRO-3 on 2 ranks, resumed: the losses of a run that never died, to the
    bit (fp32, adapter dropout included), and its test scores and exports. ZeRO-3 partitions the frozen
    base too, and each forward pass gathers it from both ranks: the test split (5 examples, one per
    forward pass) is uneven over the ranks, and a rank short of a batch must still take part in the
    other's last forward pass (else both wait there until dist.timeout_s)."""
    def overrides(run_dir):
        return sft_overrides(sft_corpus, hf_base, run_dir, "peft=lora", "peft.dropout=0.1", "zero=stage3",
                             "train.max_steps=9", "train.ckpt_interval=3", "train.eval_interval=3", "train.keep_last=2",
                             "train.micro_batch_size=1", "train.eval_sequences=2", "train.keep_best=val_loss",
                             "task.generate_examples=1", "optim.lr=1e-2", "dist.timeout_s=120")

    reference = run_train(overrides(tmp_path / "uninterrupted"), nproc=2)
    assert reference.returncode == 0, reference.stderr[-3000:]
    test = json.loads((tmp_path / "uninterrupted" / "test.json").read_text())
    assert test["examples"] == 5 and math.isfinite(test["test_loss"])
    run_dir = tmp_path / "run"
    outputs = kill_repeatedly(overrides(run_dir), run_dir, 2, kills=1, seed=3, tmp_path=tmp_path, steps=9)
    assert resumed_steps(outputs)
    assert without_timing(read_metrics(run_dir)) == without_timing(read_metrics(tmp_path / "uninterrupted"))
    assert json.loads((run_dir / "test.json").read_text()) == test
    assert sum(f.stat().st_size for f in (run_dir / CHECKPOINTS / "step_00000009").iterdir()) < 200_000  # adapters
    assert_exports_match(run_dir, hf_base, tmp_path)  # consolidated from both ranks' shards


def test_init_from_an_adapter_run_trains_its_adapters_on_or_their_merge(sft_corpus, hf_base, tmp_path):
    """train.init_from=<a LoRA run>: with the same peft settings its adapters train on, on its base (here
    with its optimizer state too); with peft=none every weight trains, from base and adapters merged.
    Both start where the LoRA run ended; other adapter settings are refused, before anything is written."""
    source = tmp_path / "lora"
    ended = adapter_run(sft_corpus, hf_base, source, "peft=lora", "train.max_steps=2", "task.generate_examples=0")
    for name, extra in (("more", ["peft=lora", "train.init_optimizer=true"]), ("full", [])):
        run_dir = tmp_path / name
        metrics = adapter_run(sft_corpus, source, run_dir, *extra, "train.max_steps=1", "optim.warmup_steps=0",
                               "task.generate_examples=0")
        assert metrics[0]["step"] == 0 and metrics[0]["val_loss"] == pytest.approx(ended[-1]["val_loss"], abs=1e-6)
        module = safe_load.load(run_dir / CHECKPOINTS / "step_00000001" / "mp_rank_00_model_states.pt",
                                CheckpointError)["module"]
        assert all(".lora_" in n for n in module) if name == "more" else not any(".lora_" in n for n in module)
    base = json.loads((tmp_path / "more" / CHECKPOINTS / "step_00000001" / "checkpoint.json").read_text())
    assert base["train_state"]["base"]["path"] == str(hf_base.resolve())  # the LoRA run's base, still frozen
    with pytest.raises(ConfigError, match="with the same peft.* settings, or every weight .* peft=none"):
        adapter_run(sft_corpus, source, tmp_path / "other", "peft=lora", "peft.r=4", "train.max_steps=1",
                    "optim.warmup_steps=0")
    assert not (tmp_path / "other" / "config.yaml").exists()


def test_a_peft_adapter_directory_is_read_by_generate_evaluate_lmeval_and_training(sft_corpus, hf_base, tmp_path,
                                                                                   capsys):
    """A LoRA adapter made with peft itself on transformers' GPT2LMHeadModel, with its base or alone: our
    logits are peft's, every command takes it, and a base it does not fit is one line, exit 2."""
    import peft

    from gpt2dist.commands.evaluate import main as evaluate_main
    from gpt2dist.commands.generate import main as generate_main
    from gpt2dist.commands.lmeval import GPT2DistLM
    from gpt2dist.models.weights import WeightsError
    from gpt2dist.evals.loss import mean_loss, rank_batches

    torch.manual_seed(0)
    # fan_in_fan_out: GPT-2's Conv1D stores its weight transposed (peft would set it, with a warning)
    theirs = peft.get_peft_model(GPT2LMHeadModel.from_pretrained(hf_base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM", fan_in_fan_out=True))
    with torch.no_grad():  # B starts at zero: the adapter would change nothing
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    adapter = tmp_path / "adapter"
    theirs.save_pretrained(adapter)
    idx = tokens(7, length=32)
    with torch.no_grad():
        ours = load_model(hf_base, adapter=adapter)
        torch.testing.assert_close(ours(idx)[0], theirs.eval()(idx).logits, atol=1e-5, rtol=0)
        assert torch.equal(GPT2DistLM(str(hf_base), device="cpu", adapter=str(adapter)).model(idx)[0], ours(idx)[0])
        assert torch.equal(load_model(adapter)(idx)[0], ours(idx)[0])  # alone: on the base_model_name_or_path
    capsys.readouterr()
    assert generate_main([str(hf_base), "--adapter", str(adapter), "--prompt", "Reverse apple:", "--temperature", "0",
                          "--max-new-tokens", "3"]) == 0
    assert f"with the adapter {adapter}" in capsys.readouterr().err
    assert evaluate_main([str(hf_base), "--adapter", str(adapter), "--sft", str(sft_corpus), "--limit", "1",
                          "--max-new-tokens", "2"]) == 0
    expected = mean_loss(ours, rank_batches(open_split(sft_corpus, "val", 16), 4, 4))[0]
    lora = ["peft=lora", "peft.r=4", "peft.alpha=8", "peft.target_modules=[c_attn,c_fc]", "train.max_steps=1",
            "task.generate_examples=0", "optim.warmup_steps=0"]
    metrics = adapter_run(sft_corpus, adapter, tmp_path / "run", *lora)  # train.init_from=<the adapter>
    assert metrics[0]["step"] == 0 and metrics[0]["val_loss"] == pytest.approx(expected, abs=1e-6)
    shutil.rmtree(tmp_path / "run" / CHECKPOINTS)  # as if killed before its first checkpoint: it starts again
    again = adapter_run(sft_corpus, adapter, tmp_path / "run", *lora)
    assert without_timing(again) == without_timing(metrics)  # its step 0 logged once
    other = tmp_path / "other-base"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)).save_pretrained(other)
    capsys.readouterr()
    assert generate_main([str(other), "--adapter", str(adapter), "--prompt", "x", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {adapter}: ") and "do not fit" in err[-1]
    with pytest.raises(WeightsError, match="does not match"):  # the run's model is the adapter's base's shape
        adapter_run(sft_corpus, other, tmp_path / "refused", *lora, f"train.init_adapter={adapter}")
    assert not (tmp_path / "refused" / "config.yaml").exists()


def test_adapter_config_takes_peft_defaults_for_missing_keys_only(tmp_path):
    """An explicit value is read as given (lora_alpha: 0 is 0, not peft's default 8); only a key left out
    takes peft's default. Invalid explicit values are refused (tests/test_hostile_inputs.py, ADAPTER_CASES)."""
    from gpt2dist.models.adapters import read_adapter_config

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "target_modules": ["c_attn"], "lora_alpha": 0, "lora_dropout": 0.0}))
    config = read_adapter_config(tmp_path)
    assert (config.r, config.alpha, config.dropout, config.base) == (8, 0.0, 0.0, None)


def test_prompting_baseline_scores_zero_and_few_shot(sft_corpus, hf_base, capsys):
    from gpt2dist.commands.evaluate import main as evaluate_main

    for shots in (0, 3):
        assert evaluate_main([str(hf_base), "--sft", str(sft_corpus), "--shots", str(shots), "--limit", "2",
                              "--template", "Q: {prompt} A:", "--max-new-tokens", "4"]) == 0
        scores = json.loads(capsys.readouterr().out)["sft_test"]
        assert scores["examples"] == 2 and scores["shots"] == shots and 0 <= scores["chrf"] <= 100
    assert evaluate_main([str(hf_base), "--sft", str(sft_corpus), "--shots", "25"]) == 2
    assert "25 shots asked for, but the train split has 24" in capsys.readouterr().err


def test_bleu_and_chrf_are_sacrebleus():
    from gpt2dist.evals.generation import bleu_chrf

    assert bleu_chrf(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx({"bleu": 100, "chrf": 100})
    partial = bleu_chrf(["the cat sat on a mat"], ["the cat sat on the mat"])
    assert 0 < partial["bleu"] < 100 and 0 < partial["chrf"] < 100


def test_optuna_sweep_minimises_the_returned_dev_loss(sft_corpus, hf_base, tmp_path, monkeypatch):
    """train.py -m hydra/sweeper=optuna: 3 trials over the learning rate and the LoRA rank, in this process."""
    sweep = tmp_path / "sweep"
    overrides = [o for o in sft_overrides(sft_corpus, hf_base, sweep, "peft=lora", "train.max_steps=2",
                                          "task.generate_examples=0", "task.test=false", "optim.warmup_steps=1")
                 if not o.startswith(("optim.lr", "peft.r"))]
    monkeypatch.setattr("sys.argv", ["train.py", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
                                     "hydra.sweeper.sampler.seed=1", "optim.lr=tag(log,interval(1e-4,1e-2))",
                                     "peft.r=choice(2,4)", *overrides])
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")  # as `python train.py ...` runs it
    result = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in result and "peft.r" in result
    finals = [read_metrics(sweep / str(job))[-1]["val_loss"] for job in range(3)]
    assert f"best_value: {min(finals)}" in result  # the trial with the lowest final dev loss


def test_builtin_task_pairs_docstrings_with_their_def_lines():
    from itertools import islice

    from gpt2dist.data.builtin_corpus import docsig_examples

    examples = list(islice(docsig_examples(), 40))
    assert len(examples) == 40 and len({e.response for e in examples}) > 30
    for e in examples:
        assert e.response.startswith("def ") and e.response.endswith("):") and '"""' in e.prompt


def test_evaluate_corpus_of_examples_is_the_response_token_loss(sft_corpus, hf_base):
    from gpt2dist.evals.loss import corpus_loss, mean_loss, rank_batches

    model = load_model(hf_base)
    examples = open_split(sft_corpus, "test", 16)
    expected, tokens = mean_loss(model, rank_batches(examples, len(examples), 8))
    result = corpus_loss(model, sft_corpus, "test")
    responses = sum(len(get_tokenizer().encode_ordinary(f" {w[::-1]}")) + 1 for w in WORDS[4:9])  # + <|endoftext|>
    assert result["loss"] == expected and result["tokens"] == tokens == responses
