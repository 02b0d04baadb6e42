"""The command-line programs, one module each; `gpt2dist <verb>` runs them (gpt2dist/cli.py)."""
