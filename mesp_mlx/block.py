"""The generic block: forward, recompute and hand-derived backward of a BlockSpec.

Letters: B batch, T tokens, D model, F MLP width, H/K query/kv heads, hd head dim.
Forward (spec.py has the layout by role):
    a = N_ai(x);  q, k, v = proj(a);  q, k = RoPE(N_q(q)), RoPE(N_k(k))
    o = attn(q, k, v);  r1 = o_proj(o);  h = x + α N_ao(r1)
    m_in = N_mi(h);  g, u = proj(m_in);  m = act(g) ⊙ u;  r2 = down(m);  out = h + α N_mo(r2)
Backward with G = dL/dout (each step the chain rule of one line above):
    dr2 = N_mo'(α G);  dm = down'(dr2);  dg, du = act'(dm);  dh = G + N_mi'(proj'(dg, du))
    dr1 = N_ao'(α dh); do = o_proj'(dr1); dq, dk, dv = attn'(do)
    dq, dk = N_q'(RoPE'(dq)), N_k'(RoPE'(dk));  dx = dh + N_ai'(proj'(dq, dk, dv))
Stored across the mid-block barrier: a, q, k, v (after RoPE), o, r1 if N_ao, the
pre-norm q/k if N_q. Freed there: the MLP's T×F tensors. Recomputed: all of it from
the block input x; down_proj's output only where a post-MLP norm needs it.
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .layers import LoRALinear
from .ops.attention import attention_backward_chunked, attention_chunked
from .ops.frozen import FrozenWeight
from .ops.geglu import geglu, geglu_backward
from .ops.lora_linear import lora_linear, lora_linear_backward
from .ops.rmsnorm import rmsnorm_backward
from .ops.rope import rope_apply, rope_apply_backward
from .ops.swiglu import swiglu, swiglu_backward
from .spec import BlockSpec, Fused, Norm

ACTS = {"silu": (swiglu, swiglu_backward),
        "gelu_tanh": (lambda a, u: geglu(a, u, True),
                      lambda d, a, u: geglu_backward(d, a, u, True)),
        "gelu": (lambda a, u: geglu(a, u, False),
                 lambda d, a, u: geglu_backward(d, a, u, False))}


# ------------------------------------------------------------ projections
def lin(mod, x):
    """Forward of a frozen or LoRA projection."""
    if isinstance(mod, LoRALinear):
        return lora_linear(x, FrozenWeight.of(mod.linear), mod.lora_a, mod.lora_b,
                           mod.scale, mod.linear.get("bias"), mod.drop_multiplier(x))
    return lora_linear(x, FrozenWeight.of(mod), bias=mod.get("bias"))


def lin_bwd(paths, mod, g, x, flat, need_dx=True):
    """dx of a projection; LoRA grads go to `flat` under mlx-lm's names."""
    if not isinstance(mod, LoRALinear):
        return FrozenWeight.of(mod).gW(g) if need_dx else None
    dx, dA, dB = lora_linear_backward(g, x, FrozenWeight.of(mod.linear), mod.lora_a,
                                      mod.lora_b, mod.scale, mod.drop_multiplier(x),
                                      need_dx)
    p = paths[id(mod)]
    flat[p + ".lora_a"], flat[p + ".lora_b"] = dA, dB
    return dx


def proj(p, x):
    """Outputs of separate projections, or the parts of one fused projection."""
    if isinstance(p, Fused):
        y = lin(p.module, x)
        cuts = [sum(p.sizes[:i + 1]) for i in range(len(p.sizes) - 1)]
        return mx.split(y, cuts, axis=-1)
    return [lin(m, x) for m in p]


def proj_bwd(paths, p, grads, x, flat, need_dx=True):
    """Σ dx over the projections (a fused one: one backward of [g1 | g2 | …])."""
    if isinstance(p, Fused):
        return lin_bwd(paths, p.module, mx.concatenate(grads, axis=-1), x, flat, need_dx)
    dxs = [lin_bwd(paths, m, g, x, flat, need_dx) for m, g in zip(p, grads)]
    return sum(dxs[1:], dxs[0]) if need_dx else None


def _norm(n: Optional[Norm], x):
    return x if n is None else n(x)


def _norm_bwd(n: Optional[Norm], dy, x):
    return dy if n is None else rmsnorm_backward(dy, x, n.w, n.eps)


def _scaled(t, a):
    return t if a == 1.0 else t * a


def _heads(t, n):          # [B,T,n·hd] -> [B,n,T,hd]
    B, T, _ = t.shape
    return t.reshape(B, T, n, -1).transpose(0, 2, 1, 3)


def _tokens(t):            # [B,n,T,hd] -> [B,T,n·hd]
    B, n, T, hd = t.shape
    return t.transpose(0, 2, 1, 3).reshape(B, T, n * hd)


# ------------------------------------------------------------ attention
def fused_attention_ok(opt) -> bool:
    """Metal's fused SDPA never materialises the T×T scores; the CPU fallback does."""
    if opt.fused_attention is not None:
        return opt.fused_attention
    return mx.default_device() == mx.gpu and mx.metal.is_available()


def causal_mask(T: int, window: Optional[int] = None):
    """Bool [T, T]: query i keeps keys j with j ≤ i (and i − W < j with a window)."""
    i, j = mx.arange(T)[:, None], mx.arange(T)[None]
    keep = j <= i
    return keep if window is None else keep & (j > i - window)


