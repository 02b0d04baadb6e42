"""Prepare supervised fine-tuning examples for `python train.py task=sft data.path=...`.

    python -m data_tools.sft --output data/qa --seq-len 256 examples.jsonl           # split by hash
    python -m data_tools.sft --output data/qa --seq-len 256 --train train.jsonl --dev dev.jsonl --test test.jsonl

Input: JSON Lines (optionally `.gz` or `.zst`), one example a line: `{"prompt": ..., "response": ...}`
(field names: --prompt-field, --response-field). Either given split by split (--train, --dev,
--test), or as files split by a stable hash of each example (--dev-fraction, --test-fraction):
the same example always lands in the same split. The dev set is the corpus's `val` split, the one
training validates on. See `gpt2dist.data.sft` for the format (one example per sequence, the loss
on the response only).

A bad row (malformed JSON, or JSON that `gpt2dist.safe_json` refuses; a line longer than 32 MiB; a
missing or non-string field, an empty response, a prompt too long for --seq-len) stops the preparation
with one line naming the file and line, and nothing is written; --skip-bad skips such rows instead, and
counts them in the manifest.
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from gpt2dist.arguments import Parser, fraction, positive
from gpt2dist.errors import BadFile, Gpt2distError, report
from gpt2dist.safe_json import lines, row
from data_tools.sources import READ_ERRORS, SKIPS_SHOWN, InputError, _open
from gpt2dist.data.prepare import check_output
from gpt2dist.data.sft import Example, ExampleError, encode, prepare_sft, split_by_hash


class Rows:
    """The examples of JSON Lines files, each row read by `gpt2dist.safe_json`; bad rows raise InputError or
    BadFile (file:line: why) or, with `skip_bad`, are skipped and counted."""

    def __init__(self, prompt_field: str, response_field: str, seq_len: int, skip_bad: bool):
        self.fields, self.seq_len, self.skip_bad = (prompt_field, response_field), seq_len, skip_bad
        self.skipped = 0

    def _bad(self, message: str) -> None:
        if not self.skip_bad:
            raise InputError(message)
        self.skipped += 1
        if self.skipped <= SKIPS_SHOWN:
            print(f"skipped {message}", file=sys.stderr)

    def read(self, path: Path) -> list[Example]:
        examples = []
        try:
            with _open(path) as f:
                for where, raw in lines(f, path):
                    if isinstance(raw, BadFile):  # a line too long
                        self._bad(str(raw))
                        continue
                    try:
                        examples.append(self._example(raw, where))
                    except (BadFile, InputError, ExampleError) as e:
                        self._bad(f"{where}: {e}" if isinstance(e, ExampleError) else str(e))
        except READ_ERRORS as e:
            raise InputError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
        return examples

    def _record(self, raw: bytes, where: str, strings: tuple[str, ...]) -> dict:
        """The row's JSON object (as `gpt2dist.safe_json.row` reads it), checked to have the fields `strings`
        as strings."""
        record = row(raw, where)
        for field in strings:
            if not isinstance(record.get(field), str):
                raise InputError(f"{where}: no string field {field!r}")
        return record

    def _example(self, raw: bytes, where: str) -> Example:
        record = self._record(raw, where, self.fields)
        example = Example(record[self.fields[0]], record[self.fields[1]])
        encode(example, self.seq_len)  # refuses an empty response or a prompt too long
        return example


def examples_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A command line for a preparation of examples (this command's and data_tools.classify's): its
    inputs and outputs; the caller adds its own fields."""
    p = Parser(prog, doc)
    p.add_argument("inputs", nargs="*", help="JSON Lines files to split by hash")
    p.add_argument("--train", nargs="+", default=[], help="files of the train split (instead of a hash split)")
    p.add_argument("--dev", nargs="+", default=[], help="files of the dev split (the corpus's val split)")
    p.add_argument("--test", nargs="+", default=[], help="files of the test split")
    p.add_argument("--output", required=True, help="directory to create")
    p.add_argument("--seq-len", type=positive, required=True, help="tokens per example: data.seq_len of the training run")
    p.add_argument("--dev-fraction", type=fraction, default=0.1, help="hash split: share for dev (default: 0.1)")
    p.add_argument("--test-fraction", type=fraction, default=0.1, help="hash split: share for test (default: 0.1)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad rows (counted in the manifest) instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared corpus at --output (nothing else)")
    return p


def read_splits(p: argparse.ArgumentParser, args: argparse.Namespace, rows: Rows) -> tuple[dict[str, list], str, str]:
    """The examples of each split (train, val, test) as the arguments give them, how they were split,
    and where they came from."""
    if bool(args.inputs) == bool(args.train):
        p.error("give either input files to split by hash, or --train (with --dev and --test)")
    if args.train:
        splits = {split: [e for f in files for e in rows.read(Path(f))]
                  for split, files in (("train", args.train), ("val", args.dev), ("test", args.test))}
        return splits, "files", " ".join(args.train + args.dev + args.test)
    if args.dev_fraction + args.test_fraction >= 1:
        p.error(f"--dev-fraction {args.dev_fraction} + --test-fraction {args.test_fraction}: must be below 1, or no "
                "example is left for train")
    splits = split_by_hash((e for f in args.inputs for e in rows.read(Path(f))), args.dev_fraction, args.test_fraction)
    return splits, f"hash (dev {args.dev_fraction}, test {args.test_fraction})", " ".join(args.inputs)


def input_paths(args: argparse.Namespace) -> list[str]:
    """Every input file the arguments name (the output may not be one, be inside one or hold one)."""
    return [*args.inputs, *args.train, *args.dev, *args.test]


def prepare_and_report(p: argparse.ArgumentParser, args: argparse.Namespace, rows: Rows,
                       prepare: Callable[[dict[str, list], str, str], dict], detail: Callable[[dict], str]) -> int:
    """Read the splits, write the corpus with `prepare(splits, split_by, source)` (returns its manifest) and
    report it, `detail(manifest)` last on the counts line; a bad input is one line and exit status 2.
    (This command's and data_tools.classify's.)"""
    try:
        check_output(args.output, args.overwrite, input_paths(args))  # before reading any input
        splits, split_by, source = read_splits(p, args, rows)
        manifest = prepare(splits, split_by, source)
    except (Gpt2distError, FileExistsError) as e:
        return report(e)
    counts = manifest["examples"]
    print(f"examples: {counts['train']:,} train, {counts['val']:,} dev, {counts['test']:,} test; {detail(manifest)}")
    if rows.skipped:
        print(f"skipped {rows.skipped:,} bad rows (--skip-bad)")
    print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = examples_parser("python -m data_tools.sft", __doc__)
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--response-field", default="response")
    args = p.parse_args(argv)
    rows = Rows(args.prompt_field, args.response_field, args.seq_len, args.skip_bad)
    return prepare_and_report(
        p, args, rows,
        lambda splits, split_by, source: prepare_sft(splits, args.output, args.seq_len, source, args.overwrite,
                                                     rows.skipped, split_by, input_paths(args)),
        lambda manifest: f"{manifest['truncated_responses']:,} responses cut at {args.seq_len} tokens")


if __name__ == "__main__":
    sys.exit(main())
