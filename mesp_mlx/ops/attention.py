"""Causal softmax attention with grouped-query heads: forward, hand backward, reference.

Letters: B batch, H query heads, K kv heads, G = H / K, T tokens, hd head dim.
Queries of the G heads sharing a kv head are stacked as G·T rows, so every
product below is one matmul per kv head and K/V are never repeated G times.
  forward   S = c · Q Kᵀ + causal(−∞)    Q: [B,K,G·T,hd]  K: [B,K,T,hd]  → [B,K,G·T,T]
            P = softmax(S) (rows),   O = P V                            → [B,K,G·T,hd]
  backward  dP = dO Vᵀ,   δ = rowsum(dO ⊙ O)                             [B,K,G·T,1]
            dS = P ⊙ (dP − δ)
            dQ = c · dS K,   dK = c · dSᵀ Q,   dV = Pᵀ dO    (the sums over the G heads
            sharing a kv head are inside the G·T-row matmuls)
Gemma 2 softcap c: S = c·tanh(S_raw / c) before the mask, so dS_raw = dS ⊙ (1 − (S/c)²).
Sliding window W: query i keeps keys i − W < j ≤ i; a query block [t0, t1) reads
keys [max(0, t0 − W + 1), t1) only (O(T·W) work).
Packed rows (segments seg [B, T], packing.py): query i also needs seg[i] = seg[j],
so the keep mask is [B, Tq, Tk] instead of [Tq, Tk]; nothing else changes (no row
is empty: i keeps itself).
Stored: `attention_backward` keeps P ([B,K,G·T,T] = H·T² values, quadratic in T).
`attention_backward_chunked` keeps only O and recomputes P for one block of
query rows at a time (rows are independent under softmax), with an evaluation
barrier per block: memory O(H·chunk·T) instead of O(H·T²). O enters only through
δ, so `attention_backward_rows` takes dO and δ per query block from a callback.
"""

import mlx.core as mx

from .matmul import mm
from .softcap import softcap as _cap


