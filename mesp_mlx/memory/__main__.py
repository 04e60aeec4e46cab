"""`python -m mesp_mlx.memory`: will it fit? (the command line is memory/cli.py)."""

import sys

from .. import blas
from .cli import main

if __name__ == "__main__":
    blas.ensure_fast("mesp_mlx.memory", sys.argv[1:])
    sys.exit(main())
