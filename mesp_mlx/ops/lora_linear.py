"""LoRA linear layer: forward, hand-derived backward, autodiff reference.

Letters: T tokens (any leading dims), d_in, d_out, r rank.
  forward   y  = x W0ᵀ (+ b) + s · (x̃ A) B          x̃ = x ⊙ m (dropout, else x̃ = x)
            A: (d_in, r)   B: (r, d_out)   W0: (d_out, d_in) frozen (dense or quantized)
  backward  with g = dL/dy (..., d_out),  h = x̃ A (..., r),  gB = g Bᵀ (..., r):
            dB = s · hᵀ g                    (r, d_out)
            dA = s · x̃ᵀ gB                   (d_in, r)
            dx = g W0 + s · (gB Aᵀ) ⊙ m      (..., d_in)
Stored: only x (the layer input). Recomputed: h = x̃ A, which is T×r and costs
T·d_in·r flops — MeSP's observation that storing h buys almost nothing.
`m` is the dropout multiplier (mask / (1 - p)); the recompute must reuse the
forward's mask, so it is passed in, never redrawn here.
"""

from typing import Optional

import mlx.core as mx

from .dequant_matmul import barrier
from .frozen import FrozenWeight
from .matmul import lift, mm


def _flat(a: mx.array) -> mx.array:
    return a.reshape(-1, a.shape[-1])


def lora_linear(x, W0: FrozenWeight, A=None, B=None, s=1.0, bias=None, m=None):
    """y = x W0ᵀ (+ bias) + s (x̃ A) B.  A/B None: plain frozen linear."""
    y = W0.xWt(x)
    if bias is not None:
        y = y + bias
    if A is not None:
        xt = x if m is None else x * m
        y = y + (s * mm(mm(xt, A), B)).astype(y.dtype)
        barrier(y)                      # its fp32 temporaries go before the next product
    return y


def lora_linear_backward(g, x, W0: FrozenWeight, A=None, B=None, s=1.0, m=None,
                         need_dx=True):
    """Returns (dx, dA, dB); dA/dB are None without LoRA, dx None if not needed."""
    dx = W0.gW(g) if need_dx else None
    if A is None:
        return dx, None, None
    xt = x if m is None else x * m
    gl, xl = lift(g), lift(xt)          # fp32 copies shared by two products (CPU, half)
    gB = mm(gl, B.T, mx.result_type(g, B))                        # (..., r)
    h = mm(xl, A, mx.result_type(xt, A))                          # (..., r) recomputed
    dB = (s * mm(_flat(h).T, _flat(gl), mx.result_type(h, g))).astype(B.dtype)
    dA = (s * mm(_flat(xl).T, _flat(gB), mx.result_type(xt, gB))).astype(A.dtype)
    barrier(gB, dA, dB)                 # the lifted copies go before the next product
    del gl, xl
    if need_dx:
        dxl = s * mm(gB, A.T)
        dx = dx + (dxl if m is None else dxl * m).astype(dx.dtype)
    return dx, dA, dB


def lora_linear_ref(x, W, A, B, s=1.0, bias=None, m=None):
    """Plain reference on a dense W (d_out, d_in), for autodiff comparisons."""
    xt = x if m is None else x * m
    y = x @ W.T + s * ((xt @ A) @ B)
    return y if bias is None else y + bias


def lora_linear_fn(x, A, B, W0: FrozenWeight, s=1.0, bias=None,
                   m: Optional[mx.array] = None):
    """Differentiable wrapper (w.r.t. x, A, B) whose VJP is the hand backward.

    A thin adapter: lets a LoRA layer built on these ops be used inside any
    ordinary MLX autodiff (nn.value_and_grad, mx.checkpoint, mlx-lm's trainer).
    """

    @mx.custom_function
    def f(x, A, B):
        return lora_linear(x, W0, A, B, s, bias, m)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, A, B = primals
        return lora_linear_backward(cotangent, x, W0, A, B, s, m)

    return f(x, A, B)
