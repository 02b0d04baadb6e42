"""Scores of a fine-tuned model on a split of an SFT corpus (`gpt2dist.data.sft`): the response-token
loss, and greedy answers to the first prompts scored against the reference responses with BLEU and
chrF (sacrebleu's corpus scores, 0-100). The trainer's dev evaluation (val_bleu, val_chrf) and its
final test evaluation, and the prompting baselines of `gpt2dist evaluate --sft`, all score here.
"""

import torch

from gpt2dist.data.tokenizer import EOT, get_tokenizer
from gpt2dist.evals.loss import model_device
from gpt2dist.models.sampling import continuations


def greedy_response(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> str:
    """The greedy continuation of `prompt` up to <|endoftext|>, as text. `model` is a GPT or a DeepSpeed
    engine (then every rank calls this: under ZeRO-3 each forward pass gathers from all ranks)."""
    return continuations(model, prompt, model_device(model), max_new_tokens=max_new_tokens, temperature=0)[0]


def bleu_chrf(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF of the hypotheses against one reference each (sacrebleu's defaults)."""
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}


def generation_scores(model: torch.nn.Module, prompts: list[list[int]], references: list[str],
                      max_new_tokens: int) -> dict[str, float]:
    """BLEU and chrF of the model's greedy responses to `prompts` (token ids) against `references`."""
    was_training = model.training
    model.eval()
    hypotheses = [greedy_response(model, p, max_new_tokens) for p in prompts]
    model.train(was_training)
    return bleu_chrf(hypotheses, references)


def split_prompts(examples, n: int) -> tuple[list[list[int]], list[str]]:
    """The prompts (token ids) and reference responses (text) of the first `n` examples of a split."""
    enc, prompts, references = get_tokenizer(), [], []
    for i in range(min(n, len(examples))):
        prompt, reference = examples.prompt_and_reference(i)
        prompts.append(prompt)
        references.append(enc.decode(reference))
    return prompts, references


def prompted_scores(model: torch.nn.Module, corpus, split: str = "test", shots: int = 0, template: str = "{prompt}",
                    seed: int = 1234, limit: int | None = None, max_new_tokens: int = 64) -> dict[str, float]:
    """A prompting baseline on an SFT corpus's split: each prompt, put in `template` (`{prompt}` marks
    where), follows `shots` solved examples drawn from the train split (each its templated prompt,
    its response and a blank line), and the greedy answer, cut at the first blank line when shots
    show that format, is scored with BLEU and chrF as fine-tuned models are."""
    import random

    from gpt2dist.data.loader import open_split
    from gpt2dist.data.shards import CorpusError, read_manifest, require_kind

    enc, rng = get_tokenizer(), random.Random(seed)
    manifest = read_manifest(corpus)
    require_kind(manifest, corpus, ("sft",), "prompts and responses to answer (a corpus of python -m data_tools.sft)")
    seq_len = manifest["seq_len"]
    examples, pool = open_split(corpus, split, seq_len), open_split(corpus, "train", seq_len)
    n = len(examples) if limit is None else min(limit, len(examples))
    if shots > len(pool):
        raise CorpusError(f"{corpus}: {shots} shots asked for, but the train split has {len(pool)} examples")

    def text(ids: list[int]) -> str:
        return enc.decode(ids)

    def solved(i: int) -> str:
        prompt, response = pool.prompt_and_reference(i)
        return template.replace("{prompt}", text(prompt[1:])) + text(response) + "\n\n"

    was_training = model.training
    model.eval()
    hypotheses, references = [], []
    for i in range(n):
        prompt, reference = examples.prompt_and_reference(i)
        context = "".join(solved(j) for j in rng.sample(range(len(pool)), shots))
        ids = [EOT, *enc.encode_ordinary(context + template.replace("{prompt}", text(prompt[1:])))]
        answer = greedy_response(model, ids, max_new_tokens)
        hypotheses.append(answer.split("\n\n")[0] if shots else answer)
        references.append(text(reference))
    model.train(was_training)
    return {**bleu_chrf(hypotheses, references), "examples": n, "shots": shots}
