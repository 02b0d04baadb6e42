"""Scores of a fine-tuned model on a split of an SFT corpus (`gpt2dist.data.sft`): the response-token
loss, and greedy answers to the first prompts scored against the reference responses with BLEU and
chrF (sacrebleu's corpus scores, 0-100). The trainer's dev evaluation (val_bleu, val_chrf) and its
final test evaluation, and the prompting baselines of `gpt2dist.evaluate`, all score here.
"""

import torch

from gpt2dist.data.tokenizer import EOT, get_tokenizer
from gpt2dist.generate import generate


@torch.no_grad()
def greedy_response(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> str:
    """The greedy continuation of `prompt` up to <|endoftext|>, as text. `model` is a GPT or a DeepSpeed
    engine (then every rank calls this: under ZeRO-3 each forward pass gathers from all ranks)."""
    device = getattr(model, "device", None) or next(model.parameters()).device
    idx = torch.tensor([prompt], device=device)
    out = generate(model, idx, max_new_tokens, temperature=0, stop_token=EOT)[0, len(prompt):].tolist()
    return get_tokenizer().decode(out[: out.index(EOT)] if EOT in out else out)


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
