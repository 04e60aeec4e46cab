"""GeGLU gate (Gemma): forward, hand backward, reference.

Letters: any leading dims, F MLP width.  c = √(2/π), k = 0.044715.
  forward   y = G(a) ⊙ u
            tanh GELU (approx=True, nn.gelu_approx):  G = ½a(1 + t),  t = tanh(c(a + k a³))
            exact GELU (approx=False, nn.gelu):       G = a Φ(a)
  backward  da = dy ⊙ u ⊙ G′(a),   du = dy ⊙ G(a)                       (..., F)
            tanh:  G′ = ½(1 + t) + ½a(1 − t²) c (1 + 3k a²)
            exact: G′ = Φ(a) + a φ(a)
Stored: a (gate) and u (up); G and G′ are recomputed in fp32 and cast back (a recompute
that runs `geglu_saving` hands its fp32 t, or Φ, to the backward: one tanh, not two).
"""

import math

import mlx.core as mx
import mlx.nn as nn

_C, _K = math.sqrt(2 / math.pi), 0.044715


def geglu(a, u, approx=True):
    return (nn.gelu_approx(a) if approx else nn.gelu(a)) * u


def _shared(af, approx):
    """What G and G′ share, from fp32 a: t = tanh(c(a + k a³)), or Φ(a)."""
    if approx:
        return mx.tanh(_C * (af + _K * af * af * af))
    return 0.5 * (1 + mx.erf(af / math.sqrt(2)))


def _g_and_grad(af, s, approx):
    """G(a) and G′(a) in fp32 from fp32 a and its shared term s."""
    if approx:
        dG = 0.5 * (1 + s) + 0.5 * af * (1 - s * s) * _C * (1 + 3 * _K * af * af)
        return 0.5 * af * (1 + s), dG
    return af * s, s + af * mx.exp(-0.5 * af * af) / math.sqrt(2 * math.pi)


def geglu_saving(a, u, approx=True):
    """(G(a) ⊙ u, s): the product (computed in fp32 from s, so within rounding of
    `geglu`'s) and s, the fp32 tanh (or Φ) term, which `geglu_backward` then reuses:
    a recompute followed by its backward evaluates the tanh once instead of twice."""
    af = a.astype(mx.float32)
    s = _shared(af, approx)
    G = 0.5 * af * (1 + s) if approx else af * s
    return (G * u.astype(mx.float32)).astype(mx.result_type(a, u)), s


def _backward(dy, a, u, s, approx):
    af = a.astype(mx.float32)
    G, dG = _g_and_grad(af, s, approx)
    dyf = dy.astype(mx.float32)
    return (dyf * u.astype(mx.float32) * dG).astype(a.dtype), (dyf * G).astype(u.dtype)


_BACKWARD = {approx: mx.compile(lambda dy, a, u, s, x=approx: _backward(dy, a, u, s, x))
             for approx in (True, False)}       # one fused pass over the F-wide tensors


def geglu_backward(dy, a, u, approx=True, saved=None):
    """(da, du); saved: `geglu_saving`'s s for this a (else recomputed)."""
    s = _shared(a.astype(mx.float32), approx) if saved is None else saved
    return _BACKWARD[approx](dy, a, u, s)


def geglu_ref(a, u, approx=True):
    if approx:
        return 0.5 * a * (1 + mx.tanh(_C * (a + _K * a ** 3))) * u
    return a * 0.5 * (1 + mx.erf(a / math.sqrt(2))) * u
