"""Evaluation: multiple-choice scoring picks the answers a model has memorised, log-likelihoods
equal Hugging Face's, and the eval command and the training hook report loss and accuracy."""

import json
import math

import pytest
import torch

from gpt2dist.commands.evaluate import main as evaluate_main
from gpt2dist.config import EvalConfig
from gpt2dist.evals.choices import (EvalError, MultipleChoice, continuation_logprobs, fewshot_prompt, multiple_choice,
                                    read_choices)
from gpt2dist.evals.downstream import run_evals
from gpt2dist.errors import BadFile
from gpt2dist.models.hf import export_hf
from gpt2dist.models.gpt import GPT, GPTConfig
from gpt2dist.data.tokenizer import EOT, get_tokenizer
from tests.conftest import from_hf, run_python
from tests.test_model import tiny_hf

ENDINGS = ["deep red paint on the door.", "a blue sky.", "green grass in a quiet field by the river.", "yellow."]
# Who likes which ending: every ending is the answer to one question and a wrong choice in the
# others, so only the context tells them apart. Endings differ in length on purpose.
FACTS = [("Alice likes", 0), ("Bob likes", 1), ("Carol likes", 2), ("Dave likes", 3),
         ("Erin likes", 1), ("Frank likes", 3)]


def questions() -> list[MultipleChoice]:
    return [MultipleChoice(ctx, ENDINGS, label) for ctx, label in FACTS]


def write_choices(path, qs: list[MultipleChoice]) -> str:
    path.write_text("".join(json.dumps({"ctx": q.context, "endings": q.endings, "label": q.label}) + "\n" for q in qs))
    return str(path)