def layer_mask(b: BlockSpec, T: int):
    """The mask mlx-lm's model hands this block (mebp runs the block itself)."""
    if T == 1:
        return None
    if b.mask_array or (b.window is not None and T > b.window):
        return causal_mask(T, b.window)
    return "causal"


def _chunk(opt, H, T):
    return max(1, opt.attn_chunk_bytes // (4 * H * T))


def _attend(b: BlockSpec, q, k, v, opt):
    T = q.shape[2]
    if b.softcap is None and (fused_attention_ok(opt) or T == 1):
        mask = None if T == 1 else (causal_mask(T, b.window)
                                    if b.window is not None and T > b.window else "causal")
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=b.scale, mask=mask)
    return attention_chunked(q, k, v, b.scale, _chunk(opt, b.H, T), window=b.window,
                             softcap=b.softcap)


def _qk(b: BlockSpec, q, k):
    """Pre-RoPE q/k norms (full width or per head) and RoPE; q, k in token layout."""
    qf, kf = q, k
    if b.q_norm is not None and b.qk_norm_full:
        q, k = b.q_norm(q), b.k_norm(k)
    q, k = _heads(q, b.H), _heads(k, b.K)
    qh, kh = q, k
    if b.q_norm is not None and not b.qk_norm_full:
        q, k = b.q_norm(q), b.k_norm(k)
    if b.rope is not None:
        q, k = rope_apply(q, b.rope), rope_apply(k, b.rope)
    return q, k, (qf, kf) if b.qk_norm_full else (qh, kh)


def _qk_bwd(b: BlockSpec, dq, dk, pre):
    """dq, dk (head layout, after RoPE) -> token layout before the norms."""
    if b.rope is not None:
        dq, dk = rope_apply_backward(dq, b.rope), rope_apply_backward(dk, b.rope)
    if b.q_norm is not None and not b.qk_norm_full:
        dq = _norm_bwd(b.q_norm, dq, pre[0])
        dk = _norm_bwd(b.k_norm, dk, pre[1])
    dq, dk = _tokens(dq), _tokens(dk)
    if b.q_norm is not None and b.qk_norm_full:
        dq = _norm_bwd(b.q_norm, dq, pre[0])
        dk = _norm_bwd(b.k_norm, dk, pre[1])
    return dq, dk


# ------------------------------------------------------------ the block
def attention_half(b: BlockSpec, x, opt):
    """a, (q, k, v, o) after RoPE in head layout, pre-norm q/k, r1, h = x + α N_ao(r1)."""
    a = _norm(b.attn_in, x)
    q, k, v = proj(b.qkv, a)
    q, k, pre = _qk(b, q, k)
    v = _heads(v, b.K)
    o = _attend(b, q, k, v, opt)
    r1 = lin(b.o, _tokens(o))
    return a, (q, k, v, o), pre, r1, x + _scaled(_norm(b.attn_out, r1), b.residual)


def mlp_half(b: BlockSpec, h):
    """m_in, gate, up, m = act(gate) ⊙ up: the MLP up to (not through) down_proj."""
    m_in = _norm(b.mlp_in, h)
    gate, up = proj(b.gate_up, m_in)
    return m_in, gate, up, ACTS[b.act][0](gate, up)


def block_forward(b: BlockSpec, x, opt):
    """The block's output through the same ops as its recompute."""
    h = attention_half(b, x, opt)[-1]
    m = mlp_half(b, h)[-1]
    return h + _scaled(_norm(b.mlp_out, lin(b.down, m)), b.residual)


def block_backward(paths, b: BlockSpec, x, g, flat, opt, need_dx=True):
    """Recompute the block from its input x and backprop G = dL/dout; returns dL/dx
    (LoRA gradients into `flat`). Evaluates once mid-block to free the MLP tensors."""
    a, (q, k, v, o), pre, r1, h = attention_half(b, x, opt)
    if b.attn_out is None:
        r1 = None
    m_in, gate, up, m = mlp_half(b, h)

    # MLP: out = h + α N_mo(down(m))
    dr2 = _scaled(g, b.residual)
    if b.mlp_out is not None:
        dr2 = _norm_bwd(b.mlp_out, dr2, lin(b.down, m))
    dm = lin_bwd(paths, b.down, dr2, m, flat)
    dgate, dup = ACTS[b.act][1](dm, gate, up)
    del m, dm, dr2, gate, up
    dh = g + _norm_bwd(b.mlp_in, proj_bwd(paths, b.gate_up, [dgate, dup], m_in, flat), h)
    del dgate, dup, m_in, h
    mx.eval(dh, a, q, k, v, o, *pre, *([r1] if r1 is not None else []),
            *flat.values())                               # barrier: MLP tensors freed

    # attention: h = x + α N_ao(o_proj(o))
    dr1 = _norm_bwd(b.attn_out, _scaled(dh, b.residual), r1)
    do = _heads(lin_bwd(paths, b.o, dr1, _tokens(o), flat), b.H)
    del dr1, r1
    dq, dk, dv = attention_backward_chunked(do, q, k, v, o, b.scale,
                                            _chunk(opt, b.H, q.shape[2]),
                                            window=b.window, softcap=b.softcap)
    del do, q, k, v, o
    dq, dk = _qk_bwd(b, dq, dk, pre)
    da = proj_bwd(paths, b.qkv, [dq, dk, _tokens(dv)], a, flat, need_dx)
    if not need_dx:
        return dh                                           # unused by the caller
    return dh + _norm_bwd(b.attn_in, da, x)
