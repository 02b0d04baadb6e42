"""Classification (task=classify): labelled texts prepared with their label set, a score head on the last
non-padding token trained from a Hugging Face GPT-2 (in full, or with LoRA and the head), dev and test
accuracy and macro-F1 as scikit-learn computes them, the best checkpoint kept, and exports that
transformers' GPT2ForSequenceClassification loads with our logits."""

import json
import math
import shutil

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score
from transformers import GPT2ForSequenceClassification

from data_tools.classify import main as classify_main
from gpt2dist import safe_load
from gpt2dist.config import ConfigError, check
from gpt2dist.data.classify import MAX_LABELS, LabelledText, prepare_classify
from gpt2dist.data.loader import open_split
from gpt2dist.data.sft import ExampleError
from gpt2dist.data.shards import CorpusError
from gpt2dist.data.tokenizer import EOT, get_tokenizer
from gpt2dist.commands.evaluate import main as evaluate_main
from gpt2dist.commands.export import main as export_main
from gpt2dist.commands.generate import main as generate_main
from gpt2dist.commands.lmeval import GPT2DistLM
from gpt2dist.models.weights import WeightsError, load_model
from gpt2dist.training.checkpoint import CHECKPOINTS, CheckpointError
from gpt2dist.evals import classify as classify_eval
from gpt2dist.evals.classify import confusion_scores
from gpt2dist.evals.loss import rank_batches
from tests.conftest import TINY, make_cfg, read_metrics, run_train, train_cfg
from tests.test_finetune import hf_base, sft_corpus, sft_overrides  # noqa: F401 (fixtures)

WORDS = {"color": ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"],
         "animal": ["cat", "dog", "horse", "mouse", "tiger", "lion", "sheep", "goat"],
         "number": ["one", "two", "three", "four", "five", "six", "seven", "eight"]}
TEMPLATES = ["the {}", "look, a {} here", "my {}"]  # dev and test: the third, on words seen in training


def rows(pairs) -> str:
    return "".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in pairs)


def examples(words: slice, templates: list[str]) -> list[tuple[str, str]]:
    return [(t.format(w), label) for label, ws in WORDS.items() for w in ws[words] for t in templates]


@pytest.fixture(scope="module")
def cls_corpus(tmp_path_factory):
    """Which kind of word a short text names: 36 train, 6 dev, 6 test examples of 3 labels, 8 tokens each."""
    d = tmp_path_factory.mktemp("classify")
    for name, pairs in (("train", examples(slice(0, 6), TEMPLATES[:2])), ("dev", examples(slice(0, 2), TEMPLATES[2:])),
                        ("test", examples(slice(2, 4), TEMPLATES[2:]))):
        (d / f"{name}.jsonl").write_text(rows(pairs))
    out = d / "corpus"
    assert classify_main(["--output", str(out), "--seq-len", "8", "--train", str(d / "train.jsonl"),
                          "--dev", str(d / "dev.jsonl"), "--test", str(d / "test.jsonl")]) == 0
    return out


