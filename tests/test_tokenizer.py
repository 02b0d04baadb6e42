from gpt2dist.data.tokenizer import EOT, bundled_encoding, get_tokenizer


def test_hello_world():
    assert get_tokenizer().encode_ordinary("Hello world") == [15496, 995]


def test_bundled_ranks_are_gpt2():
    enc = bundled_encoding()
    assert enc.n_vocab == 50257
    assert enc.encode("Hello world<|endoftext|>", allowed_special="all") == [15496, 995, EOT]
    text = "def f(x):\n    return x ** 2  # Ünïcödé, emoji 🙂, and    spaces"
    assert enc.decode(enc.encode_ordinary(text)) == text
    # Same ids as whatever get_tokenizer() picked (tiktoken's download, or this copy offline).
    assert enc.encode_ordinary(text) == get_tokenizer().encode_ordinary(text)
