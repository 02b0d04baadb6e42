"""GPT-2's BPE through tiktoken, online or off.

tiktoken's `get_encoding("gpt2")` downloads OpenAI's BPE files on first use and caches them.
Where that fails (no network), we build the same encoding from `assets/gpt2.tiktoken`, the
copy of the GPT-2 ranks that the openai-whisper package ships (MIT licence).
"""

import functools
import json
import math
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

TOKENIZER = "gpt2"  # the name corpora and checkpoints record
EOT = 50256  # <|endoftext|>: separates documents
VOCAB_SIZE = 50257
BUNDLED_RANKS = Path(__file__).resolve().parent / "assets" / "gpt2.tiktoken"
BUNDLED_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def bundled_ranks() -> dict[bytes, int]:
    """GPT-2's BPE ranks (token bytes -> id) from the bundled file."""
    return load_tiktoken_bpe(str(BUNDLED_RANKS), expected_hash=BUNDLED_SHA256)


def bundled_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding from the bundled ranks file, without any network access."""
    return tiktoken.Encoding(
        name=TOKENIZER,
        pat_str=r50k_pat_str,
        mergeable_ranks=bundled_ranks(),
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=VOCAB_SIZE,
    )


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's own GPT-2 encoding where it can be had, else the bundled identical copy."""
    try:
        return tiktoken.get_encoding(TOKENIZER)
    except Exception:  # offline: tiktoken raises whatever its HTTP client raises
        return bundled_encoding()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, in which Hugging Face files spell tokens:
    printable bytes stand for themselves, the others for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair BPE merged into `token`: its bytes merged by the lower ranks only, which leaves two parts."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        rank, i = min((ranks.get(a + b, math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
        if rank >= ranks[token]:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    assert len(parts) == 2, (token, parts)
    return parts[0], parts[1]


def hf_tokenizer_files(model_max_length: int) -> dict[str, str]:
    """GPT-2's tokenizer as Hugging Face files (vocab.json, merges.txt, tokenizer_config.json), derived
    from tiktoken's ranks: `AutoTokenizer.from_pretrained` then encodes exactly as tiktoken does.

    Text is encoded as tiktoken's `encode_ordinary` (`split_special_tokens`): a literal
    "<|endoftext|>" in text is ordinary text, as it was when the training corpus was prepared;
    the end-of-text id (eos_token_id) is added by the caller, as data preparation adds it.
    """
    vocab, merges = _hf_vocab_and_merges()
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "add_prefix_space": False,
        "split_special_tokens": True,
        "errors": "replace",
    }
    return {"vocab.json": vocab, "merges.txt": merges, "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}


@functools.cache
def _hf_vocab_and_merges() -> tuple[str, str]:
    """The text of vocab.json (token -> id) and merges.txt (the merges in rank order), tokens
    spelled as GPT-2's own files spell them."""
    ranks = bundled_ranks()
    to_unicode = _bytes_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()} | {"<|endoftext|>": EOT}
    merges = (_merge_of(token, ranks) for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(token) > 1)
    return (json.dumps(vocab, ensure_ascii=False),
            "#version: 0.2\n" + "".join(f"{spell(a)} {spell(b)}\n" for a, b in merges))