def cls_overrides(corpus, base, run_dir, *extra) -> list[str]:
    return [*TINY, "model.n_head=4", "model.n_embd=64", "data.seq_len=8", "task=classify", "train.sample_tokens=0",
            "train.eval_sequences=4", "optim.lr=3e-3", "optim.warmup_steps=1", f"data.path={corpus}",
            f"train.init_from={base}", f"train.run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def classify_run(cls_corpus, hf_base, tmp_path_factory):
    """Full fine-tuning at ZeRO 0, 4 steps, the best dev macro-F1 kept: (run directory, metrics)."""
    run_dir = tmp_path_factory.mktemp("classify-run") / "run"
    metrics = train_cfg(cls_overrides(cls_corpus, hf_base, run_dir, "train.keep_best=val_macro_f1",
                                      "train.ckpt_interval=0"), run_dir)
    return run_dir, metrics


def test_examples_are_padded_texts_with_their_label_ids(cls_corpus):
    manifest = json.loads((cls_corpus / "manifest.json").read_text())
    assert manifest["task"] == "classify" and manifest["labels"] == ["animal", "color", "number"]  # from train, sorted
    assert manifest["examples"] == {"train": 36, "val": 6, "test": 6}
    assert manifest["label_counts"]["test"] == {"animal": 2, "color": 2, "number": 2}
    enc = get_tokenizer()
    train = open_split(cls_corpus, "train", 8)
    for i, (text, label) in enumerate(examples(slice(0, 6), TEMPLATES[:2])):
        x, y = train[i]
        ids = enc.encode_ordinary(text)
        assert x.tolist() == ids + [EOT] * (8 - len(ids)) and manifest["labels"][int(y)] == label


def test_integer_labels_sort_by_value_and_read_back(tmp_path):
    (tmp_path / "in.jsonl").write_text(rows([(f"text {n}", n) for n in (10, 2, 1, 10)]))
    out = tmp_path / "out"
    assert classify_main(["--output", str(out), "--seq-len", "8", "--train", str(tmp_path / "in.jsonl")]) == 0
    labels = json.loads((out / "manifest.json").read_text())["labels"]
    assert labels == ["1", "2", "10"]  # not "1", "10", "2"
    train = open_split(out, "train", 8)
    assert [labels[int(train[i][1])] for i in range(4)] == ["10", "2", "1", "10"]


def test_every_label_id_a_corpus_holds_reads_back_and_one_more_label_is_refused(tmp_path):
    labels = [f"l{i}" for i in range(MAX_LABELS)]
    splits = {"train": [LabelledText("the cat", labels[-1])], "val": [], "test": []}
    prepare_classify(splits, labels, tmp_path / "all", 8, "test")
    assert int(open_split(tmp_path / "all", "train", 8)[0][1]) == MAX_LABELS - 1
    with pytest.raises(ExampleError, match=f"labels: {MAX_LABELS + 1:,} labels, more than the {MAX_LABELS:,}"):
        prepare_classify(splits, [*labels, "one more"], tmp_path / "more", 8, "test")  # its id would wrap
    assert not (tmp_path / "more").exists()


def test_hash_split_keeps_each_text_in_one_split_and_is_stable(tmp_path):
    pairs = examples(slice(0, 8), TEMPLATES[:2])
    (tmp_path / "all.jsonl").write_text(rows(pairs + pairs[:10]))  # 10 texts twice
    counts = []
    for out in ("a", "b"):
        assert classify_main([str(tmp_path / "all.jsonl"), "--output", str(tmp_path / out), "--seq-len", "8",
                              "--labels", "number", "color", "animal"]) == 0
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())
        counts.append(manifest["label_counts"])
    assert counts[0] == counts[1] and manifest["labels"] == ["number", "color", "animal"]  # --labels' order
    seen = {}
    for split in ("train", "val", "test"):
        samples = open_split(tmp_path / "a", split, 8)
        for i in range(len(samples)):
            assert seen.setdefault(tuple(samples[i][0].tolist()), split) == split
    assert len(seen) == 48 and sum(sum(c.values()) for c in counts[0].values()) == 58


@pytest.mark.parametrize("row, split, labels, why", [
    ('{"text": "the cat"}', "train", [], "no string or integer field 'label'"),
    ('{"label": "animal"}', "train", [], "no string field 'text'"),
    ('{"text": " ", "label": "animal"}', "dev", [], "empty text"),
    (json.dumps({"text": " ".join(["word"] * 9), "label": "animal"}), "test", [], "text of 9 tokens is longer than --seq-len 8"),
    ('{"text": "the cat", "label": "plant"}', "dev", [], "label 'plant' is not among the train split's labels"),
    ('{"text": "the cat", "label": "plant"}', "train", ["animal", "color"], "label 'plant' is not among --labels"),
    ('{"text": "the cat", "label": "animal", "n": ' + "9" * 5000 + "}", "dev", [], "an integer of 5,000 digits"),
])
def test_bad_row_is_one_line_naming_file_and_line_and_writes_nothing(tmp_path, capsys, row, split, labels, why):
    files = {s: tmp_path / f"{s}.jsonl" for s in ("train", "dev", "test")}
    for s, path in files.items():
        path.write_text(rows([("the dog", "animal"), ("the red", "color"), ("one", "animal")]) +
                        (row + "\n" if s == split else ""))
    args = ["--output", str(tmp_path / "out"), "--seq-len", "8", *(f"--{s}={p}" for s, p in files.items()),
            *(["--labels", *labels] if labels else [])]
    assert classify_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {files[split]}:4: ") and why in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    assert classify_main([*args, "--skip-bad"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped_inputs"] == 1 and manifest["examples"] == {"train": 3, "val": 3, "test": 3}


