"""Tokenize text into webdataset shards that `train.py data.path=...` reads.

    python -m data_tools.prepare --output data/mycorpus texts/ 'more/*.jsonl.zst' dump.parquet

Inputs: `.jsonl` files (a document per line, in the field named by --text-field), `.parquet`
files (a document per row, in the column named by --text-field), and any other text file (`.txt`,
`.md`, `.py`, `.html`, no extension, ...: a document each); all but Parquet optionally compressed
(`.gz`, `.zst`). Given as files, directories or glob patterns (quoted; `**` for any depth), and
narrowed with --include/--exclude. Binary files, hidden names below an input and files reached
twice (symbolic links) are skipped, and counted in the summary. Tokenization runs on all cores;
the same input and settings give byte-identical shards.

On many machines (slurm/prepare.sbatch runs it as a SLURM array; see data_tools/parts.py):

    python -m data_tools.prepare --output data/mycorpus texts/ --part K --of N   # K = 0 .. N-1, anywhere
    python -m data_tools.prepare --output data/mycorpus texts/ --merge --of N    # once all N are done

gives the same corpus, byte for byte, whatever N is.
"""

import sys

from gpt2dist.arguments import Parser, fraction, positive, positive_number
from gpt2dist.errors import Gpt2distError, report
from data_tools import parts
from data_tools.sources import Documents, describe_skips, input_files
from gpt2dist.data.prepare import prepare_corpus
from gpt2dist.data.shards import DEFAULT_BLOCK_TOKENS


def main(argv: list[str] | None = None) -> int:
    p = Parser("python -m data_tools.prepare", __doc__)
    p.add_argument("inputs", nargs="+", help="files, directories or glob patterns")
    p.add_argument("--output", required=True,
                   help="directory to create (manifest.json and shards), or 'pipe:COMMAND' with {file} where each "
                        "file's name goes, run once per file with the file on its standard input")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="read only files whose name or path matches this glob pattern (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="skip files whose name or path matches this glob pattern (repeatable)")
    p.add_argument("--text-field", default="text", help="JSON Lines field or Parquet column holding the text "
                                                        "(default: text)")
    p.add_argument("--val-fraction", type=fraction, default=0.01, help="share of documents held out (default: 0.01)")
    p.add_argument("--block-tokens", type=positive, default=DEFAULT_BLOCK_TOKENS,
                   help=f"tokens per stored block: the longest seq_len served (default: {DEFAULT_BLOCK_TOKENS})")
    p.add_argument("--shard-mb", type=positive_number, default=256, help="shard size in MB (default: 256)")
    p.add_argument("--workers", type=positive, default=None, help="tokenizer processes (default: one per core)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad documents, lines and files (counted in the manifest) instead of stopping")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a prepared corpus already at --output (never anything else)")
    p.add_argument("--of", type=int, metavar="N",
                   help="prepare in N parts, on N machines: with --part K, tokenize part K; with --merge, write the "
                        "corpus from the N parts")
    p.add_argument("--part", type=int, metavar="K", help="the part to tokenize, 0 to N-1 (into .OUTPUT.parts/ "
                                                         "beside --output)")
    p.add_argument("--merge", action="store_true", help="write --output from the N complete parts, then remove them")
    args = p.parse_args(argv)
    source = " ".join(args.inputs)
    try:
        parts.check_part_options(args.part, args.of, args.merge, args.output)
        files, skips = input_files(args.inputs, args.include, args.exclude)
        plan = None if args.of is None else parts.make_plan(files, args.of, args.text_field, args.val_fraction,
                                                             args.skip_bad)
        if args.part is not None:
            _say_part(*parts.prepare_part(plan, args.part, args.output, source, args.overwrite, args.workers,
                                          inputs=[*args.inputs, *files]),
                      parts.part_dir(args.output, args.part, args.of))
            return 0
        if args.merge:
            manifest, part_skips = parts.merge_parts(plan, args.output, source, args.block_tokens, args.shard_mb,
                                                     args.overwrite, inputs=[*args.inputs, *files])
            skips.update(part_skips)
        else:
            docs = Documents(files, args.text_field, args.skip_bad)
            manifest = prepare_corpus(docs, args.output, source=source, val_fraction=args.val_fraction,
                                      block_tokens=args.block_tokens, shard_mb=args.shard_mb,
                                      overwrite=args.overwrite, workers=args.workers, skipped=lambda: docs.skipped,
                                      inputs=[*args.inputs, *files])
            skips.update(docs.skips)
    except (Gpt2distError, FileExistsError, ValueError) as e:
        return report(e)
    for split, s in manifest["splits"].items():
        print(f"{split}: {s['documents']:,} documents, {s['tokens']:,} tokens in {len(s['shards'])} shards")
    if skips:
        print(f"skipped {skips.total():,} files: {describe_skips(skips)}")
    if manifest["skipped_inputs"]:
        print(f"skipped {manifest['skipped_inputs']:,} bad inputs (--skip-bad)")
    print(f"wrote {args.output}")
    return 0


def _say_part(manifest: dict, already: bool, where) -> None:
    part = f"part {manifest['part']} of {manifest['of']}"
    if already:
        print(f"{part}: already complete in {where}, nothing to do")
    else:
        counts = ", ".join(f"{split} {s['documents']:,} documents, {s['tokens']:,} tokens"
                           for split, s in manifest["splits"].items())
        print(f"{part}: {counts}; wrote {where}")


if __name__ == "__main__":
    sys.exit(main())
