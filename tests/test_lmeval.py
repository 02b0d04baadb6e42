"""lm-evaluation-harness runs gpt2dist models through the adapter, on a local task file."""

import json

import pytest
import torch
from lm_eval.api.instance import Instance

from gpt2dist.evals.choices import continuation_logprobs
from gpt2dist.models.sampling import generate
from gpt2dist.models.hf import export_hf
from gpt2dist.commands.lmeval import GPT2DistLM, main as lmeval_main
from gpt2dist.data.tokenizer import EOT, get_tokenizer
from tests.test_evaluate import memorised_model, questions, write_choices

TASK = """\
task: gpt2dist_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_hf(memorised_model(), tmp_path_factory.mktemp("memorised"))


@pytest.fixture
def offline(monkeypatch):
    """Hugging Face datasets must not look for anything online."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_local_multiple_choice_task(model_dir, tmp_path, offline, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = write_choices(tmp_path / "facts.jsonl", questions())
    (tasks / "facts.yaml").write_text(TASK.format(data=data, cache=tmp_path / "cache"))
    out = tmp_path / "results.json"
    assert lmeval_main([str(model_dir), "--tasks", "gpt2dist_facts", "--include-path", str(tasks),
                        "--output", str(out), "--device", "cpu"]) == 0
    results = json.loads(out.read_text())["results"]["gpt2dist_facts"]
    assert results["acc,none"] == 1.0 and results["acc_norm,none"] == 1.0  # the memorised answers
    assert "gpt2dist_facts" in capsys.readouterr().out


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_adapter_requests_match_gpt2dist(model_dir):
    lm = GPT2DistLM(str(model_dir), device="cpu")
    enc = get_tokenizer()
    (total, greedy), = lm.loglikelihood([request("loglikelihood", "Alice likes ", "deep red paint")])
    (expected, _), = continuation_logprobs(lm.model, [(enc.encode_ordinary("Alice likes"),
                                                       enc.encode_ordinary(" deep red paint"))])
    assert total == pytest.approx(expected) and greedy  # the trailing space moves to the continuation

    text = "Bob likes a blue sky. " * 20  # longer than the context: several windows
    ids = enc.encode_ordinary(text)
    assert len(ids) > lm.block_size
    # Every token scored once, in chunks of up to 64 predictions; each forward pass sees 64 tokens
    # (fewer at the start), so the last chunk gets as much context as fits.
    full, pairs = [EOT] + ids, []
    for i in range(0, len(ids), 64):
        n = min(64, len(ids) - i)
        pairs.append((full[max(0, i + n - 64) : i + 1], ids[i : i + n]))
    rolling, = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    assert rolling == pytest.approx(sum(t for t, _ in continuation_logprobs(lm.model, pairs)), abs=1e-4)

    out, = lm.generate_until([request("generate_until", "Carol likes", {"until": ["river"], "max_gen_toks": 20})])
    idx = torch.tensor([enc.encode_ordinary("Carol likes")])
    ours = generate(lm.model, idx, 20, temperature=0.0, stop_token=EOT)[0, idx.size(1):].tolist()
    assert out == enc.decode(ours[: ours.index(EOT)] if EOT in ours else ours).split("river")[0]
    assert out == " green grass in a quiet field by the "


def test_unknown_task_is_refused_before_the_model_loads(tmp_path, capsys):
    """The model path does not exist: the task is what the one error line is about."""
    assert lmeval_main([str(tmp_path / "no-model"), "--tasks", "hellaswagg", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tasks: unknown lm-eval task 'hellaswagg' (did you mean hellaswag")
    assert err.count("\n") == 1
