"""Compatibility with mlx-lm's Python API: `mlx_lm.tuner.trainer.train` as a drop-in."""
