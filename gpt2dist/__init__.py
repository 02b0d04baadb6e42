"""gpt2dist: pretrain GPT-2 with DeepSpeed ZeRO, from one CPU to many GPU nodes."""
