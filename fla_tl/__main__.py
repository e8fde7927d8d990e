"""`python -m fla_tl <command>`: the command line (`fla_tl.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
