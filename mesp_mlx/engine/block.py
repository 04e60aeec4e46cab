"""The generic block: forward, recompute and hand-derived backward of a BlockSpec.

Letters: B batch, T tokens, D model, F MLP width, H/K query/kv heads, hd head dim.
Forward (spec.py has the layout by role):
    a = N_ai(x);  q, k, v = proj(a);  q, k = RoPE(N_q(q)), RoPE(N_k(k))
    o = attn(q, k, v);  ô = o ⊙ σ(z) (q_gate) or o;  r1 = o_proj(ô);  h = x + α N_ao(r1)
    m_in = N_mi(h);  g, u = proj(m_in);  m = act(g) ⊙ u;  r2 = down(m);  out = h + α N_mo(r2)
Backward with G = dL/dout (each step the chain rule of one line above):
    dr2 = N_mo'(α G);  dm = down'(dr2);  dg, du = act'(dm);  dh = G + N_mi'(proj'(dg, du))
    dr1 = N_ao'(α dh);  dô = o_proj'(dr1);  do = dô ⊙ σ(z),  dz = dô ⊙ o ⊙ σ(z)(1 − σ(z))
    dq, dk, dv = attn'(do);  dq, dk = N_q'(RoPE'(dq)), N_k'(RoPE'(dk))
    dx = dh + N_ai'(proj'([dq | dz per head], dk, dv))
Everything but attn is position-wise, so it runs over token chunks (`token_spans`:
the widest chunk tensor, T_c × F, holds about opt.token_chunk_bytes), one
evaluation per chunk, LoRA gradients summed over chunks. Four phases:
  1. q, k, v for all T, chunk by chunk (kept: pre-norm q/k too if N_q, the gate z);
  2. attention → o; per chunk: h, the MLP forward and backward, dh, do and δ
     (dh written over G, do over o, dz over z);
  3. attention backward in query blocks (ops/attention.py) → dq, dk, dv;
  4. per chunk: RoPE'/N_q' and the q/k/v backward; dx written over dh.
Kept for all T: x, q, k, v, o → do, G → dh → dx, dq, dk, dv (T × (D, H·hd, K·hd)):
the MLP's T × F tensors exist for one chunk only.
A KV-shared block (b.kv_from, gemma4) projects q only and attends over its source's
K, V (links.py: kept from the source's forward); its phase 3 hands dK, dV back, which
the source adds to its own before its phase 4. N_v (gemma4) is a per-head norm of v
like N_k's, kept pre-norm like q/k. A gated DeltaNet block (b.delta) and a short-conv
block (b.conv) run the same phases with their own mixers: deltanet.py and
short_conv.py, dispatched from block_forward / block_backward.
Packed rows (packing.py, `packing` not None): RoPE at each token's position in its
example and a block-diagonal causal mask; None is the plain path, unchanged.
"""

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import mlx.core as mx

from . import deltanet, short_conv
from ..ops.attention import (attention, attention_backward_rows, attention_chunked,
                             attention_delta)
from ..ops.rope import (rope_apply, rope_apply_at, rope_apply_at_backward,
                        rope_apply_backward)
from .block_parts import (_frozen, block_width, has_lora, lin,  # noqa: F401
                          mlp_kept_bytes, norm, norm_bwd, proj, proj_bwd, put, rows,
                          second_half, second_half_backward, side_rows, sig_bytes, spans,
                          take, token_spans)
from .links import BlockLinks
from .spec import BlockSpec


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
    """The mask mlx-lm's model hands this block (mebp runs the block itself); a
    DeltaNet or short-conv layer gets none in training (create_ssm_mask, no cache)."""
    if T == 1 or b.delta is not None or b.conv is not None:
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
    bench/probes/elementwise_timing.py)."""
    if b.mixer != "attention" or b.softcap is not None or T == 1 or fused_attention_ok(opt) \
            or _chunk(opt, b.H, T) < T:
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
    the packed positions); q, k in token layout, k None in a KV-shared block."""
    qf, kf = q, k
    if b.q_norm is not None and b.qk_norm_full:
        q, k = b.q_norm(q), b.k_norm(k)
    q, k = _heads(q, b.H), None if k is None else _heads(k, b.K)
    qh, kh = q, k
    if b.q_norm is not None and not b.qk_norm_full:
        q, k = b.q_norm(q), None if k is None else b.k_norm(k)
    if b.rope is not None:
        q = _rope(q, b.rope, t0, packing)
        k = None if k is None else _rope(k, b.rope, t0, packing)
    return q, k, (qf, kf) if b.qk_norm_full else (qh, kh)


