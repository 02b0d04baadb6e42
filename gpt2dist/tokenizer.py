"""GPT-2's BPE through tiktoken, online or off.

tiktoken's `get_encoding("gpt2")` downloads OpenAI's BPE files on first use and caches them.
Where that fails (no network), we build the same encoding from `assets/gpt2.tiktoken`, the
copy of the GPT-2 ranks that the openai-whisper package ships (MIT licence).
"""

import functools
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

EOT = 50256  # <|endoftext|>: separates documents
VOCAB_SIZE = 50257
BUNDLED_RANKS = Path(__file__).resolve().parent / "assets" / "gpt2.tiktoken"
BUNDLED_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def bundled_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding from the bundled ranks file, without any network access."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=load_tiktoken_bpe(str(BUNDLED_RANKS), expected_hash=BUNDLED_SHA256),
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=VOCAB_SIZE,
    )


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's own GPT-2 encoding where it can be had, else the bundled identical copy."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # offline: tiktoken raises whatever its HTTP client raises
        return bundled_encoding()
