"""The short-conv block (LFM2's conv layers): forward, recompute and hand-derived
backward of a BlockSpec whose mixer is `b.conv`.

Letters: B batch, T tokens, D model, K conv kernel; w [D, K, 1] and c0 [D] (optional)
the frozen depthwise conv weight and bias.
The mixer of a = N_ai(x) (mlx-lm's ShortConv in training mode, no cache):
    [β | γ | ξ] = in_proj(a)  [B,T,3D];  u = β ⊙ ξ;  p = conv(u; w, c0)  (causal, zero history)
    y = γ ⊙ p;   r1 = out_proj(y)          then h = x + α N_ao(r1) and the MLP (block_parts)
Backward, each line the chain rule of one above (ops/causal_conv.py has the conv's):
    dy = out_proj'(dr1);  dγ = dy ⊙ p;  dp = dy ⊙ γ;  du = conv'(dp)
    dβ = du ⊙ ξ;  dξ = du ⊙ β;  da = in_proj'([dβ | dγ | dξ]);  dx = dh + N_ai'(da)
Phases, as the attention block's (block.py):
  1. per token chunk: β, γ, ξ for all T; then p = conv(β ⊙ ξ) over all T (u is freed);
  2. per token chunk: y, r1, h, the MLP forward and backward; dh over G, dγ over γ, dp over p;
  3. du = conv'(dp) over all T (the taps cross chunk boundaries; no weight gradient);
  4. per token chunk: dβ, dξ and in_proj's backward; dx over dh.
Stored for all T: x, β, γ → dγ, ξ, p → dp, du: 4-5 D per token, where an attention
block keeps q, k, v and o (the MLP's T × F tensors exist for one chunk only).
Packed rows: the conv taps never read an earlier example (causal_conv's segments); the
mixer is otherwise position-wise.
"""

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx

from ..ops.causal_conv import causal_conv, causal_conv_backward
from .block_parts import (_frozen, has_lora, lin, lin_bwd, mlp_kept_bytes, norm, norm_bwd,
                          put, rows, second_half, second_half_backward, side_rows, take,
                          token_spans)
from .spec import BlockSpec, ConvSpec


def _segments(packing):
    return None if packing is None else packing.segments


def _wb(c: ConvSpec):
    """The conv's frozen weight and bias, read now (streamed weights swap them in)."""
    conv = c.module.conv
    return conv.weight, conv.get("bias")


def _inputs(b: BlockSpec, x, spans, packing):
    """Phase 1: β, γ, ξ [B, T, D] for all T (a chunk at a time), and p = conv(β ⊙ ξ)."""
    T = x.shape[1]
    beta = gamma = xi = None
    for t0, t1 in spans:
        bc, gc, xc = mx.split(lin(b.conv.in_proj, norm(b.attn_in, x[:, t0:t1]), (t0, T)),
                              3, axis=-1)
        beta, gamma, xi = (put(buf, c, t0, t1, T, 1)
                           for buf, c in ((beta, bc), (gamma, gc), (xi, xc)))
        mx.eval(beta, gamma, xi)
    p = causal_conv(beta * xi, *_wb(b.conv), segments=_segments(packing))
    mx.eval(p)
    return beta, gamma, xi, p


def _out_proj(b: BlockSpec, gamma, p, t0, t1, at):
    """r1 = out_proj(γ ⊙ p) for the token chunk t0…t1."""
    return lin(b.conv.out, gamma[:, t0:t1] * p[:, t0:t1], at)


@dataclass
class ConvKept:
    """What a short-conv block's forward kept so that its backward skips phase 1:
    β, γ, ξ, p, and per token chunk (r1 if N_ao, h, gate, up, r2, σ(gate))."""
    inputs: tuple
    rows: list = field(default_factory=list)

    def take(self):
        out = (self.inputs, self.rows)
        self.inputs = self.rows = None
        return out