def _qk_bwd(b: BlockSpec, dq, dk, pre, t0=0, packing=None):
    """dq, dk (head layout, after RoPE) -> token layout before the norms (dk None in
    a KV-shared block)."""
    if b.rope is not None:
        dq = _rope(dq, b.rope, t0, packing, backward=True)
        dk = None if dk is None else _rope(dk, b.rope, t0, packing, backward=True)
    if b.q_norm is not None and not b.qk_norm_full:
        dq = norm_bwd(b.q_norm, dq, pre[0])
        dk = None if dk is None else norm_bwd(b.k_norm, dk, pre[1])
    dq, dk = _tokens(dq), None if dk is None else _tokens(dk)
    if b.q_norm is not None and b.qk_norm_full:
        dq = norm_bwd(b.q_norm, dq, pre[0])
        dk = norm_bwd(b.k_norm, dk, pre[1])
    return dq, dk


# ------------------------------------------------------------ the output gate
def _split_gate(qz, H):
    """q_proj's output [B, T, H·2hd] -> query, gate [B, T, H·hd] (per head: the first
    hd features are the query, the next hd the gate, as mlx-lm splits them)."""
    B, T, _ = qz.shape
    q, z = mx.split(qz.reshape(B, T, H, -1), 2, axis=-1)
    return q.reshape(B, T, -1), z.reshape(B, T, -1)


def _join_gate(dq, dz, H):
    """The inverse layout: [dq | dz] per head -> [B, T, H·2hd]."""
    B, T, _ = dq.shape
    return mx.concatenate([dq.reshape(B, T, H, -1), dz.reshape(B, T, H, -1)],
                          axis=-1).reshape(B, T, -1)


def _gated(b: BlockSpec, o_tok, z):
    """ô = o ⊙ σ(z) in the model's dtype (q_gate), else o."""
    return o_tok * mx.sigmoid(z) if b.q_gate else o_tok


def _gated_bwd(b: BlockSpec, dô, o_tok, z):
    """(do, dz) of ô = o ⊙ σ(z) (dz None without a gate)."""
    if not b.q_gate:
        return dô, None
    sig = mx.sigmoid(z.astype(mx.float32))
    d = dô.astype(mx.float32)
    dz = d * o_tok.astype(mx.float32) * sig * (1 - sig)
    return (d * sig).astype(dô.dtype), dz.astype(z.dtype)


# ------------------------------------------------------------ the block
class Pre(NamedTuple):
    """Phase 1's all-T tensors beside q, k, v: the pre-norm q/k (when the block has
    q/k norms), the output gate z (q_gate) and the pre-norm v (N_v), else None."""
    q: Optional[mx.array] = None
    k: Optional[mx.array] = None
    z: Optional[mx.array] = None
    v: Optional[mx.array] = None


def _pre_axis(b: BlockSpec):
    return 1 if b.qk_norm_full else 2      # token layout [B,T,·] or heads [B,n,T,hd]


def attention_inputs(b: BlockSpec, x, spans, packing=None, links=None):
    """Phase 1: q, k (after RoPE), v in head layout for all T, and Pre (the pre-norm
    q/k if the block has q/k norms, the output gate, the pre-norm v), one token chunk
    at a time; a KV-shared block projects q only and takes K, V from `links`."""
    T = x.shape[1]
    shared = b.kv_from is not None
    q = k = v = pq = pk = z = pv = None
    for t0, t1 in spans:
        at = (t0, T)
        qkv = proj(b.qkv, norm(b.attn_in, x[:, t0:t1]), at)
        qc, kc, vc = (qkv[0], None, None) if shared else qkv
        if b.q_gate:
            qc, zc = _split_gate(qc, b.H)
            z = put(z, zc, t0, t1, T, 1)
        qc, kc, (pqc, pkc) = _qk(b, qc, kc, t0, packing)
        q = put(q, qc, t0, t1, T, 2)
        if not shared:
            vc = _heads(vc, b.K)
            if b.v_norm is not None:
                pv, vc = put(pv, vc, t0, t1, T, 2), b.v_norm(vc)
            k, v = put(k, kc, t0, t1, T, 2), put(v, vc, t0, t1, T, 2)
        if b.q_norm is not None:
            ax = _pre_axis(b)
            pq = put(pq, pqc, t0, t1, T, ax)
            pk = None if shared else put(pk, pkc, t0, t1, T, ax)
        mx.eval(*[a for a in (q, k, v, pq, pk, z, pv) if a is not None])
    if shared:
        k, v = links.kv
    return q, k, v, Pre(pq, pk, z, pv)


