"""Chunked LM head + masked cross-entropy: loss and dL/dhn in one pass.

Letters: N = B·T token rows, D model, V vocab, c chunk rows.
  forward   Z = hn W0ᵀ   (W0: (V, D), tied embedding or LM head, frozen)   [N, V]
            ℓₙ = logsumexp(Zₙ) − Zₙ[yₙ],   L = Σₙ mₙ ℓₙ / max(Σ m, 1)
  backward  dZₙ = (softmax(Zₙ) − onehot(yₙ)) · mₙ / max(Σ m, 1)          [N, V]
            dhn = dZ W0                                                    [N, D]
The rows are independent, so both are computed c rows at a time with an
evaluation barrier per chunk: the [N, V] logits never exist (at Qwen2.5's
V = 151,936 they are 155 MB fp32 at N = 256), only [c, V]. The gradient comes
out of the same pass as the loss: no second pass over the vocabulary.
Logits are upcast to fp32 for the softmax. `loss_head_value` is the same
forward without the backward (MeZO's forward-only loss).
"""

import mlx.core as mx

from .frozen import FrozenWeight


def loss_head_value_and_grad(hn, W0: FrozenWeight, targets, mask, chunk):
    """hn [N, D], targets [N] int, mask [N] → (loss scalar fp32, dhn [N, D])."""
    N = hn.shape[0]
    mask = mask.astype(mx.float32)
    denom = mx.maximum(mask.sum(), 1.0)
    loss = mx.array(0.0, mx.float32)
    dh_chunks = []
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        z, y, lse, zy = _chunk_logits(hn[n0:n1], W0, targets[n0:n1], mask[n0:n1])
        w = (mask[n0:n1, None] / denom)                              # [c, 1]
        loss = loss + mx.sum((lse - zy) * w)
        dz = mx.exp(z - lse)
        dz = mx.put_along_axis(dz, y, mx.take_along_axis(dz, y, axis=-1) - 1, axis=-1)
        dh_chunks.append(W0.gW((dz * w).astype(hn.dtype)))          # [c, D]
        mx.eval(loss, dh_chunks[-1])
    return loss, mx.concatenate(dh_chunks, axis=0)


def loss_head_value(hn, W0: FrozenWeight, targets, mask, chunk):
    """hn [N, D], targets [N] int, mask [N] → loss scalar fp32 (no gradient)."""
    N = hn.shape[0]
    mask = mask.astype(mx.float32)
    denom = mx.maximum(mask.sum(), 1.0)
    loss = mx.array(0.0, mx.float32)
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        _, _, lse, zy = _chunk_logits(hn[n0:n1], W0, targets[n0:n1], mask[n0:n1])
        loss = loss + mx.sum((lse - zy) * (mask[n0:n1, None] / denom))
        mx.eval(loss)
    return loss


def _chunk_logits(hn, W0, targets, mask):
    """One chunk's logits z [c, V] fp32, safe target ids y, logsumexp and z[y] [c, 1]."""
    z = W0.xWt(hn).astype(mx.float32)                            # [c, V]
    y = mx.where(mask[:, None] > 0, targets[:, None], 0)         # masked ids may be pads
    lse = mx.logsumexp(z, axis=-1, keepdims=True)                # [c, 1]
    zy = mx.take_along_axis(z, y, axis=-1)                       # [c, 1]
    return z, y, lse, zy


def loss_head_ref(hn, W, targets, mask):
    """Plain reference on a dense W (V, D): full logits, autodiff-able in hn."""
    z = (hn @ W.T).astype(mx.float32)
    ce = mx.logsumexp(z, axis=-1) - mx.take_along_axis(z, targets[:, None], axis=-1)[:, 0]
    mask = mask.astype(mx.float32)
    return mx.sum(ce * mask) / mx.maximum(mask.sum(), 1.0)
