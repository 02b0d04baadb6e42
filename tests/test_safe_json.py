"""gpt2dist/safe_json.py: a JSON Lines reader reads on past a bad row, at bounded cost; the refusals
themselves, command by command, are rows of tests/test_hostile_inputs.py."""

import io
import re
import tracemalloc

import pytest

from gpt2dist.errors import BadFile
from gpt2dist.safe_json import MAX_LINE_BYTES, loads, rows


def test_rows_read_on_past_a_bad_row_and_a_line_too_long_at_bounded_cost():
    data = io.BytesIO(b"".join([b'{"n": 1}\n', b"\n", b'{"n": NaN}\n', b'{"text": "' + b"x" * (3 * MAX_LINE_BYTES) +
                                b'"}\n', b"[1]\n", b'{"n": 2}']))  # the last line without a newline
    tracemalloc.start()
    try:
        got = [(where, r if isinstance(r, dict) else str(r)) for where, r in rows(data, "f.jsonl")]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == [("f.jsonl:1", {"n": 1}),
                   ("f.jsonl:3", "f.jsonl:3: malformed JSON (NaN is not JSON)"),
                   ("f.jsonl:4", "f.jsonl:4: a line longer than 32 MiB (a JSON Lines row is at most that; split the "
                                 "document, or give it as a text file of its own)"),
                   ("f.jsonl:5", "f.jsonl:5: not a JSON object (list [1]): a row is one object"),
                   ("f.jsonl:6", {"n": 2})]
    assert peak < 1.5 * MAX_LINE_BYTES  # the 96 MiB line was never held whole


@pytest.mark.parametrize("text, why", [("1e999", "the number 1e999 is beyond a float's range"),
                                       ("-Infinity", "-Infinity is not JSON"),
                                       ("9" * 101, "an integer of 101 digits (at most 100)")])
def test_numbers_are_finite_and_of_bounded_length(text, why):
    with pytest.raises(BadFile, match=re.escape(f"f.json: malformed JSON ({why})")):
        loads(text, "f.json")
    assert loads("[1e308, -12345678901234567890, 0.5]", "f") == [1e308, -12345678901234567890, 0.5]