def kept_bytes(b: BlockSpec, B: int, T: int, itemsize: int) -> int:
    """Bytes of a short-conv block's ConvKept at [B, T]."""
    D = _frozen(b.conv.out).shape[0]
    per_token = 4 * D + (D if b.attn_out is not None else 0)
    return B * T * per_token * itemsize + mlp_kept_bytes(b, B, T, itemsize)


def block_forward(b: BlockSpec, x, opt, keep: bool = False, packing=None,
                  extras: bool = False, links=None):
    """The block's output (and with keep, the ConvKept its backward reads)."""
    B, T, _ = x.shape
    spans = token_spans(b, opt, B, T)
    inputs = _inputs(b, x, spans, packing)
    _, gamma, _, p = inputs
    kept = ConvKept(inputs) if keep else None
    del inputs
    out = second_half(b, x, spans, lambda t0, t1, at: _out_proj(b, gamma, p, t0, t1, at),
                      kept.rows if keep else None, extras, links)
    return (out, kept) if keep else out


def block_backward(paths, b: BlockSpec, x, g, flat, opt, need_dx=True,
                   kept: Optional[ConvKept] = None, packing=None, links=None):
    """Recompute the block from x (or take `kept`) and backprop G = dL/dout; returns
    dL/dx (LoRA gradients added into `flat`; G's buffer reused for dh, then dx)."""
    B, T, _ = x.shape
    spans = token_spans(b, opt, B, T)
    kept_rows = None
    if kept is None:
        beta, gamma, xi, p = _inputs(b, x, spans, packing)
    else:
        (beta, gamma, xi, p), kept_rows = kept.take()

    # phase 2: dh over G's buffer, dγ over γ's, dp over p's
    cut = take if len(spans) > 1 else rows
    dh = g
    for t0, t1 in spans:
        at = (t0, T)
        xc, gmc, pc, gc = rows(x, t0, t1, 1), cut(gamma, t0, t1, 1), cut(p, t0, t1, 1), \
            cut(dh, t0, t1, 1)
        mx.eval(gmc, pc, gc)
        row = None if kept_rows is None else kept_rows.pop(0)
        dhc, dy = second_half_backward(paths, b, b.conv.out, xc, gc, gmc * pc, flat, at, row,
                                       side_rows(links, t0, t1))
        dgc, dpc = dy * pc, dy * gmc
        del gc, row, dy, gmc, pc
        dh = put(dh, dhc, t0, t1, T, 1)
        gamma, p = put(gamma, dgc, t0, t1, T, 1), put(p, dpc, t0, t1, T, 1)
        mx.eval(dh, gamma, p, *flat.values())
    dgamma, dp = gamma, p
    del gamma, p, dhc, dgc, dpc

    if not need_dx and not has_lora((b.conv.in_proj,)):
        return dh                                           # unused by the caller

    # phase 3: the conv backward over all T (dp stands in for u: only its dtype is read)
    du, _, _ = causal_conv_backward(dp, dp, *_wb(b.conv), segments=_segments(packing))
    del dp
    mx.eval(du)

    # phase 4: dβ, dξ and in_proj's backward per chunk; dx over dh's buffer
    for t0, t1 in spans:
        at = (t0, T)
        xc, duc = rows(x, t0, t1, 1), du[:, t0:t1]
        dbcx = mx.concatenate([duc * xi[:, t0:t1], dgamma[:, t0:t1], duc * beta[:, t0:t1]],
                              axis=-1)
        da = lin_bwd(paths, b.conv.in_proj, dbcx, norm(b.attn_in, xc), flat, need_dx, at)
        if need_dx:
            dhc = cut(dh, t0, t1, 1)
            mx.eval(dhc)
            dh = put(dh, dhc + norm_bwd(b.attn_in, da, xc), t0, t1, T, 1)
            del dhc
        del da, dbcx, duc
        mx.eval(*([dh] if need_dx else []), *flat.values())
    return dh
