"""xIELU activation (Apertus): forward, hand backward, reference.

Letters: any leading dims, F MLP width. Frozen scalars α_p, α_n, β, ε (the layer's
XieLU parameters, ε < 0 tiny); a_p = softplus(α_p), a_n = β + softplus(α_n).
  forward   y = a_p x² + β x                          x > 0
            y = a_n (expm1(min(x, ε)) − x) + β x      x ≤ 0                (..., F)
  backward  dx = dy ⊙ (2 a_p x + β)                   x > 0
            dx = dy ⊙ (a_n (e^x [x < ε] − 1) + β)     x ≤ 0                (..., F)
The MLP is not gated: m = xielu(up(x)), down(m). Stored: x (up's output) only; the
derivative is recomputed in fp32 and cast back. The forward is mlx-lm's expression,
op for op, in the input's dtype (so bf16 rounds as the model does).
"""

import mlx.core as mx
import mlx.nn as nn


def _coefs(alpha_p, alpha_n, beta):
    return nn.softplus(alpha_p), beta + nn.softplus(alpha_n)


def xielu(x, alpha_p, alpha_n, beta, eps):
    ap, an = _coefs(alpha_p, alpha_n, beta)
    return mx.where(x > 0, ap * mx.square(x) + beta * x,
                    (mx.expm1(mx.minimum(x, eps)) - x) * an + beta * x)


def xielu_backward(dy, x, alpha_p, alpha_n, beta, eps):
    f = mx.float32
    ap, an = (c.astype(f) for c in _coefs(alpha_p, alpha_n, beta))
    xf, b = x.astype(f), beta.astype(f)
    neg = an * (mx.where(xf < eps.astype(f), mx.exp(xf), 0.0) - 1.0) + b
    return (dy.astype(f) * mx.where(xf > 0, 2 * ap * xf + b, neg)).astype(x.dtype)


def xielu_ref(x, alpha_p, alpha_n, beta, eps):
    """Written out per branch with the softplus expanded."""
    ap = mx.log1p(mx.exp(alpha_p))
    an = beta + mx.log1p(mx.exp(alpha_n))
    pos = ap * x * x + beta * x
    neg = an * (mx.exp(mx.minimum(x, eps)) - 1 - x) + beta * x
    return mx.where(x > 0, pos, neg)
