"""`python -m gpt2dist.generate`, kept working: the command is gpt2dist/commands/generate.py (`gpt2dist generate`)."""

import sys

from gpt2dist.commands.generate import main

if __name__ == "__main__":
    sys.exit(main())
