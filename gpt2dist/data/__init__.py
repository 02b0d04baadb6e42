"""Data: raw text to GPT-2 tokens (tokenizer, prepare), the shard format (shards), the built-in
corpus, and the world-size-independent stream of training batches (loader)."""
