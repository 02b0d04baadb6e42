"""`python -m gpt2dist.compress`, kept working: the command is gpt2dist/commands/compress.py (`gpt2dist compress`)."""

import sys

from gpt2dist.commands.compress import main

if __name__ == "__main__":
    sys.exit(main())