def _rows(x, K):
    """[B,H,T,hd] -> [B,K,G·T,hd] (a free reshape)."""
    B, H, T, hd = x.shape
    return x.reshape(B, K, (H // K) * T, hd)


def _heads(x, H):
    B, K, GT, hd = x.shape
    return x.reshape(B, H, GT * K // H, hd)


def keep_mask(q0, q1, k0, k1, window=None, segments=None):
    """Bool [Tq, Tk]: query q0…q1 keeps key k0…k1 iff j ≤ i (and i − W < j);
    with segments [B, T] also seg[i] = seg[j], giving [B, Tq, Tk]."""
    qpos = mx.arange(q0, q1)[:, None]
    kpos = mx.arange(k0, k1)[None, :]
    keep = kpos <= qpos
    if window is not None:
        keep = keep & (kpos > qpos - window)
    if segments is None:
        return keep
    return keep[None] & (segments[:, q0:q1, None] == segments[:, None, k0:k1])


def _causal(s, G, q0, k0=0, window=None, segments=None):
    """Mask keys after each query's position (and before its window, or in another
    segment); s: [B,K,G·Tq,Tk] for queries q0.. and keys k0..."""
    B, K, GTq, Tk = s.shape
    Tq = GTq // G
    keep = keep_mask(q0, q0 + Tq, k0, k0 + Tk, window, segments)  # [Tq,Tk] | [B,Tq,Tk]
    if segments is not None:
        keep = keep[:, None, None]                                # [B,1,1,Tq,Tk]
    s = s.reshape(B, K, G, Tq, Tk)
    s = mx.where(keep, s, mx.array(-mx.inf, s.dtype))
    return s.reshape(B, K, GTq, Tk)


def _scores(qr, k, scale, G, q0, k0, window, softcap, segments=None):
    """(masked S, capped S before masking or None) for grouped queries qr."""
    s = mm(qr * scale, k.swapaxes(-1, -2))
    capped = None
    if softcap is not None:
        s = capped = _cap(s, softcap)
    return _causal(s, G, q0, k0, window, segments), capped


def attention(q, k, v, scale, *, window=None, softcap=None, segments=None):
    """Returns (O [B,H,T,hd], P [B,K,G·T,T])."""
    H, K = q.shape[1], k.shape[1]
    s, _ = _scores(_rows(q, K), k, scale, H // K, 0, 0, window, softcap, segments)
    p = mx.softmax(s, axis=-1, precise=True)
    return _heads(mm(p, v), H), p


def attention_delta(do, o):
    """δ = rowsum(dO ⊙ O) in fp32, [..., rows, 1]."""
    return mx.sum(do.astype(mx.float32) * o.astype(mx.float32), axis=-1, keepdims=True)


def _backward_rows(do, q, k, v, delta, p, scale, capped=None, softcap=None):
    """Gradients for a block of query rows (all arrays in [B,K,rows,·] layout)."""
    dp = mm(do, v.swapaxes(-1, -2))                               # [B,K,R,Tk]
    ds = p * (dp - delta.astype(dp.dtype))
    if softcap is not None:
        r = capped / softcap
        ds = ds * (1 - r * r)
    ds = ds.astype(q.dtype)
    dq = mm(ds, k) * scale                                        # [B,K,R,hd]
    dk = mm(ds.swapaxes(-1, -2), q) * scale                       # [B,K,Tk,hd]
    dv = mm(p.swapaxes(-1, -2).astype(do.dtype), do)              # [B,K,Tk,hd]
    return dq, dk, dv


def attention_backward(do, q, k, v, o, p, scale, *, window=None, softcap=None,
                       segments=None):
    """dQ, dK, dV from stored P. do, q, o: [B,H,T,hd]; k, v: [B,K,T,hd]."""
    H, K = q.shape[1], k.shape[1]
    capped = None
    if softcap is not None:     # the capped scores, recomputed (P alone cannot give them)
        _, capped = _scores(_rows(q, K), k, scale, H // K, 0, 0, window, softcap,
                            segments)
    dq, dk, dv = _backward_rows(_rows(do, K), _rows(q, K), k, v,
                                _rows(attention_delta(do, o), K),
                                p, scale, capped, softcap)
    return _heads(dq, H), dk, dv


def _key_start(t0, window):
    return 0 if window is None else max(0, t0 - window + 1)


def attention_backward_chunked(do, q, k, v, o, scale, chunk, *, window=None,
                               softcap=None, segments=None):
    """Same gradients, recomputing P for `chunk` query positions at a time.

    Query block [t0, t1) only attends to keys [k0, t1) (k0 = 0, or the window's
    start), so the masked work is skipped. Evaluates after each block (memory barrier).
    """
    def rows(t0, t1):
        doc = do[:, :, t0:t1]
        return doc, attention_delta(doc, o[:, :, t0:t1])

    return attention_backward_rows(rows, q, k, v, scale, chunk, window=window,
                                   softcap=softcap, segments=segments)


def attention_backward_rows(do_rows, q, k, v, scale, chunk, *, window=None, softcap=None,
                            segments=None, p=None):
    """attention_backward_chunked with dO made per query block: do_rows(t0, t1) ->
    (dO [B,H,t1−t0,hd], δ [B,H,t1−t0,1]). The block driver builds dO there from
    the output projection's backward, so neither dO nor O is kept for all T.
    p: P of all T rows ([B,K,G·T,T], `attention`'s), when the forward it came from
    was one query block: then it is not recomputed (no softcap: its capped scores
    would be needed too)."""
    B, H, T, hd = q.shape
    K = k.shape[1]
    G = H // K
    if p is not None and (chunk < T or softcap is not None):
        raise ValueError("a stored P serves one query block of all T rows, uncapped")
    dq = None
    dk = mx.zeros(k.shape, k.dtype)
    dv = mx.zeros(v.shape, v.dtype)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        k0 = _key_start(t0, window)
        doc, delta = do_rows(t0, t1)
        qc, doc, delta = (_rows(a, K) for a in (q[:, :, t0:t1], doc, delta))
        kc, vc = k[:, :, k0:t1], v[:, :, k0:t1]
        if p is None:
            s, capped = _scores(qc, kc, scale, G, t0, k0, window, softcap, segments)
            pc = mx.softmax(s, axis=-1, precise=True)
            del s
        else:
            pc, capped, p = p, None, None
        dqc, dkc, dvc = _backward_rows(doc, qc, kc, vc, delta, pc, scale, capped, softcap)
        del pc
        if t1 - t0 == T:
            dq = _heads(dqc, H)
        else:
            if dq is None:
                dq = mx.zeros(q.shape, q.dtype)
            dq[:, :, t0:t1] = _heads(dqc, H)
        dk[:, :, k0:t1] += dkc
        dv[:, :, k0:t1] += dvc
        mx.eval(dq, dk, dv)
    return dq, dk, dv


def attention_chunked(q, k, v, scale, chunk, *, window=None, softcap=None, segments=None):
    """O only, `chunk` query positions at a time (memory O(H·chunk·T), not O(H·T²)).

    For backends whose fused attention still materialises the T×T scores (the
    CPU backend), and for softcapped attention; evaluates after each block.
    """
    H, K, T = q.shape[1], k.shape[1], q.shape[2]
    if chunk >= T:
        return attention(q, k, v, scale, window=window, softcap=softcap,
                         segments=segments)[0]
    o = mx.zeros(q.shape, q.dtype)              # filled in place, block by block
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        k0 = _key_start(t0, window)
        s, _ = _scores(_rows(q[:, :, t0:t1], K), k[:, :, k0:t1], scale, H // K, t0, k0,
                       window, softcap, segments)
        o[:, :, t0:t1] = _heads(mm(mx.softmax(s, axis=-1, precise=True), v[:, :, k0:t1]), H)
        mx.eval(o)
    return o


def attention_ref(q, k, v, scale, *, window=None, softcap=None, segments=None):
    """Plain reference: repeat K/V per head, full bool mask, softmax."""
    B, H, T, hd = q.shape
    G = H // k.shape[1]
    k, v = mx.repeat(k, G, axis=1), mx.repeat(v, G, axis=1)
    s = (q * scale) @ k.swapaxes(-1, -2)
    if softcap is not None:
        s = softcap * mx.tanh(s / softcap)
    i, j = mx.arange(T)[:, None], mx.arange(T)[None]
    mask = (j <= i) if window is None else (j <= i) & (j > i - window)
    if segments is not None:                                       # [B,1,T,T]
        mask = mask & (segments[:, None, :, None] == segments[:, None, None, :])
    s = mx.where(mask, s, mx.array(-mx.inf, s.dtype))
    return mx.softmax(s, axis=-1, precise=True) @ v
