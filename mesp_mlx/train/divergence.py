"""Divergence guard: a non-finite loss, gradient or update stops training.

A NaN step would otherwise be saved over the last good adapters (and every
later snapshot), and the run would exit 0. The check is one reduction over
the LoRA tensors per step (a few MB), negligible next to the step itself.
"""

import math
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import DivergenceError


def all_finite(tree) -> bool:
    leaves = [v for _, v in tree_flatten(tree) if isinstance(v, mx.array)]
    return not leaves or mx.stack([mx.isfinite(v).all() for v in leaves]).all().item()


def first_nonfinite(loss: float, grads=None) -> Optional[str]:
    """'loss' or 'gradient' if that is non-finite, else None."""
    if not math.isfinite(loss):
        return "loss"
    if grads is not None and not all_finite(grads):
        return "gradient"
    return None


def divergence_error(what: str, step: int, last_good: Optional[tuple], lr) -> DivergenceError:
    """DivergenceError saying what diverged, when, and where the last good adapters are."""
    where = (f"{last_good[0]} (iteration {last_good[1]})" if last_good else
             "none (no adapters were saved before this step)")
    return DivergenceError(f"{what} became non-finite at step {step}; last good adapters "
                           f"at {where}. Nothing non-finite was saved. Lower "
                           f"--learning-rate (now {lr:g}), or check --scale and the data, "
                           "and resume with --resume-adapter-file from the last good file")
