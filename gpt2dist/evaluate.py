"""`python -m gpt2dist.evaluate`, kept working: the command is gpt2dist/commands/evaluate.py (`gpt2dist evaluate`)."""

import sys

from gpt2dist.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
