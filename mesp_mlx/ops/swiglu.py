"""SwiGLU gate: forward, hand backward, reference.

Letters: any leading dims, F MLP width.  σ = sigmoid.
  forward   y = silu(a) ⊙ u = a σ(a) ⊙ u                    (..., F)
  backward  da = dy ⊙ u ⊙ σ(a) (1 + a (1 − σ(a)))           (..., F)
            du = dy ⊙ a σ(a)                                (..., F)
Stored: a (gate) and u (up); σ(a) and silu(a) are recomputed, never kept.
"""

import mlx.core as mx
import mlx.nn as nn


def swiglu(a, u):
    return nn.silu(a) * u


def swiglu_backward(dy, a, u):
    sig = mx.sigmoid(a)
    da = dy * u * (sig * (1 + a * (1 - sig)))
    du = dy * (a * sig)
    return da, du


def swiglu_ref(a, u):
    return a * mx.sigmoid(a) * u
