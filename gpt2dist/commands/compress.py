"""Make a model smaller: quantize it, or prune it, into a directory every command loads.

    python -m gpt2dist.compress quantize runs/gpt2 out/gpt2-int8 --method int8-weight
    python -m gpt2dist.compress prune runs/gpt2 out/gpt2-sparse50 --sparsity 0.5
    python -m gpt2dist.compress prune-mlp runs/gpt2 out/gpt2-mlp75 --fraction 0.25 --corpus data/owt

MODEL is anything `gpt2dist.models.weights.load_model` reads (run, checkpoint, Hugging Face or
compressed directory). Methods: int8-weight, int4-weight, int8-dynamic (torchao), bf16, fp16
(see `gpt2dist.models.quantize`). `prune` zeroes the smallest weights (global magnitude) and
`prune-mlp` removes the least important MLP neurons, measured on --corpus (see
`gpt2dist.models.prune`). The output (see `gpt2dist.models.compressed`) records the method and
the source's SHA-256. It is written as gpt2dist.outputs writes every output: staged beside OUT and
swapped in when complete; an existing OUT replaced only with --overwrite, and only if gpt2dist wrote it.
"""

import argparse
import shlex
import sys
from pathlib import Path

import torch

from gpt2dist import outputs
from gpt2dist.arguments import Parser, fraction, positive
from gpt2dist.errors import Gpt2distError, report
from gpt2dist.data.shards import TokenBlocks
from gpt2dist.data.loader import Windows
from gpt2dist.models import compressed, prune
from gpt2dist.models.quantize import METHODS, quantize
from gpt2dist.models.weights import find_checkpoint, load_model
from gpt2dist.evals.loss import rank_batches


class CompressError(Gpt2distError, ValueError):
    """An argument or input compress cannot use (names it)."""


def source_model(path: str) -> torch.nn.Module:
    """The fp32 model to compress; a model that is already quantized or cast is refused."""
    if compressed.is_compressed(path):
        method = compressed.read_manifest(path)["method"]
        if method in METHODS:
            raise CompressError(f"{path}: already quantized ({method}); compress the model it came from "
                                f"({compressed.read_manifest(path)['source']})")
    return load_model(path, "cpu")


def weights_source(path: str) -> Path:
    """The file or directory whose bytes are the model's weights (a run directory's newest checkpoint)."""
    return find_checkpoint(path) or Path(path)


def inputs(args) -> list[str]:
    """What the command reads: the output may not be one, be inside one or hold one."""
    return [args.model, *([args.corpus] if args.command == "prune-mlp" else [])]


def importance_batches(corpus: str, split: str, sequences: int, seq_len: int):
    """Token batches (B, T) of the first `sequences` windows of a corpus split, for neuron importance."""
    windows = Windows(TokenBlocks(corpus, split), seq_len)
    if len(windows) < sequences:
        raise CompressError(f"{corpus}: the {split} split has {len(windows)} windows of {seq_len} tokens, fewer "
                            f"than --sequences {sequences}")
    return (x for x, _ in rank_batches(windows, sequences, 8))


def run(args) -> str:
    """Do what the arguments say; returns the line to print."""
    out = Path(args.output)
    outputs.check(args.output, inputs(args), args.overwrite)  # before any work (the arguments' ranges: their types)
    model = source_model(args.model)
    manifest = {"method": args.command, "source": str(args.model),
                "source_sha256": compressed.source_sha256(weights_source(args.model)),
                "command": "python -m gpt2dist.compress " + shlex.join(args.argv)}
    if args.command == "quantize":
        manifest["method"] = args.method
        quantize(model, args.method)
    elif args.command == "prune":
        manifest["pruned"] = prune.magnitude_prune(model, args.sparsity)
        manifest["sparsity"] = prune.sparsity(model, manifest["pruned"])
    else:
        if args.seq_len > model.config.block_size:
            raise CompressError(f"--seq-len {args.seq_len}: longer than the model's context {model.config.block_size}")
        batches = importance_batches(args.corpus, args.split, args.sequences, args.seq_len)
        model = prune.prune_mlp(model, args.fraction, prune.mlp_importance(model, batches))
        manifest["fraction"] = args.fraction
    with outputs.staged(out, "compressed", inputs(args), args.overwrite) as tmp:
        compressed.save(model, tmp, manifest)
    return f"wrote {out} ({manifest['method']})"


def parser() -> argparse.ArgumentParser:
    p = Parser("python -m gpt2dist.compress", __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    commands = {
        "quantize": sub.add_parser("quantize", help="post-training quantization or a cast"),
        "prune": sub.add_parser("prune", help="unstructured global magnitude pruning"),
        "prune-mlp": sub.add_parser("prune-mlp", help="remove the least important MLP neurons of every block"),
    }
    for c in commands.values():
        c.add_argument("model", help="run, checkpoint, Hugging Face or compressed directory")
        c.add_argument("output", help="directory to write")
        c.add_argument("--overwrite", action="store_true", help="replace OUTPUT if gpt2dist wrote it")
    commands["quantize"].add_argument("--method", required=True, choices=METHODS)
    commands["prune"].add_argument("--sparsity", type=fraction, required=True, help="share of weights zeroed, in [0, 1)")
    mlp = commands["prune-mlp"]
    mlp.add_argument("--fraction", type=fraction, required=True, help="share of each block's MLP neurons removed, "
                                                                      "in [0, 1)")
    mlp.add_argument("--corpus", required=True, help="a prepared corpus to measure neuron importance on")
    mlp.add_argument("--split", default="train")
    mlp.add_argument("--sequences", type=positive, default=64, help="windows scored (default: 64)")
    mlp.add_argument("--seq-len", type=positive, default=256, help="tokens per window (default: 256)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv
    try:
        print(run(args))
    except (Gpt2distError, ValueError) as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
