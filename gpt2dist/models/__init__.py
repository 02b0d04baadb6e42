"""Models: GPT-2 itself (gpt, single-device, free of DeepSpeed), Hugging Face interchange (hf),
and reading weights from any run, checkpoint or Hugging Face directory (weights)."""