def _o_proj(b: BlockSpec, o, z, at):
    """r1 = o_proj(ô) for a token chunk (o in head layout; ô gated by σ(z) if any)."""
    return lin(b.o, _gated(b, _tokens(o), z), at)


@dataclass
class Kept:
    """What a block's forward kept so that its backward skips the recompute
    (EngineOptions.activation_budget): q, k, v (after RoPE), Pre, o, and
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


def kept_bytes(b: BlockSpec, B: int, T: int, itemsize: int, opt=None) -> int:
    """Bytes of a block's Kept at [B, T] (exactly the arrays block_forward keeps;
    a DeltaNet block's states depend on opt's chunks: default ones without opt; a
    KV-shared block's K, V are its source's, counted there)."""
    if b.delta is not None:
        return deltanet.kept_bytes(b, B, T, itemsize, opt)
    if b.conv is not None:
        return short_conv.kept_bytes(b, B, T, itemsize)
    D = _frozen(b.o).shape[0]
    kv = 0 if b.kv_from is not None else 1
    per_token = (2 * b.H + 2 * b.K * kv) * b.hd
    per_token += (b.H + b.K * kv) * b.hd if b.q_norm is not None else 0
    per_token += b.K * b.hd * kv if b.v_norm is not None else 0
    per_token += b.H * b.hd if b.q_gate else 0
    per_token += D if b.attn_out is not None else 0
    return B * T * per_token * itemsize + mlp_kept_bytes(b, B, T, itemsize)


def extra_bytes(b: BlockSpec, opt, B: int, T: int, itemsize: int) -> int:
    """Bytes a Kept holds beyond kept_bytes with extras: P (probs_bytes) and σ(gate)
    (SwiGLU only: B·T·F)."""
    return probs_bytes(b, opt, B, T) + sig_bytes(b, B, T, itemsize)


def block_forward(b: BlockSpec, x, opt, keep: bool = False, packing=None,
                  extras: bool = False, links: Optional[BlockLinks] = None):
    """The block's output through the same ops as its recompute; with keep, also
    the Kept its backward reads instead of recomputing: (out, Kept); with extras,
    the Kept also holds P and σ(gate) (`extra_bytes`). A source of shared K, V hands
    them to `links`."""
    if b.delta is not None:
        return deltanet.block_forward(b, x, opt, keep, packing, extras)
    if b.conv is not None:
        return short_conv.block_forward(b, x, opt, keep, packing, extras, links)
    B, T, _ = x.shape
    spans = token_spans(b, opt, B, T)
    q, k, v, pre = attention_inputs(b, x, spans, packing, links)
    if links is not None and links.export:
        links.put_kv(k, v)
    p = None
    if keep and extras and probs_bytes(b, opt, B, T) > 0:
        o, p = _attend(b, q, k, v, opt, packing, probs=True)
    else:
        o = _attend(b, q, k, v, opt, packing)
    kept = Kept(q, k, v, pre, o, p=p) if keep else None
    z = pre.z
    del q, k, v, pre, p

    def o_proj(t0, t1, at):
        return _o_proj(b, o[:, :, t0:t1], None if z is None else z[:, t0:t1], at)
    out = second_half(b, x, spans, o_proj, kept.rows if keep else None, extras, links)
    return (out, kept) if keep else out


def _mlp_chunk_backward(paths, b: BlockSpec, x, o, z, g, flat, at, row=None, side=None):
    """Phase 2 for one chunk: recompute h and the MLP (or take them from `row`, a
    Kept chunk), backprop G; returns (dh, do, δ, dz) of the chunk (o, do head
    layout; dz None without an output gate)."""
    o_tok = _tokens(o)
    dh, dô = second_half_backward(paths, b, b.o, x, g, _gated(b, o_tok, z), flat, at, row,
                                  side)
    do, dz = _gated_bwd(b, dô, o_tok, z)
    do = _heads(do, b.H)
    return dh, do, attention_delta(do, o), dz


def block_backward(paths, b: BlockSpec, x, g, flat, opt, need_dx=True,
                   kept: Optional[Kept] = None, packing=None,
                   links: Optional[BlockLinks] = None):
    """Recompute the block from its input x (or take its forward's `kept` tensors)
    and backprop G = dL/dout; returns dL/dx (LoRA gradients added into `flat`).
    Over several token chunks G's buffer is reused for dL/dh and then dL/dx (the
    caller must not read g afterwards). A KV-shared block hands dK, dV to `links`;
    a source adds those of its readers (links.dkv) to its own."""
    if b.delta is not None:
        return deltanet.block_backward(paths, b, x, g, flat, opt, need_dx, kept, packing)
    if b.conv is not None:
        return short_conv.block_backward(paths, b, x, g, flat, opt, need_dx, kept,
                                         packing, links)
    B, T, _ = x.shape
    spans = token_spans(b, opt, B, T)
    kept_rows = p = None
    if kept is None:
        q, k, v, pre = attention_inputs(b, x, spans, packing, links)
        if keeps_probs(b, opt, T):
            o, p = _attend(b, q, k, v, opt, packing, probs=True)
        else:
            o = _attend(b, q, k, v, opt, packing)
        mx.eval(o, *([] if p is None else [p]))
    else:
        q, k, v, pre, o, kept_rows, p = kept.take()
    z, pv, pre = pre.z, pre.v, pre[:2]

    # phase 2: dh over G's buffer, do over o's, dz over z's, δ = rowsum(do ⊙ o)
    cut = take if len(spans) > 1 else rows
    dh, delta = g, None
    for t0, t1 in spans:
        xc, oc, gc = rows(x, t0, t1, 1), cut(o, t0, t1, 2), cut(dh, t0, t1, 1)
        zc = None if z is None else cut(z, t0, t1, 1)
        mx.eval(oc, gc, *([] if zc is None else [zc]))
        row = None if kept_rows is None else kept_rows.pop(0)
        dhc, doc, dc, dzc = _mlp_chunk_backward(paths, b, xc, oc, zc, gc, flat, (t0, T),
                                                row, side_rows(links, t0, t1))
        del oc, gc, zc, row
        dh = put(dh, dhc, t0, t1, T, 1)
        o = put(o, doc, t0, t1, T, 2)
        delta = put(delta, dc, t0, t1, T, 2)
        z = z if dzc is None else put(z, dzc, t0, t1, T, 1)
        mx.eval(dh, o, delta, *([] if z is None else [z]), *flat.values())
    do, dz = o, z
    del o, z, dhc, doc, dc, dzc

    # phase 3: attention backward in query blocks (dK, dV of the readers added)
    dq, dk, dv = attention_backward_rows(
        lambda t0, t1: (do[:, :, t0:t1], delta[:, :, t0:t1]), q, k, v, b.scale,
        _chunk(opt, b.H, T), window=b.window, softcap=b.softcap,
        segments=_segments(packing), p=p)
    del do, delta, q, k, v, p
    if b.kv_from is not None:
        links.add_dkv(dk, dv)
        dk = dv = None
    elif links is not None and links.dkv is not None:
        dk, dv = dk + links.dkv[0], dv + links.dkv[1]
        links.dkv = None
    if not need_dx and not has_lora(b.qkv):
        return dh                                           # unused by the caller

    # phase 4: q/k/v backward per chunk; dx over dh's buffer
    for t0, t1 in spans:
        at = (t0, T)
        xc = rows(x, t0, t1, 1)
        dqc, dkc = _qk_bwd(b, dq[:, :, t0:t1], None if dk is None else dk[:, :, t0:t1],
                           [None if a is None else rows(a, t0, t1, _pre_axis(b))
                            for a in pre], t0, packing)
        if dz is not None:
            dqc = _join_gate(dqc, dz[:, t0:t1], b.H)
        grads = [dqc]
        if dk is not None:
            dvc = dv[:, :, t0:t1]
            if b.v_norm is not None:
                dvc = norm_bwd(b.v_norm, dvc, pv[:, :, t0:t1])
            grads += [dkc, _tokens(dvc)]
        da = proj_bwd(paths, b.qkv, grads, norm(b.attn_in, xc), flat, need_dx, at)
        if need_dx:
            dhc = cut(dh, t0, t1, 1)
            mx.eval(dhc)
            dh = put(dh, dhc + norm_bwd(b.attn_in, da, xc), t0, t1, T, 1)
            del dhc
        del da, dqc, dkc, grads
        mx.eval(*([dh] if need_dx else []), *flat.values())
    return dh
