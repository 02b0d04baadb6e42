"""`python -m gpt2dist.lmeval`, kept working: the command is gpt2dist/commands/lmeval.py (`gpt2dist lmeval`)."""

import sys

from gpt2dist.commands.lmeval import main

if __name__ == "__main__":
    sys.exit(main())
