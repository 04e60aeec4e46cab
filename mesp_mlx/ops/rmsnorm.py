"""RMSNorm with a frozen (effective) weight: forward, hand backward (w.r.t. x), reference.

Letters: any leading dims, D features (per-head q/k norms: the last axis, hd).
  forward   r = 1 / sqrt(mean(x²) + eps)      (..., 1)
            x̂ = x · r,   y = x̂ ⊙ w            (..., D)     w None: y = x̂
  backward  dx = r · (g − x̂ · mean(g ⊙ x̂)),  g = dy ⊙ w    (..., D)
The effective weight is w (nn.RMSNorm), 1 + w (mlx-lm's gemma RMSNorm) or none;
`effective_weight` computes 1 + w exactly as mlx-lm does, so bf16 rounding matches.
Stored: x only; r and x̂ are recomputed (one reduction). w is frozen, so no dw.
Computed in fp32 and cast back, like mx.fast.rms_norm.
"""

import mlx.core as mx


def effective_weight(w, kind: str):
    """w for kind "w", 1 + w for "1+w", None for "none"."""
    if kind == "w":
        return w
    if kind == "1+w":
        return 1.0 + w
    if kind == "none":
        return None
    raise ValueError(f"unknown norm kind {kind!r} (w, 1+w, none)")


def rmsnorm(x, w, eps):
    return mx.fast.rms_norm(x, w, eps)


def rmsnorm_backward(dy, x, w, eps):
    xf = x.astype(mx.float32)
    r = mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)
    xhat = xf * r
    gw = dy.astype(mx.float32)
    if w is not None:
        gw = gw * w.astype(mx.float32)
    dx = r * (gw - xhat * mx.mean(gw * xhat, axis=-1, keepdims=True))
    return dx.astype(x.dtype)


def rmsnorm_ref(x, w, eps):
    xf = x.astype(mx.float32)
    y = (xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return y if w is None else (w * y).astype(x.dtype)
