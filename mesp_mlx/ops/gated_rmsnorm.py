"""Gated RMSNorm (Qwen3.5's RMSNormGated): forward, hand backward, reference.

Letters: any leading dims (B, T, H), Dv the value head dim; y the delta-rule output, z the
gate (in_proj_z), w [Dv] frozen; σ = sigmoid, silu(z) = z σ(z).
  forward   n = rms_norm(y) ⊙ w   (mx.fast.rms_norm, in y's and w's promoted dtype)
            out = silu(z) ⊙ n   in fp32, cast to y's dtype (precise_swiglu)        (..., Dv)
  backward  dz = dout ⊙ n ⊙ σ(z) (1 + z (1 − σ(z)))
            dy = r (h − ŷ mean(h ⊙ ŷ)),  h = dout ⊙ silu(z) ⊙ w   (rmsnorm_backward)
Stored: y and z; r, ŷ = y r and σ(z) are recomputed. No dw (w frozen).
"""

import mlx.core as mx

from .rmsnorm import rmsnorm_backward


def gated_rmsnorm(y, z, w, eps):
    n = mx.fast.rms_norm(y, w, eps)
    zf = z.astype(mx.float32)
    return (zf * mx.sigmoid(zf) * n.astype(mx.float32)).astype(y.dtype)


def gated_rmsnorm_backward(dout, y, z, w, eps):
    """(dy, dz) in y's and z's dtypes."""
    yf, zf = y.astype(mx.float32), z.astype(mx.float32)
    r = mx.rsqrt(mx.mean(yf * yf, axis=-1, keepdims=True) + eps)
    n = yf * r * w.astype(mx.float32)
    sig = mx.sigmoid(zf)
    d = dout.astype(mx.float32)
    dz = d * n * (sig * (1 + zf * (1 - sig)))
    return rmsnorm_backward(d * (zf * sig), y, w, eps), dz.astype(z.dtype)


def gated_rmsnorm_ref(y, z, w, eps):
    yf = y.astype(mx.float32)
    n = yf * mx.rsqrt(mx.mean(yf * yf, axis=-1, keepdims=True) + eps) * w.astype(mx.float32)
    zf = z.astype(mx.float32)
    return (zf * mx.sigmoid(zf) * n).astype(y.dtype)