def test_accuracy_and_macro_f1_are_scikit_learns():
    truth, predicted = [0, 0, 1, 1, 2, 2, 0, 3], [0, 1, 1, 1, 0, 2, 0, 1]  # label 4 never occurs
    confusion = torch.zeros(5, 5, dtype=torch.float64)
    for t, p in zip(truth, predicted):
        confusion[t, p] += 1
    scores = confusion_scores(confusion)
    assert scores["accuracy"] == pytest.approx(accuracy_score(truth, predicted)) == 5 / 8
    # per label F1: 2/3, 4/6, 2/3, 0 (label 3 never predicted)
    assert scores["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro")) == pytest.approx(0.5)


def predictions(model, corpus, split: str) -> tuple[list[int], list[int]]:
    samples = open_split(corpus, split, 8)
    with torch.no_grad():
        pairs = [(int(y), int(model(x[None])[0].argmax())) for x, y in (samples[i] for i in range(len(samples)))]
    return [t for t, _ in pairs], [p for _, p in pairs]


def test_classify_from_hf_keeps_the_best_and_scores_the_test_split(classify_run, cls_corpus):
    run_dir, metrics = classify_run
    dev = [m for m in metrics if "val_accuracy" in m]
    assert [m["step"] for m in dev] == [2, 4] and all(0 <= m["val_macro_f1"] <= 1 for m in dev)
    best = max(dev, key=lambda m: m["val_macro_f1"])  # the first of equals: a tie is no improvement
    best_tag = (run_dir / CHECKPOINTS / "best").read_text()
    assert best_tag == f"step_{best['step']:08d}"
    result = json.loads((run_dir / "test.json").read_text())
    assert result["checkpoint"] == best_tag and result["examples"] == 6
    # The scores of the best weights, computed one example at a time, and by scikit-learn.
    truth, predicted = predictions(load_model(run_dir / CHECKPOINTS / best_tag), cls_corpus, "test")
    assert result["test_accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert result["test_macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert math.isfinite(result["test_loss"])


def padded_batch() -> torch.Tensor:
    """Texts of different lengths, padded with <|endoftext|> as the corpus pads them."""
    enc = get_tokenizer()
    ids = [enc.encode_ordinary(t) for t in ("the cat", "look, a purple horse here", "seven")]
    return torch.tensor([i + [EOT] * (8 - len(i)) for i in ids])


def assert_transformers_agree(exported, model) -> None:
    hf = GPT2ForSequenceClassification.from_pretrained(exported).eval()
    assert hf.config.id2label == dict(enumerate(model.config.labels)) and hf.config.pad_token_id == EOT
    idx = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)


def test_a_rank_short_of_a_batch_scores_only_its_own(classify_run, cls_corpus):
    """Over 2 ranks, 6 test texts in batches of 2 are 3 batches: rank 1 gets batch 1 and rank_batches'
    padding batch (so that under ZeRO-3 both ranks run as many forward passes), which counts for nothing."""
    model = load_model(classify_run[0])
    test = open_split(cls_corpus, "test", 8)
    share = list(rank_batches(test, len(test), 2, rank=1, world_size=2))
    assert len(share) == 2 and share[1][1].shape == share[0][1].shape
    assert classify_eval.scores(model, share, 3) == classify_eval.scores(model, share[:1], 3)


def test_export_loads_in_transformers_with_our_logits(classify_run, tmp_path):
    run_dir, _ = classify_run
    assert export_main([str(run_dir), str(tmp_path / "hf")]) == 0
    model = load_model(run_dir)
    assert model.config.labels == ("animal", "color", "number")
    assert_transformers_agree(tmp_path / "hf", model)
    again = load_model(tmp_path / "hf")  # and back: a Hugging Face classifier loads as ours
    assert again.config.labels == model.config.labels
    torch.testing.assert_close(again(padded_batch())[0], model(padded_batch())[0], atol=1e-6, rtol=0)


