"""SwiGLU gate: forward, hand backward, reference.

Letters: any leading dims, F MLP width.  σ = sigmoid.
  forward   y = silu(a) ⊙ u = a σ(a) ⊙ u                    (..., F)
  backward  da = dy ⊙ u ⊙ σ(a) (1 + a (1 − σ(a)))           (..., F)
            du = dy ⊙ a σ(a)                                (..., F)
Stored: a (gate) and u (up); σ(a) and silu(a) are recomputed, never kept across
blocks. Within one recompute, `swiglu_saving` hands σ(a) of the forward to the
backward: one sigmoid per element instead of two. Each function is one compiled
elementwise kernel, σ(a) = 1 / (1 + exp(−a)) in fp32: one pass over the tensor
instead of one per op, and exp instead of MLX's slower sigmoid on the CPU backend
(`python -m bench.probes.elementwise_timing` compares them).
"""

import mlx.core as mx


def _sigmoid(a):
    return 1.0 / (1.0 + mx.exp(-a.astype(mx.float32)))


@mx.compile
def swiglu(a, u):
    af = a.astype(mx.float32)
    return ((af * _sigmoid(a)) * u.astype(mx.float32)).astype(mx.result_type(a, u))


@mx.compile
def swiglu_saving(a, u):
    """(swiglu(a, u), σ(a)): the same values as `swiglu`, and σ(a) (a's dtype) for
    the backward."""
    af, sig = a.astype(mx.float32), _sigmoid(a)
    return (((af * sig) * u.astype(mx.float32)).astype(mx.result_type(a, u)),
            sig.astype(a.dtype))


@mx.compile
def swiglu_from_saved(a, u, sig):
    """swiglu(a, u) from a kept σ(a), without an exp (bit-equal to swiglu in fp32)."""
    return ((a.astype(mx.float32) * sig.astype(mx.float32)) * u.astype(mx.float32)
            ).astype(mx.result_type(a, u))


def _backward(dy, a, u, sig):
    da = dy * u * (sig * (1 + a * (1 - sig)))
    du = dy * (a * sig)
    return da, du


_backward_saved = mx.compile(_backward)
_backward_fresh = mx.compile(lambda dy, a, u: _backward(dy, a, u, _sigmoid(a).astype(a.dtype)))


def swiglu_backward(dy, a, u, sig=None):
    """(da, du); sig: σ(a) from `swiglu_saving` (None: computed here)."""
    return _backward_fresh(dy, a, u) if sig is None else _backward_saved(dy, a, u, sig)


def swiglu_ref(a, u):
    return a * mx.sigmoid(a) * u