def memorised_model() -> GPT:
    """A tiny GPT trained until it knows FACTS by heart, so the right answers are known."""
    enc = get_tokenizer()
    rows = [enc.encode_ordinary(f"{ctx} {ENDINGS[label]}") + [EOT] for ctx, label in FACTS]
    width = max(map(len, rows))
    data = torch.tensor([r + [EOT] * (width - len(r)) for r in rows])  # (6, width)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(100):
        _, loss = model(data[:, :-1], data[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, loss.item()
    return model.eval()


@pytest.fixture(scope="module")
def memorised() -> GPT:
    return memorised_model()


def test_memorised_answers_are_chosen(memorised):
    assert multiple_choice(memorised, questions()) == {"acc": 1.0, "acc_norm": 1.0, "questions": 6}


def test_unknown_facts_are_not_always_right(memorised):
    """The control: with every label shifted, the memorised model gets every question wrong."""
    wrong = [MultipleChoice(q.context, q.endings, (q.label + 1) % 4) for q in questions()]
    assert multiple_choice(memorised, wrong) == {"acc": 0.0, "acc_norm": 0.0, "questions": 6}


def test_continuation_logprobs_equal_hf(tmp_path):
    hf = tiny_hf(seed=1)
    ours = from_hf(hf, tmp_path)
    g = torch.Generator().manual_seed(2)
    pairs = [(torch.randint(0, 50257, (c,), generator=g).tolist(), torch.randint(0, 50257, (n,), generator=g).tolist())
             for c, n in ((5, 3), (1, 1), (20, 7), (70, 4))]  # the last is longer than the context: cut at the left
    results = continuation_logprobs(ours, pairs, batch_size=3)
    for (ctx, cont), (total, greedy) in zip(pairs, results):
        seq = torch.tensor([(ctx + cont)[-65:]])
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(seq[:, :-1]).logits, dim=-1)[0, -len(cont):]  # (n, vocab)
        expected = logprobs.gather(1, torch.tensor(cont)[:, None]).sum().item()
        assert total == pytest.approx(expected, abs=1e-4)
        assert greedy is bool((logprobs.argmax(-1) == torch.tensor(cont)).all())


def test_greedy_flag(memorised):
    enc = get_tokenizer()
    ctx = enc.encode_ordinary("Alice likes")
    right, wrong = (enc.encode_ordinary(" " + ENDINGS[i]) for i in (0, 1))
    assert [greedy for _, greedy in continuation_logprobs(memorised, [(ctx, right), (ctx, wrong)])] == [True, False]


def test_fewshot_prompt_prepends_solved_examples():
    qs = questions()
    assert fewshot_prompt(qs[0], qs[1:3]) == (f"Bob likes {ENDINGS[1]}\n\nCarol likes {ENDINGS[2]}\n\nAlice likes")


def test_fewshot_draws_other_questions(memorised):
    qs = questions()
    result = multiple_choice(memorised, qs, fewshot=qs, k=5)  # all but the question itself
    assert result["questions"] == 6
    with pytest.raises(EvalError, match="6 few-shot examples asked for, but only 5"):
        multiple_choice(memorised, qs, fewshot=qs, k=6)


def test_evaluate_command(memorised, corpus, tmp_path, capsys):
    model_dir = export_hf(memorised, tmp_path / "hf")
    choices = write_choices(tmp_path / "q.jsonl", questions())
    assert evaluate_main([str(model_dir), "--corpus", str(corpus), "--seq-len", "32", "--max-sequences", "6",
                          "--choices", choices, "--fewshot-file", choices, "--fewshot-k", "1", "--limit", "4"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["val"]["tokens"] == 6 * 32
    assert results["val"]["perplexity"] == pytest.approx(math.exp(results["val"]["loss"]))
    assert results["multiple_choice"]["questions"] == 4


def test_ranks_share_the_scoring(memorised, corpus, tmp_path, capsys):
    """Under torchrun each rank scores its share of the windows (7 windows in batches of 2: 4 on
    rank 0, 3 on rank 1), and rank 0 alone prints what one process prints."""
    model_dir = export_hf(memorised, tmp_path / "hf")
    text = tmp_path / "held_out.md"
    text.write_text("Alice likes deep red paint on the door. Bob likes a blue sky.\n" * 10)
    args = [str(model_dir), "--corpus", str(corpus), "--text", str(text), "--seq-len", "32", "--max-sequences", "7",
            "--batch-size", "2"]
    assert evaluate_main(args) == 0
    one = json.loads(capsys.readouterr().out)
    result = run_python(["-m", "gpt2dist.evaluate", *args], nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(result.stdout)  # a single JSON document: one rank printed
    assert one.keys() == two.keys() == {"val", "text"}
    assert one["val"]["tokens"] == 7 * 32 and one["text"]["tokens"] >= 3 * 32  # both split unevenly
    for name in one:
        assert two[name]["tokens"] == one[name]["tokens"]
        assert two[name]["loss"] == pytest.approx(one[name]["loss"], rel=1e-6)
        # exp() multiplies a loss's relative rounding by the loss itself (~17 for this model): compare
        # each perplexity with its own loss instead of across runs
        assert two[name]["perplexity"] == pytest.approx(math.exp(two[name]["loss"]), rel=1e-9)


def test_run_evals_for_the_trainer(memorised, corpus, tmp_path):
    cfg = EvalConfig(interval=10, corpus=str(corpus), sequences=4, choices=write_choices(tmp_path / "q.jsonl", questions()))
    memorised.train()
    values = run_evals(memorised, cfg, seq_len=32)
    assert memorised.training  # put back as it was
    memorised.eval()
    assert set(values) == {"eval_loss", "eval_perplexity", "mc_acc", "mc_acc_norm"}
    assert values["mc_acc"] == values["mc_acc_norm"] == 1.0


def test_bad_files_are_named(memorised, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 1}\n{"ctx": "a", "endings": ["b"]}\n')
    with pytest.raises(BadFile, match=f"{bad}:2: label: missing"):
        read_choices(bad)
    bad.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 2}\n')
    with pytest.raises(BadFile, match=f"{bad}:1: label: 2 is not the index"):
        read_choices(bad)
    model_dir = export_hf(memorised, tmp_path / "hf")
    assert evaluate_main([str(model_dir), "--corpus", str(tmp_path / "nowhere")]) == 2
    # after the line naming the model it loaded
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: {tmp_path / 'nowhere' / 'manifest.json'}: no manifest")


def test_raw_text_is_scored_whole(memorised, tmp_path, capsys):
    """--text takes text files as they are: every token after the first of each window of
    --seq-len is scored once, in the order the files are read."""
    enc = get_tokenizer()
    texts = {"a.md": "# Alice\nAlice likes deep red paint on the door. " * 3, "b": "Bob likes a blue sky.\n" * 4}
    (tmp_path / "text").mkdir()
    for name, text in texts.items():
        (tmp_path / "text" / name).write_text(text)
    model_dir = export_hf(memorised, tmp_path / "hf")
    assert evaluate_main([str(model_dir), "--text", str(tmp_path / "text"), "--seq-len", "16"]) == 0
    result = json.loads(capsys.readouterr().out)["text"]
    stream = torch.tensor([t for name in sorted(texts) for t in enc.encode_ordinary(texts[name]) + [EOT]])
    n = (len(stream) - 1) // 16
    windows = stream[: n * 16 + 1].unfold(0, 17, 16)  # (n, 17), overlapping by one token
    with torch.no_grad():
        _, loss = memorised(windows[:, :-1], windows[:, 1:])
    assert result["tokens"] == n * 16
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert evaluate_main([str(model_dir), "--text", str(tmp_path / "text" / "b"), "--seq-len", "64"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"loaded {model_dir}: {memorised.num_params():,} parameters, 2 layers",
        f"error: {tmp_path / 'text' / 'b'}: the val split's {len(enc.encode_ordinary(texts['b'])) + 1} "
        "tokens are not enough for one block of 65 tokens"]


def test_empty_context_is_one_error_line(memorised, tmp_path, capsys):
    choices = tmp_path / "q.jsonl"
    choices.write_text('{"ctx": "Alice likes", "endings": ["b", "c"], "label": 1}\n'
                       '{"ctx": "", "endings": ["b", "c"], "label": 0}\n')
    model_dir = export_hf(memorised, tmp_path / "hf")
    assert evaluate_main([str(model_dir), "--choices", str(choices)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {choices}:2: ctx: empty (the endings are scored after it)"]
