"""Rotary position embedding as in mlx-lm's Qwen2 (traditional=False).

Letters: B batch, H heads, T tokens, hd head dim; dims ≤ hd rotated features.
  forward   for each pair (x₁ᵢ, x₂ᵢ) = (x[..., i], x[..., i + dims/2]):
            θᵢ(t) = (t + offset) · base^(−2i/dims)
            (y₁, y₂) = (x₁ cos θ − x₂ sin θ,  x₁ sin θ + x₂ cos θ)
  backward  the rotation is orthogonal, so dx = R(θ)ᵀ dy = R(−θ) dy:
            the same kernel with negated frequencies.
Stored: nothing (the rotation depends only on positions).
"""

import mlx.core as mx


def rope(x, dims, base, offset=0):
    return mx.fast.rope(x, dims, traditional=False, base=base, scale=1.0, offset=offset)


def _neg_periods(dims, base):
    # mx.fast.rope's `freqs` are periods: θ = t / freqs. Negative → R(−θ).
    return -(base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))


def rope_backward(dy, dims, base, offset=0):
    return mx.fast.rope(dy, dims, traditional=False, base=None, scale=1.0,
                        offset=offset, freqs=_neg_periods(dims, base))


def rope_ref(x, dims, base, offset=0):
    T = x.shape[-2]
    half = dims // 2
    inv = base ** (-mx.arange(0, half, dtype=mx.float32) * 2 / dims)       # (dims/2,)
    theta = (mx.arange(T, dtype=mx.float32)[:, None] + offset) * inv     # (T, dims/2)
    cos, sin = mx.cos(theta).astype(x.dtype), mx.sin(theta).astype(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:dims], x[..., dims:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], axis=-1)
