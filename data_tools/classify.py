"""Prepare classification examples for `python train.py task=classify data.path=...`.

    python -m data_tools.classify --output data/topics --seq-len 128 examples.jsonl      # split by hash
    python -m data_tools.classify --output data/topics --seq-len 128 --train train.jsonl --dev dev.jsonl --test test.jsonl

Input: JSON Lines (optionally `.gz` or `.zst`), one example a line: `{"text": ..., "label": ...}`
(field names: --text-field, --label-field; the labels are all strings or all integers: 1 and "1"
in one input are refused, naming both lines). Splits as for `data_tools.sft`: given as files, or by
a stable hash of each text. The label set is --labels (in that order), or else the labels of the
train split, sorted (integers by value: 1, 2, 10); at most 50,257 of them. The manifest records it
with the count of each label in each split. See `gpt2dist.data.classify` for the format.

A bad row (malformed JSON, a missing field, an empty text, a text longer than --seq-len, a label
outside the label set: in any split when --labels gives it, in dev and test when it comes from
train) stops the preparation with one line naming the file and line, and nothing is written;
--skip-bad skips such rows instead, and counts them in the manifest.
"""

import sys

from data_tools.sft import Rows, examples_parser, input_paths, prepare_and_report
from data_tools.sources import InputError
from gpt2dist.data.classify import LabelledText, label_ids, prepare_classify, text_ids
from gpt2dist.data.sft import SPLITS

LABELS_SHOWN = 10  # labels an error lists


class LabelledRows(Rows):
    """The labelled texts of JSON Lines files (see `Rows`)."""

    def _example(self, raw: bytes, where: str) -> LabelledText:
        text_field, label_field = self.fields
        record = self._record(raw, where, (text_field,))
        label = record.get(label_field)
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise InputError(f"{where}: no string or integer field {label_field!r}")
        text_ids(record[text_field], self.seq_len)  # refuses an empty text or one too long
        return LabelledText(record[text_field], str(label), where, numeric=isinstance(label, int))

    def check_labels(self, splits: dict[str, list[LabelledText]], given: list[str] | None) -> list[str]:
        """The label set (`given`, or the train split's, sorted: integers by value); examples with a label
        outside it are bad rows. Integer and string labels together are refused, naming a line of each."""
        first = {}  # numeric or not: the first example so
        for e in (e for split in SPLITS for e in splits[split]):
            first.setdefault(e.numeric, e)
        if len(first) == 2:
            raise InputError(f"{first[True].where}: label {first[True].label} is an integer, but {first[False].where}"
                             f" has the string label {first[False].label!r}: labels must be all strings or all "
                             "integers (1 and \"1\" would be one label)")
        numeric = first.get(True) is not None
        labels = given or sorted({e.label for e in splits["train"]}, key=int if numeric else None)
        shown = ", ".join(labels[:LABELS_SHOWN]) + (", ..." if len(labels) > LABELS_SHOWN else "")
        label_ids(labels, "--labels" if given else "the train split's labels")
        named = f"--labels ({shown})" if given else f"the train split's labels ({shown})"
        for split in SPLITS:
            if given or split != "train":
                for e in splits[split]:
                    if e.label not in labels:
                        self._bad(f"{e.where}: label {e.label!r} is not among {named}")
                splits[split] = [e for e in splits[split] if e.label in labels]
        return labels


def main(argv: list[str] | None = None) -> int:
    p = examples_parser("python -m data_tools.classify", __doc__)
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--labels", nargs="+", help="the label set, in the order of the class ids (default: the train "
                                               "split's labels, sorted)")
    args = p.parse_args(argv)
    if args.labels and len(set(args.labels)) != len(args.labels):
        p.error("--labels: each label once")
    rows = LabelledRows(args.text_field, args.label_field, args.seq_len, args.skip_bad)
    return prepare_and_report(
        p, args, rows,
        lambda splits, split_by, source: prepare_classify(splits, rows.check_labels(splits, args.labels), args.output,
                                                          args.seq_len, source, args.overwrite, rows.skipped, split_by,
                                                          input_paths(args)),
        lambda manifest: f"{len(manifest['labels'])} labels")


if __name__ == "__main__":
    sys.exit(main())
