"""`mesp_mlx.tuner`: the import path that mirrors `mlx_lm.tuner.trainer`.

    from mesp_mlx.tuner import train     # was: from mlx_lm.tuner.trainer import train

The drop-in itself lives in compat/mlx_lm_tuner.py.
"""

from .compat.mlx_lm_tuner import *            # noqa: F401,F403
from .compat.mlx_lm_tuner import __all__      # noqa: F401
