"""Export a gpt2dist checkpoint as a Hugging Face GPT-2 directory: config.json, model.safetensors,
and GPT-2's tokenizer (vocab.json, merges.txt, tokenizer_config.json).

    python -m gpt2dist.export runs/gpt2 exported/gpt2
    # in Python: transformers.GPT2LMHeadModel.from_pretrained("exported/gpt2"),
    #            transformers.AutoTokenizer.from_pretrained("exported/gpt2")

The source is a run directory (its newest checkpoint) or one checkpoint directory, of any ZeRO
stage, or a pruned or cast directory of `gpt2dist.compress` (not a quantized one). Weights are
consolidated and written one tensor at a time, into a directory staged beside OUTPUT and swapped in
when complete (gpt2dist.outputs): OUTPUT is new or empty, or with --overwrite one gpt2dist wrote.

A run that trained adapters (peft=lora, peft=ia3) is exported merged into its base, a plain GPT-2
directory as above; with --adapter, as the adapter alone in PEFT's format instead:

    python -m gpt2dist.export runs/lora exported/lora-adapter --adapter
    # in Python: peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(<base>), "exported/lora-adapter")

A classifier (task=classify) is written as `GPT2ForSequenceClassification`, its labels in config.json:

    # in Python: transformers.GPT2ForSequenceClassification.from_pretrained("exported/classifier")
"""

import sys
from pathlib import Path

from omegaconf import OmegaConf

from gpt2dist import outputs
from gpt2dist.arguments import Parser
from gpt2dist.errors import Gpt2distError, report
from gpt2dist.models import adapters, compressed
from gpt2dist.models.hf import export_hf, save_hf_dir
from gpt2dist.models.weights import WeightsError, checkpoint_weights, find_adapter, find_checkpoint, load_adapted


def export_checkpoint(source: str | Path, out_dir: str | Path, adapter: bool = False, overwrite: bool = False) -> Path:
    """Write the checkpoint that `source` names (see `gpt2dist.models.weights.find_checkpoint`), or the
    compressed directory it is, to out_dir; with `adapter`, a peft run's adapter in PEFT's format. The
    output is written as gpt2dist.outputs writes every output: staged, then swapped in (an existing
    out_dir replaced only with `overwrite`, and only if gpt2dist wrote it)."""
    kind = "adapter" if adapter else "export"
    outputs.check(out_dir, [source], overwrite)  # before anything is loaded
    if compressed.is_compressed(source):
        if adapter:
            raise WeightsError(f"{source}: a compressed model, which has no adapter: export it without --adapter")
        config, tensors = compressed.plain_tensors(source)
        state = dict(tensors)
        with outputs.staged(out_dir, kind, [source], overwrite) as tmp:
            save_hf_dir(config, {k: v.shape for k, v in state.items()}, state.__getitem__, tmp)
        return Path(out_dir)
    ckpt_dir = find_checkpoint(source)
    if ckpt_dir is None:
        raise WeightsError(f"{source}: not a gpt2dist run or checkpoint directory (no checkpoints/latest, "
                           "no config.yaml with model states)")
    if (found := find_adapter(ckpt_dir)) is not None:
        model = load_adapted(found)
        if adapter and model.config.labels:
            raise WeightsError(f"{ckpt_dir}: a classifier's adapters are written merged only (its head trained in "
                               "full): export without --adapter")
        with outputs.staged(out_dir, kind, [source], overwrite) as tmp:
            if adapter:
                saved = OmegaConf.load(ckpt_dir / "config.yaml")
                adapters.save_adapter(model, saved.peft, tmp, base=saved.train.init_from)
            else:
                export_hf(adapters.merge(model), tmp)
        return Path(out_dir)
    if adapter:
        raise WeightsError(f"{ckpt_dir}: trained every weight (peft.method=none): there is no adapter to export")
    weights = checkpoint_weights(ckpt_dir)
    with outputs.staged(out_dir, kind, [source], overwrite) as tmp:
        save_hf_dir(weights.config, weights.shapes, weights.tensor, tmp)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    p = Parser("python -m gpt2dist.export", __doc__)
    p.add_argument("source", help="run directory or checkpoint directory")
    p.add_argument("output", help="directory to write (new or empty, or with --overwrite one gpt2dist wrote)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if gpt2dist wrote it")
    p.add_argument("--adapter", action="store_true",
                   help="a run that trained adapters: write the adapter alone, in PEFT's format (default: merged)")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.source, args.output, args.adapter, args.overwrite)
    except (Gpt2distError, OSError) as e:
        return report(e)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
