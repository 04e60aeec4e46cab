"""GeGLU gate (Gemma): forward, hand backward, reference.

Letters: any leading dims, F MLP width.  c = √(2/π), k = 0.044715.
  forward   y = G(a) ⊙ u
            tanh GELU (approx=True, nn.gelu_approx):  G = ½a(1 + t),  t = tanh(c(a + k a³))
            exact GELU (approx=False, nn.gelu):       G = a Φ(a)
  backward  da = dy ⊙ u ⊙ G′(a),   du = dy ⊙ G(a)                       (..., F)
            tanh:  G′ = ½(1 + t) + ½a(1 − t²) c (1 + 3k a²)
            exact: G′ = Φ(a) + a φ(a)
Stored: a (gate) and u (up); G and G′ are recomputed in fp32 and cast back.
"""

import math

import mlx.core as mx
import mlx.nn as nn

_C, _K = math.sqrt(2 / math.pi), 0.044715


def geglu(a, u, approx=True):
    return (nn.gelu_approx(a) if approx else nn.gelu(a)) * u


def _g_and_grad(a, approx):
    a = a.astype(mx.float32)
    if approx:
        t = mx.tanh(_C * (a + _K * a * a * a))
        return 0.5 * a * (1 + t), 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * _C * (1 + 3 * _K * a * a)
    cdf = 0.5 * (1 + mx.erf(a / math.sqrt(2)))
    pdf = mx.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    return a * cdf, cdf + a * pdf


def geglu_backward(dy, a, u, approx=True):
    G, dG = _g_and_grad(a, approx)
    dyf = dy.astype(mx.float32)
    return (dyf * u.astype(mx.float32) * dG).astype(a.dtype), (dyf * G).astype(u.dtype)


def geglu_ref(a, u, approx=True):
    if approx:
        return 0.5 * a * (1 + mx.tanh(_C * (a + _K * a ** 3))) * u
    return a * 0.5 * (1 + mx.erf(a / math.sqrt(2))) * u
