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
Stored: `attention_backward` keeps P ([B,K,G·T,T] = H·T² values, quadratic in T).
`attention_backward_chunked` keeps only O and recomputes P for one block of
query rows at a time (rows are independent under softmax), with an evaluation
barrier per block: memory O(H·chunk·T) instead of O(H·T²). A later tiled
version could keep a per-row log-sum-exp instead of O.
"""

import mlx.core as mx


def _rows(x, K):
    """[B,H,T,hd] -> [B,K,G·T,hd] (a free reshape)."""
    B, H, T, hd = x.shape
    return x.reshape(B, K, (H // K) * T, hd)


def _heads(x, H):
    B, K, GT, hd = x.shape
    return x.reshape(B, H, GT * K // H, hd)


def _causal(s, G, q0):
    """Mask keys after each query's position; s: [B,K,G·Tq,Tk]."""
    B, K, GTq, Tk = s.shape
    Tq = GTq // G
    qpos = mx.arange(q0, q0 + Tq)[:, None]
    keep = mx.arange(Tk)[None, :] <= qpos                         # [Tq,Tk]
    s = s.reshape(B, K, G, Tq, Tk)
    s = mx.where(keep, s, mx.array(-mx.inf, s.dtype))
    return s.reshape(B, K, GTq, Tk)


def attention(q, k, v, scale):
    """Returns (O [B,H,T,hd], P [B,K,G·T,T])."""
    H, K = q.shape[1], k.shape[1]
    qr = _rows(q, K)
    s = _causal((qr * scale) @ k.swapaxes(-1, -2), H // K, 0)
    p = mx.softmax(s, axis=-1, precise=True)
    return _heads(p @ v, H), p


def _backward_rows(do, q, k, v, o, p, scale):
    """Gradients for a block of query rows (all arrays in [B,K,rows,·] layout)."""
    dp = do @ v.swapaxes(-1, -2)                                  # [B,K,R,Tk]
    delta = mx.sum(do.astype(mx.float32) * o.astype(mx.float32), axis=-1, keepdims=True)
    ds = (p * (dp - delta.astype(dp.dtype))).astype(q.dtype)
    dq = (ds @ k) * scale                                         # [B,K,R,hd]
    dk = (ds.swapaxes(-1, -2) @ q) * scale                        # [B,K,Tk,hd]
    dv = p.swapaxes(-1, -2).astype(do.dtype) @ do                 # [B,K,Tk,hd]
    return dq, dk, dv


def attention_backward(do, q, k, v, o, p, scale):
    """dQ, dK, dV from stored P. do, q, o: [B,H,T,hd]; k, v: [B,K,T,hd]."""
    H, K = q.shape[1], k.shape[1]
    dq, dk, dv = _backward_rows(_rows(do, K), _rows(q, K), k, v, _rows(o, K), p, scale)
    return _heads(dq, H), dk, dv


def attention_backward_chunked(do, q, k, v, o, scale, chunk):
    """Same gradients, recomputing P for `chunk` query positions at a time.

    Query block [t0, t1) only attends to keys [0, t1), so the causal half of the
    work is skipped. Evaluates after each block (memory barrier).
    """
    B, H, T, hd = q.shape
    K = k.shape[1]
    G = H // K
    dq_blocks = []
    dk = mx.zeros(k.shape, k.dtype)
    dv = mx.zeros(v.shape, v.dtype)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        qc, doc, oc = (_rows(a[:, :, t0:t1], K) for a in (q, do, o))
        kc, vc = k[:, :, :t1], v[:, :, :t1]
        p = mx.softmax(_causal((qc * scale) @ kc.swapaxes(-1, -2), G, t0), axis=-1,
                       precise=True)
        dqc, dkc, dvc = _backward_rows(doc, qc, kc, vc, oc, p, scale)
        dq_blocks.append(_heads(dqc, H))
        dk[:, :, :t1] += dkc
        dv[:, :, :t1] += dvc
        mx.eval(dq_blocks[-1], dk, dv)
    return mx.concatenate(dq_blocks, axis=2), dk, dv


def attention_chunked(q, k, v, scale, chunk):
    """O only, `chunk` query positions at a time (memory O(H·chunk·T), not O(H·T²)).

    For backends whose fused attention still materialises the T×T scores (the
    CPU backend); evaluates after each block.
    """
    H, K, T = q.shape[1], k.shape[1], q.shape[2]
    if chunk >= T:
        return attention(q, k, v, scale)[0]
    blocks = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        kc, vc = k[:, :, :t1], v[:, :, :t1]
        s = _causal((_rows(q[:, :, t0:t1], K) * scale) @ kc.swapaxes(-1, -2), H // K, t0)
        blocks.append(_heads(mx.softmax(s, axis=-1, precise=True) @ vc, H))
        mx.eval(blocks[-1])
    return mx.concatenate(blocks, axis=2)


def attention_ref(q, k, v, scale):
    """Plain reference: repeat K/V per head, full mask, softmax."""
    B, H, T, hd = q.shape
    G = H // k.shape[1]
    k, v = mx.repeat(k, G, axis=1), mx.repeat(v, G, axis=1)
    s = (q * scale) @ k.swapaxes(-1, -2)
    mask = mx.tril(mx.ones((T, T), dtype=mx.bool_))
    s = mx.where(mask, s, mx.array(-mx.inf, s.dtype))
    return mx.softmax(s, axis=-1, precise=True) @ v
