"""RMSNorm with a frozen weight: forward, hand backward (w.r.t. x), reference.

Letters: any leading dims, D features.
  forward   r = 1 / sqrt(mean(x²) + eps)      (..., 1)
            x̂ = x · r,   y = x̂ ⊙ w            (..., D)
  backward  dx = r · (dy ⊙ w − x̂ · mean(dy ⊙ w ⊙ x̂))     (..., D)
Stored: x only; r and x̂ are recomputed (one reduction). w is frozen, so no dw.
Computed in fp32 and cast back, like mx.fast.rms_norm.
"""

import mlx.core as mx


def rmsnorm(x, w, eps):
    return mx.fast.rms_norm(x, w, eps)


def rmsnorm_backward(dy, x, w, eps):
    xf = x.astype(mx.float32)
    r = mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)
    xhat = xf * r
    gw = dy.astype(mx.float32) * w.astype(mx.float32)
    dx = r * (gw - xhat * mx.mean(gw * xhat, axis=-1, keepdims=True))
    return dx.astype(x.dtype)


def rmsnorm_ref(x, w, eps):
    xf = x.astype(mx.float32)
    y = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w * y.astype(x.dtype)).astype(x.dtype)
