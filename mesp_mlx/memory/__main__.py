"""`python -m mesp_mlx.memory`: will it fit? (the command line is memory/cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
