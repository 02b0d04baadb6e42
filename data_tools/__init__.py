"""Command-line tools that turn raw text into corpora gpt2dist trains on."""
