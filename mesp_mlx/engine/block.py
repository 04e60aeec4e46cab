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
Everything but attn is position-wise, so it runs over token chunks (`token_spans`:
the widest chunk tensor, T_c × F, holds about opt.token_chunk_bytes), one
evaluation per chunk, LoRA gradients summed over chunks. Four phases:
  1. q, k, v for all T, chunk by chunk (kept: pre-norm q/k too if N_q);
  2. attention → o; per chunk: h, the MLP forward and backward, dh, do and δ
     (dh written over G, do over o);
  3. attention backward in query blocks (ops/attention.py) → dq, dk, dv;
  4. per chunk: RoPE'/N_q' and the q/k/v backward; dx written over dh.
Kept for all T: x, q, k, v, o → do, G → dh → dx, dq, dk, dv (T × (D, H·hd, K·hd)):
the MLP's T × F tensors exist for one chunk only.
Packed rows (packing.py, `packing` not None): RoPE at each token's position in its
example and a block-diagonal causal mask; None is the plain path, unchanged.
"""

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn

from .lora_layers import LoRALinear
from ..ops.attention import (attention, attention_backward_rows, attention_chunked,
                             attention_delta)
from ..ops.frozen import FrozenWeight
from ..ops.geglu import geglu, geglu_backward
from ..ops.lora_linear import lora_linear, lora_linear_backward
from ..ops.rmsnorm import rmsnorm_backward
from ..ops.rope import (rope_apply, rope_apply_at, rope_apply_at_backward,
                        rope_apply_backward)
from ..ops.swiglu import swiglu, swiglu_backward, swiglu_from_saved, swiglu_saving
from .spec import BlockSpec, Fused, Norm


class Act(NamedTuple):
    """A GLU activation's ops: m = act(gate) ⊙ up, its backward, and what a
    recompute can hand from the forward to the backward (`saved`, e.g. σ(gate))."""
    forward: Callable            # (a, u) -> m
    saving: Callable             # (a, u) -> (m, saved or None)
    backward: Callable           # (dm, a, u, saved or None) -> (da, du)
    from_saved: Optional[Callable] = None   # (a, u, saved) -> m; None: nothing to keep


def _geglu_act(approx: bool) -> Act:
    fwd = lambda a, u: geglu(a, u, approx)                       # noqa: E731
    return Act(fwd, lambda a, u: (fwd(a, u), None),
               lambda d, a, u, _: geglu_backward(d, a, u, approx))


ACTS = {"silu": Act(swiglu, swiglu_saving, swiglu_backward, swiglu_from_saved),
        "gelu_tanh": _geglu_act(True), "gelu": _geglu_act(False)}


# ------------------------------------------------------------ projections
def _frozen(mod) -> FrozenWeight:
    return FrozenWeight.of(mod.linear if isinstance(mod, LoRALinear) else mod)


def lin(mod, x, at=None):
    """Forward of a frozen or LoRA projection; at = (t0, T) when x is a token chunk
    (the chunk's rows of the dropout mask)."""
    if isinstance(mod, LoRALinear):
        return lora_linear(x, FrozenWeight.of(mod.linear), mod.lora_a, mod.lora_b,
                           mod.scale, mod.linear.get("bias"), mod.drop_multiplier(x, at))
    return lora_linear(x, FrozenWeight.of(mod), bias=mod.get("bias"))


def lin_bwd(paths, mod, g, x, flat, need_dx=True, at=None):
    """dx of a projection; LoRA grads are added into `flat` under mlx-lm's names."""
    if not isinstance(mod, LoRALinear):
        return FrozenWeight.of(mod).gW(g) if need_dx else None
    dx, dA, dB = lora_linear_backward(g, x, FrozenWeight.of(mod.linear), mod.lora_a,
                                      mod.lora_b, mod.scale, mod.drop_multiplier(x, at),
                                      need_dx)
    p = paths[id(mod)]
    _acc(flat, p + ".lora_a", dA)
    _acc(flat, p + ".lora_b", dB)
    return dx


def _acc(flat, key, d):
    flat[key] = d if key not in flat else flat[key] + d


def proj(p, x, at=None):
    """Outputs of separate projections, or the parts of one fused projection."""
    if isinstance(p, Fused):
        y = lin(p.module, x, at)
        cuts = [sum(p.sizes[:i + 1]) for i in range(len(p.sizes) - 1)]
        return mx.split(y, cuts, axis=-1)
    return [lin(m, x, at) for m in p]


def proj_bwd(paths, p, grads, x, flat, need_dx=True, at=None):
    """Σ dx over the projections (a fused one: one backward of [g1 | g2 | …])."""
    if isinstance(p, Fused):
        return lin_bwd(paths, p.module, mx.concatenate(grads, axis=-1), x, flat, need_dx,
                       at)
    dxs = [lin_bwd(paths, m, g, x, flat, need_dx, at) for m, g in zip(p, grads)]
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


# ------------------------------------------------------------ token chunks
def block_width(b: BlockSpec) -> int:
    """F, the MLP width (down_proj's input)."""
    return _frozen(b.down).shape[1]


MERGE_TAIL = 4   # a last chunk under 1/4 of the rows joins the chunk before it


def spans(T: int, n: int):
    """[(t0, t1)] chunks of n rows over T, a tail shorter than n / MERGE_TAIL merged
    into the chunk before (≤ 1.25 n rows): one pass fewer over every weight, which
    on the CPU's quantized path is one dequantization fewer (T 256 at F 4864: 215 +
    41 rows were two passes), for at most a quarter more chunk memory."""
    cuts = list(range(0, T, n))
    if len(cuts) > 1 and (T - cuts[-1]) * MERGE_TAIL < n:
        cuts.pop()
    return [(t, T if i + 1 == len(cuts) else cuts[i + 1]) for i, t in enumerate(cuts)]


def token_spans(b: BlockSpec, opt, B: int, T: int):
    """[(t0, t1)]: token chunks whose widest tensor, [B, T_c, F] in fp32, holds about
    opt.token_chunk_bytes (one chunk when T is short; see `spans` for the tail)."""
    F = block_width(b)
    return spans(T, max(1, opt.token_chunk_bytes // (4 * B * F)))


def _rows(a, t0, t1, axis):
    return a[(slice(None),) * axis + (slice(t0, t1),)]


def _take(a, t0, t1, axis):
    """A copy of rows t0…t1 (a token-axis slice), so that writing the chunk's result
    into `a` afterwards (`_put`) reuses a's buffer instead of copying all of it."""
    return mx.contiguous(_rows(a, t0, t1, axis))


def _put(buf, part, t0, t1, T, axis):
    """Rows t0…t1 of an all-T result: `part` itself if it spans T, else written into
    buf (allocated on first use; MLX updates a sole-owner buffer in place)."""
    if t1 - t0 == T:
        return part
    if buf is None:
        shape = list(part.shape)
        shape[axis] = T
        buf = mx.zeros(shape, part.dtype)
    buf[(slice(None),) * axis + (slice(t0, t1),)] = part
    return buf


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


def _segments(packing):
    return None if packing is None else packing.segments


def probs_bytes(b: BlockSpec, opt, B: int, T: int) -> int:
    """Bytes of P a recompute could keep for its backward (0: it cannot): on the
    unfused path, uncapped, when all T query rows are one attention block (H·T²
    fp32 within opt.attn_chunk_bytes). Kept, the backward skips that block's QKᵀ
    and softmax (exp costs 9 ns an element on the CPU backend:
    bench/elementwise_timing.py)."""
    if b.softcap is not None or T == 1 or fused_attention_ok(opt) or _chunk(opt, b.H, T) < T:
        return 0
    return 4 * B * b.H * T * T


def keeps_probs(b: BlockSpec, opt, T: int) -> bool:
    """Whether this block's recompute keeps P (EngineOptions.keep_probs, set by the
    activation plan when the budget covers probs_bytes)."""
    return opt.keep_probs and probs_bytes(b, opt, 1, T) > 0


def _attend(b: BlockSpec, q, k, v, opt, packing=None, probs=False):
    """o (head layout); probs (when `keeps_probs`): (o, P)."""
    T = q.shape[2]
    if probs:
        return attention(q, k, v, b.scale, window=b.window, segments=_segments(packing))
    if b.softcap is None and (fused_attention_ok(opt) or T == 1):
        if T == 1:
            mask = None
        elif packing is not None:
            mask = packing.fused_mask(b.window)
        else:
            mask = (causal_mask(T, b.window) if b.window is not None and T > b.window
                    else "causal")
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=b.scale, mask=mask)
    return attention_chunked(q, k, v, b.scale, _chunk(opt, b.H, T), window=b.window,
                             softcap=b.softcap, segments=_segments(packing))


def _rope(x, spec, t0, packing, backward=False):
    """RoPE (or its backward) of a token chunk starting at t0: at offset t0, or at
    the chunk's positions within their packed examples."""
    if packing is None:
        return (rope_apply_backward if backward else rope_apply)(x, spec, t0)
    pos = packing.rows(t0, t0 + x.shape[2])
    return (rope_apply_at_backward if backward else rope_apply_at)(x, spec, pos)


def _qk(b: BlockSpec, q, k, t0=0, packing=None):
    """Pre-RoPE q/k norms (full width or per head) and RoPE at positions t0… (or
    the packed positions); q, k in token layout."""
    qf, kf = q, k
    if b.q_norm is not None and b.qk_norm_full:
        q, k = b.q_norm(q), b.k_norm(k)
    q, k = _heads(q, b.H), _heads(k, b.K)
    qh, kh = q, k
    if b.q_norm is not None and not b.qk_norm_full:
        q, k = b.q_norm(q), b.k_norm(k)
    if b.rope is not None:
        q, k = _rope(q, b.rope, t0, packing), _rope(k, b.rope, t0, packing)
    return q, k, (qf, kf) if b.qk_norm_full else (qh, kh)


def _qk_bwd(b: BlockSpec, dq, dk, pre, t0=0, packing=None):
    """dq, dk (head layout, after RoPE) -> token layout before the norms."""
    if b.rope is not None:
        dq = _rope(dq, b.rope, t0, packing, backward=True)
        dk = _rope(dk, b.rope, t0, packing, backward=True)
    if b.q_norm is not None and not b.qk_norm_full:
        dq = _norm_bwd(b.q_norm, dq, pre[0])
        dk = _norm_bwd(b.k_norm, dk, pre[1])
    dq, dk = _tokens(dq), _tokens(dk)
    if b.q_norm is not None and b.qk_norm_full:
        dq = _norm_bwd(b.q_norm, dq, pre[0])
        dk = _norm_bwd(b.k_norm, dk, pre[1])
    return dq, dk


# ------------------------------------------------------------ the block
def _has_lora(p) -> bool:
    return any(isinstance(m, LoRALinear) for m in ((p.module,) if isinstance(p, Fused) else p))


def _pre_axis(b: BlockSpec):
    return 1 if b.qk_norm_full else 2      # token layout [B,T,·] or heads [B,n,T,hd]


def attention_inputs(b: BlockSpec, x, spans, packing=None):
    """Phase 1: q, k (after RoPE), v in head layout for all T, and the pre-norm q/k
    (if the block has q/k norms), one token chunk at a time."""
    T = x.shape[1]
    q = k = v = pq = pk = None
    for t0, t1 in spans:
        at = (t0, T)
        qc, kc, vc = proj(b.qkv, _norm(b.attn_in, x[:, t0:t1]), at)
        qc, kc, (pqc, pkc) = _qk(b, qc, kc, t0, packing)
        q, k, v = (_put(buf, c, t0, t1, T, 2)
                   for buf, c in ((q, qc), (k, kc), (v, _heads(vc, b.K))))
        if b.q_norm is not None:
            ax = _pre_axis(b)
            pq, pk = _put(pq, pqc, t0, t1, T, ax), _put(pk, pkc, t0, t1, T, ax)
        mx.eval(q, k, v, *([pq, pk] if b.q_norm is not None else []))
    return q, k, v, (pq, pk)


def mlp_half(b: BlockSpec, h, at=None, saving=False):
    """m_in, gate, up, m = act(gate) ⊙ up: the MLP up to (not through) down_proj;
    saving: m is (m, what the act's backward reuses, e.g. σ(gate))."""
    m_in = _norm(b.mlp_in, h)
    gate, up = proj(b.gate_up, m_in, at)
    act = ACTS[b.act]
    return m_in, gate, up, (act.saving if saving else act.forward)(gate, up)


def _residual_in(b: BlockSpec, x, o, at):
    """r1 = o_proj(o), h = x + α N_ao(r1) for a token chunk (o in head layout)."""
    r1 = lin(b.o, _tokens(o), at)
    return r1, x + _scaled(_norm(b.attn_out, r1), b.residual)


@dataclass
class Kept:
    """What a block's forward kept so that its backward skips the recompute
    (EngineOptions.activation_budget): q, k, v (after RoPE), pre-norm q/k, o, and
    per token chunk (r1 if N_ao, h, gate, up, r2 if N_mo, σ(gate) with extras).
    m_in = N_mi(h) and m = act(gate) ⊙ up are elementwise, so they are recomputed
    even then. With extras (`extra_bytes`) also P of the attention and σ(gate)
    (SwiGLU), so the backward runs no exp at all, like autodiff's."""
    q: mx.array
    k: mx.array
    v: mx.array
    pre: tuple
    o: mx.array
    rows: list = field(default_factory=list)
    p: Optional[mx.array] = None

    def take(self):
        """The tensors, handed over: the backward then owns (and frees) them."""
        out = (self.q, self.k, self.v, self.pre, self.o, self.rows, self.p)
        self.q = self.k = self.v = self.o = self.pre = self.rows = self.p = None
        return out


def kept_bytes(b: BlockSpec, B: int, T: int, itemsize: int) -> int:
    """Bytes of a block's Kept at [B, T] (exactly the arrays block_forward keeps)."""
    D, F = _frozen(b.o).shape[0], _frozen(b.down).shape[1]
    per_token = (2 * b.H + 2 * b.K) * b.hd + D + 2 * F
    per_token += (b.H + b.K) * b.hd if b.q_norm is not None else 0
    per_token += D if b.attn_out is not None else 0
    per_token += D if b.mlp_out is not None else 0
    return B * T * per_token * itemsize


def extra_bytes(b: BlockSpec, opt, B: int, T: int, itemsize: int) -> int:
    """Bytes a Kept holds beyond kept_bytes with extras: P (probs_bytes) and σ(gate)
    (SwiGLU only: B·T·F)."""
    sig = B * T * block_width(b) * itemsize if ACTS[b.act].from_saved is not None else 0
    return probs_bytes(b, opt, B, T) + sig


def block_forward(b: BlockSpec, x, opt, keep: bool = False, packing=None,
                  extras: bool = False):
    """The block's output through the same ops as its recompute; with keep, also
    the Kept its backward reads instead of recomputing: (out, Kept); with extras,
    the Kept also holds P and σ(gate) (`extra_bytes`)."""
    B, T, _ = x.shape
    spans = token_spans(b, opt, B, T)
    q, k, v, pre = attention_inputs(b, x, spans, packing)
    p = None
    if keep and extras and probs_bytes(b, opt, B, T) > 0:
        o, p = _attend(b, q, k, v, opt, packing, probs=True)
    else:
        o = _attend(b, q, k, v, opt, packing)
    kept = Kept(q, k, v, pre, o, p=p) if keep else None
    del q, k, v, pre, p
    saving = keep and extras and ACTS[b.act].from_saved is not None
    out = None
    for t0, t1 in spans:
        at = (t0, T)
        r1, h = _residual_in(b, x[:, t0:t1], o[:, :, t0:t1], at)
        _, gate, up, m = mlp_half(b, h, at, saving=saving)
        m, sig = m if saving else (m, None)
        r2 = lin(b.down, m, at)
        out = _put(out, h + _scaled(_norm(b.mlp_out, r2), b.residual), t0, t1, T, 1)
        if keep:
            kept.rows.append((r1 if b.attn_out is not None else None, h, gate, up,
                              r2 if b.mlp_out is not None else None, sig))
        del r1, h, gate, up, m, r2, sig
        if len(spans) > 1 or keep:
            mx.eval(out, *([a for a in kept.rows[-1] if a is not None] if keep else []))
    return (out, kept) if keep else out


def _mlp_chunk_backward(paths, b: BlockSpec, x, o, g, flat, at, row=None):
    """Phase 2 for one chunk: recompute h and the MLP (or take them from `row`, a
    Kept chunk), backprop G; returns (dh, do, δ) of the chunk (o, do head layout)."""
    if row is None:
        r1, h = _residual_in(b, x, o, at)
        m_in, gate, up, (m, saved) = mlp_half(b, h, at, saving=True)
        r2 = lin(b.down, m, at) if b.mlp_out is not None else None
    elif row[5] is not None:                       # σ(gate) kept (extras)
        r1, h, gate, up, r2, saved = row
        m_in, m = _norm(b.mlp_in, h), ACTS[b.act].from_saved(gate, up, saved)
    else:
        r1, h, gate, up, r2, _ = row
        m_in, (m, saved) = _norm(b.mlp_in, h), ACTS[b.act].saving(gate, up)
    dr2 = _scaled(g, b.residual)
    if b.mlp_out is not None:
        dr2 = _norm_bwd(b.mlp_out, dr2, r2)
    dm = lin_bwd(paths, b.down, dr2, m, flat, at=at)
    dgate, dup = ACTS[b.act].backward(dm, gate, up, saved)
    del m, dm, dr2, gate, up, r2, saved
    dh = g + _norm_bwd(b.mlp_in, proj_bwd(paths, b.gate_up, [dgate, dup], m_in, flat,
                                          at=at), h)
    del dgate, dup, m_in, h
    dr1 = _norm_bwd(b.attn_out, _scaled(dh, b.residual), r1)
    do = _heads(lin_bwd(paths, b.o, dr1, _tokens(o), flat, at=at), b.H)
    return dh, do, attention_delta(do, o)


def block_backward(paths, b: BlockSpec, x, g, flat, opt, need_dx=True,
                   kept: Optional[Kept] = None, packing=None):
    """Recompute the block from its input x (or take its forward's `kept` tensors)
    and backprop G = dL/dout; returns dL/dx (LoRA gradients added into `flat`).
    Over several token chunks G's buffer is reused for dL/dh and then dL/dx (the
    caller must not read g afterwards)."""
    B, T, _ = x.shape
    spans = token_spans(b, opt, B, T)
    rows = p = None
    if kept is None:
        q, k, v, pre = attention_inputs(b, x, spans, packing)
        if keeps_probs(b, opt, T):
            o, p = _attend(b, q, k, v, opt, packing, probs=True)
        else:
            o = _attend(b, q, k, v, opt, packing)
        mx.eval(o, *([] if p is None else [p]))
    else:
        q, k, v, pre, o, rows, p = kept.take()

    # phase 2: dh over G's buffer, do over o's, δ = rowsum(do ⊙ o)
    take = _take if len(spans) > 1 else _rows
    dh, delta = g, None
    for t0, t1 in spans:
        xc, oc, gc = _rows(x, t0, t1, 1), take(o, t0, t1, 2), take(dh, t0, t1, 1)
        mx.eval(oc, gc)
        row = None if rows is None else rows.pop(0)
        dhc, doc, dc = _mlp_chunk_backward(paths, b, xc, oc, gc, flat, (t0, T), row)
        del oc, gc, row
        dh = _put(dh, dhc, t0, t1, T, 1)
        o = _put(o, doc, t0, t1, T, 2)
        delta = _put(delta, dc, t0, t1, T, 2)
        mx.eval(dh, o, delta, *flat.values())
    do = o
    del o, dhc, doc, dc

    # phase 3: attention backward in query blocks
    dq, dk, dv = attention_backward_rows(
        lambda t0, t1: (do[:, :, t0:t1], delta[:, :, t0:t1]), q, k, v, b.scale,
        _chunk(opt, b.H, T), window=b.window, softcap=b.softcap,
        segments=_segments(packing), p=p)
    del do, delta, q, k, v, p
    if not need_dx and not _has_lora(b.qkv):
        return dh                                           # unused by the caller

    # phase 4: q/k/v backward per chunk; dx over dh's buffer
    for t0, t1 in spans:
        at = (t0, T)
        xc = _rows(x, t0, t1, 1)
        dqc, dkc = _qk_bwd(b, dq[:, :, t0:t1], dk[:, :, t0:t1],
                           [None if p is None else _rows(p, t0, t1, _pre_axis(b))
                            for p in pre], t0, packing)
        da = proj_bwd(paths, b.qkv, [dqc, dkc, _tokens(dv[:, :, t0:t1])],
                      _norm(b.attn_in, xc), flat, need_dx, at)
        if need_dx:
            dhc = take(dh, t0, t1, 1)
            mx.eval(dhc)
            dh = _put(dh, dhc + _norm_bwd(b.attn_in, da, xc), t0, t1, T, 1)
            del dhc
        del da, dqc, dkc
        mx.eval(*([dh] if need_dx else []), *flat.values())
    return dh
