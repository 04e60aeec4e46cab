"""SwiGLU gate: forward, hand backward, reference.

Letters: any leading dims, F MLP width.  σ = sigmoid.
  forward   y = silu(a) ⊙ u = a σ(a) ⊙ u                    (..., F)
  backward  da = dy ⊙ u ⊙ σ(a) (1 + a (1 − σ(a)))           (..., F)
            du = dy ⊙ a σ(a)                                (..., F)
Stored: a (gate) and u (up); σ(a) and silu(a) are recomputed, never kept across
blocks. Within one recompute, `swiglu_saving` hands σ(a) of the forward to the
backward: one sigmoid per element instead of two (on the CPU backend a sigmoid
costs about as much as one of the MLP's matmuls: bench/RESULTS.md, issue 13).
"""

import mlx.core as mx
import mlx.nn as nn


def swiglu(a, u):
    return nn.silu(a) * u


def swiglu_saving(a, u):
    """(swiglu(a, u), σ(a)): the same values as `swiglu`, and σ(a) for the backward."""
    sig = mx.sigmoid(a)
    return (a * sig) * u, sig


def swiglu_backward(dy, a, u, sig=None):
    """(da, du); sig: σ(a) from `swiglu_saving` (None: computed here)."""
    sig = mx.sigmoid(a) if sig is None else sig
    da = dy * u * (sig * (1 + a * (1 - sig)))
    du = dy * (a * sig)
    return da, du


def swiglu_ref(a, u):
    return a * mx.sigmoid(a) * u