def test_token_commands_refuse_a_classifier_in_one_line(classify_run, tmp_path, capsys):
    """generate, evaluate and lmeval predict tokens, which a classifier does not: one line, exit 2."""
    run_dir, _ = classify_run
    text = tmp_path / "text.txt"
    text.write_text("Alice likes the color red. " * 8)
    capsys.readouterr()
    assert generate_main([str(run_dir), "--prompt", "Alice likes", "--max-new-tokens", "2", "--device", "cpu"]) == 2
    assert evaluate_main([str(run_dir), "--text", str(text), "--seq-len", "16", "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"error: {run_dir}: a classifier") for line in lines), lines
    with pytest.raises(WeightsError, match="a classifier"):
        GPT2DistLM(pretrained=str(run_dir), device="cpu")


def test_lora_trains_the_head_too_resumes_exactly_and_exports_merged(cls_corpus, hf_base, tmp_path, capsys):
    run_dir, extra = tmp_path / "run", ["peft=lora", "task.test=false"]
    full = train_cfg(cls_overrides(cls_corpus, hf_base, run_dir, *extra), run_dir)
    module = safe_load.load(run_dir / CHECKPOINTS / "step_00000004" / "mp_rank_00_model_states.pt",
                            CheckpointError)["module"]
    assert "score.weight" in module and all(".lora_" in name for name in module if name != "score.weight")
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / CHECKPOINTS / "step_00000004")
    resumed = train_cfg(cls_overrides(cls_corpus, hf_base, resumed_dir, *extra), resumed_dir)
    scores = ("step", "loss", "val_loss", "val_accuracy", "val_macro_f1")
    # Bit-identical from step 2 on: the base loaded again, the head and the adapters restored.
    assert [[m.get(k) for k in scores] for m in resumed] == [[m.get(k) for k in scores] for m in full]
    assert export_main([str(run_dir), str(tmp_path / "merged")]) == 0
    assert_transformers_agree(tmp_path / "merged", load_model(run_dir))
    assert export_main([str(run_dir), str(tmp_path / "adapter"), "--adapter"]) == 2
    assert "export without --adapter" in capsys.readouterr().err


def test_two_ranks_at_zero2_train_as_one(classify_run, cls_corpus, hf_base, tmp_path):
    """The same 4 steps on 2 ranks at ZeRO 2 (micro-batch 1) as classify_run's on 1 (micro-batch 2)."""
    run_dir = tmp_path / "run"
    result = run_train(cls_overrides(cls_corpus, hf_base, run_dir, "train.keep_best=val_macro_f1",
                                     "train.ckpt_interval=0", "zero=stage2", "train.micro_batch_size=1"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = read_metrics(run_dir), classify_run[1]
    for key in ("loss", "val_loss", "val_accuracy", "val_macro_f1"):
        assert [m[key] for m in ours if key in m] == pytest.approx([m[key] for m in theirs if key in m], rel=1e-4), key
    assert json.loads((run_dir / "test.json").read_text())["test_accuracy"] == pytest.approx(
        json.loads((classify_run[0] / "test.json").read_text())["test_accuracy"])


def test_task_and_corpus_must_agree(cls_corpus, sft_corpus, hf_base, tmp_path):
    with pytest.raises(CorpusError, match="classification examples .* use task=classify"):
        train_cfg(sft_overrides(cls_corpus, hf_base, tmp_path / "a", "data.seq_len=8"), tmp_path / "a")
    with pytest.raises(CorpusError, match="fine-tuning examples .* use task=sft"):
        train_cfg(cls_overrides(sft_corpus, hf_base, tmp_path / "b", "data.seq_len=16"), tmp_path / "b")
    with pytest.raises(ConfigError, match="train.keep_best=val_accuracy is a task=classify metric"):
        check(make_cfg("task=sft", "train.keep_best=val_accuracy"), 1)


def test_builtin_task_labels_docstrings_with_their_package(tmp_path):
    from gpt2dist.data.builtin_corpus import DOCPKG_LABELS, builtin_corpus

    corpus = builtin_corpus("docpkg", tmp_path, seq_len=64)
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["labels"] == list(DOCPKG_LABELS) and manifest["examples"]["train"] > 400
    assert all(n >= 5 for counts in manifest["label_counts"].values() for n in counts.values())  # every label, every split
