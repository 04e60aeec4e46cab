"""q/k L2 norm of the gated delta rule (normalize_qk): forward, hand backward, reference.

Letters: any leading dims, Dk the head dim; c an inv_scale (Dk^-½ in mlx-lm), ε = eps.
mlx-lm writes the L2 norm (ε added to Σx²) as an RMSNorm with ε·c² added to mean(x²):
  forward   q' = c² · rms_norm(q, ε c²),   k' = c · rms_norm(k, ε c²)           (..., Dk)
            with c = Dk^-½:  q' = c · q / sqrt(Σq² + ε),  k' = k / sqrt(Σk² + ε)
  backward  rms_norm with a constant weight a (a = c² for q, c for k):
            dx = r (a dy − x̂ · mean(a dy ⊙ x̂)),  r = 1 / sqrt(mean(x²) + ε c²),  x̂ = x r
Stored: q, k (the conv outputs); r and x̂ are recomputed (one reduction per row).
The scaling multiplies the rms_norm output in its dtype, as mlx-lm does.
"""

import mlx.core as mx

from .rmsnorm import rmsnorm_backward


def normalize_qk(q, k, *, inv_scale, eps):
    """(q', k') exactly as mlx_lm.models.gated_delta.normalize_qk."""
    rms_eps = eps * inv_scale**2
    q = (inv_scale**2) * mx.fast.rms_norm(q, None, rms_eps)
    k = inv_scale * mx.fast.rms_norm(k, None, rms_eps)
    return q, k


def normalize_qk_backward(dq, dk, q, k, *, inv_scale, eps):
    """(dq, dk) in q's and k's dtypes."""
    rms_eps = eps * inv_scale**2
    wq, wk = mx.array(inv_scale**2, mx.float32), mx.array(inv_scale, mx.float32)
    return (rmsnorm_backward(dq, q, wq, rms_eps), rmsnorm_backward(dk, k, wk, rms_eps))


def normalize_qk_ref(q, k, *, inv_scale, eps):
    def norm(x, a):
        xf = x.astype(mx.float32)
        r = mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps * inv_scale**2)
        return (a * (xf * r)).astype(x.dtype)
    return norm(q, inv_scale**2), norm(k, inv_scale)
