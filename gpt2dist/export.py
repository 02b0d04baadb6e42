"""`python -m gpt2dist.export`, kept working: the command is gpt2dist/commands/export.py (`gpt2dist export`)."""

import sys

from gpt2dist.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
