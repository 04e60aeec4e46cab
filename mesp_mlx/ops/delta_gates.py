"""Gates g, β of the gated delta rule: forward, hand backward, reference.

Letters: B batch, T tokens, H value heads; a, b [B, T, H] (in_proj_a, in_proj_b outputs);
A_log, dt_bias [H] frozen. softplus(x) = log(1 + eˣ), σ = sigmoid.
  forward   g = exp(−exp(A_log) · softplus(a + dt_bias)),   β = σ(b)             [B, T, H]
  backward  da = dg · g · (−exp(A_log)) · σ(a + dt_bias),    db = dβ · β (1 − β)   [B, T, H]
dtypes as mlx-lm: a + dt_bias and softplus in a's dtype, exp(A_log) in fp32, so g is fp32;
β is in b's dtype. The backward runs in fp32 at the same rounded point a + dt_bias.
Stored: a and b; g, β and σ(a + dt_bias) are recomputed (elementwise).
"""

from functools import partial

import mlx.core as mx
import mlx.nn as nn


@partial(mx.compile, shapeless=True)
def _decay(A_log, a, dt_bias):
    return mx.exp(-mx.exp(A_log.astype(mx.float32)) * nn.softplus(a + dt_bias))


def delta_gates(a, b, A_log, dt_bias):
    """(g fp32, β in b's dtype)."""
    return _decay(A_log, a, dt_bias), mx.sigmoid(b)


def delta_gates_backward(dg, dbeta, a, b, A_log, dt_bias):
    """(da, db) in a's and b's dtypes; A_log and dt_bias are frozen."""
    A = mx.exp(A_log.astype(mx.float32))
    x = (a + dt_bias).astype(mx.float32)
    g = mx.exp(-A * nn.softplus(x))
    da = dg.astype(mx.float32) * g * (-A) * mx.sigmoid(x)
    beta = mx.sigmoid(b.astype(mx.float32))
    db = dbeta.astype(mx.float32) * beta * (1 - beta)
    return da.astype(a.dtype), db.astype(b.dtype)


def delta_gates_ref(a, b, A_log, dt_bias):
    sp = mx.logaddexp(a + dt_bias, mx.array(0.0, a.dtype))
    return mx.exp(-mx.exp(A_log.astype(mx.float32)) * sp), mx.sigmoid(b)
