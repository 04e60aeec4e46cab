"""Causal depthwise conv over time (Qwen3.5, LFM2): forward, hand backward, reference.

Letters: B batch, T tokens, C channels, K kernel; w [C, K, 1] (mlx-lm's nn.Conv1d(C, C, K,
groups=C) layout), b [C]; zero history (mlx-lm pads K − 1 zeros before the first token).
With shift s = K − 1 − j (tap j reads s tokens back) and m_s[t] = 1 (no segments) or
[seg[t − s] = seg[t]] (packed rows: a tap never reads an earlier example):
  forward   p[t] = Σ_j w[:, j] ⊙ m_s[t] x[t − s] + b,    y = p   or   y = silu(p)   [B, T, C]
  backward  dp = dy (or dy ⊙ σ(p)(1 + p(1 − σ(p))) after silu)
            dx[t] = Σ_j w[:, j] ⊙ m_s[t + s] dp[t + s]                             [B, T, C]
            dw[:, j] = Σ_{b,t} dp[t] ⊙ m_s[t] x[t − s]                           [C, K, 1]
            db = Σ_{b,t} dp[t]                                                    [C]
Qwen3.5: silu after, no bias (conv then silu, both in x's dtype); LFM2: optional bias, no
activation. Stored: x only; p is recomputed (K multiply-adds per element).
The forward without segments is mlx-lm's own mx.conv1d (same values); the shifted sums
(segments, backward) run in fp32 and cast back to x's dtype.
"""

import mlx.core as mx
import mlx.nn as nn


def _shift(x, s):
    """x[t − s] along axis 1 with zeros before the start: [B, T, C]."""
    if s == 0:
        return x
    T = x.shape[1]
    if s >= T:
        return mx.zeros_like(x)
    return mx.pad(x[:, :T - s], [(0, 0), (s, 0), (0, 0)])


def _unshift(x, s):
    """x[t + s] along axis 1 with zeros after the end (the adjoint of _shift)."""
    if s == 0:
        return x
    T = x.shape[1]
    if s >= T:
        return mx.zeros_like(x)
    return mx.pad(x[:, s:], [(0, 0), (0, s), (0, 0)])


def _same_segment(segments, s):
    """m_s [B, T, 1] fp32, or None without segments."""
    if segments is None or s == 0:
        return None
    if s >= segments.shape[1]:                       # the tap reads only zero history
        return mx.zeros(segments.shape + (1,), mx.float32)
    same = segments[:, s:] == segments[:, :-s]
    return mx.pad(same, [(0, 0), (s, 0)]).astype(mx.float32)[..., None]


def _taps(w, segments):
    """(shift s, w[:, j] fp32 [C], m_s) for each tap j."""
    K = w.shape[1]
    wf = w.astype(mx.float32)
    return [(K - 1 - j, wf[:, j, 0], _same_segment(segments, K - 1 - j)) for j in range(K)]


def _preact(x, w, b, segments):
    """p in x's dtype: mlx-lm's conv1d, or fp32 shifted sums with segments."""
    if segments is None:
        K = w.shape[1]
        p = mx.conv1d(mx.pad(x, [(0, 0), (K - 1, 0), (0, 0)]), w, groups=x.shape[-1])
        return p if b is None else p + b
    xf = x.astype(mx.float32)
    p = 0.0 if b is None else b.astype(mx.float32)
    for s, wj, m in _taps(w, segments):
        xs = _shift(xf, s)
        p = p + wj * (xs if m is None else m * xs)
    return p.astype(x.dtype)


def causal_conv(x, w, b=None, *, silu=False, segments=None):
    """y [B, T, C] from x [B, T, C], w [C, K, 1], b [C] or None; segments [B, T] or None."""
    p = _preact(x, w, b, segments)
    return nn.silu(p) if silu else p


def causal_conv_backward(dy, x, w, b=None, *, silu=False, segments=None,
                         weight_grads=False):
    """(dx, dw, db) in x's, w's, b's dtypes; dw and db only with weight_grads (else None)."""
    dp = dy.astype(mx.float32)
    if silu:
        p = _preact(x, w, b, segments).astype(mx.float32)
        sig = mx.sigmoid(p)
        dp = dp * sig * (1 + p * (1 - sig))
    dx, dws = 0.0, []
    xf = x.astype(mx.float32) if weight_grads else None
    for s, wj, m in _taps(w, segments):
        dpm = dp if m is None else m * dp
        dx = dx + wj * _unshift(dpm, s)
        if weight_grads:
            dws.append((dpm * _shift(xf, s)).sum((0, 1)))
    if not weight_grads:
        return dx.astype(x.dtype), None, None
    db = None if b is None else dp.sum((0, 1)).astype(b.dtype)
    return dx.astype(x.dtype), mx.stack(dws, axis=1)[..., None].astype(w.dtype), db


def causal_conv_ref(x, w, b=None, *, silu=False, segments=None):
    """Each token from the last K inputs of its own example, zeros before (per-token sum)."""
    K, T = w.shape[1], x.shape[1]
    xp = mx.pad(x, [(0, 0), (K - 1, 0), (0, 0)])
    if segments is not None:
        sp = mx.pad(segments, [(0, 0), (K - 1, 0)])       # history is zeros anyway
    ys = []
    for t in range(T):
        win = xp[:, t:t + K]                                        # [B, K, C]
        if segments is not None:
            win = win * (sp[:, t:t + K] == segments[:, t:t + 1])[..., None]
        ys.append((win * w[:, :, 0].T).sum(1))
    y = mx.stack(ys, axis=1)
    y = y if b is None else y + b
    return nn.silu(y) if silu else y
