"""Chunked LM head + masked cross-entropy: loss and dL/dhn in one pass.

Letters: N = B·T token rows, D model, V vocab; c rows and v vocab entries per tile.
  forward   Z = hn W0ᵀ   (W0: (V, D), tied embedding or LM head, frozen)   [N, V]
            ℓₙ = logsumexp(Zₙ) − Zₙ[yₙ],   L = Σₙ wₙ ℓₙ,   wₙ = mₙ / max(Σ m, 1)
            (or wₙ given, of any sign and unnormalised: a preference objective's
            Σᵢ cᵢ log pᵢ is such a sum, log pᵢ = −Σ ℓ over row i's targets)
  backward  dZₙ = wₙ (softmax(Zₙ) − onehot(yₙ))
            dhn = dZ W0 = wₙ (Σᵥ pₙᵥ W0ᵥ − W0[yₙ])                       [N, D]
Neither Z nor dZ is ever materialised: tiles of c rows × v vocabulary entries
are streamed with an online softmax (running max μ, sum s, and accumulator
a = Σᵥ exp(Zᵥ − μ) W0ᵥ, rescaled by exp(μ_old − μ_new) when μ grows), then
ℓ = μ + log s − Zₙ[yₙ] and dhn = w (a / s − W0[yₙ]). Same flops as the plain
head (two matmuls), one pass, memory O(c·v) instead of O(N·V) (V = 151,936
fp32 logits are 155 MB at N = 256). Tiles are wide in rows (up to 512) because
BLAS matmuls with few rows run far below peak throughput.
Each tile ends with an evaluation barrier. Accumulation is in fp32. A quantized
W0 on the CPU path (dequant_matmul.py) is dequantized once per tile for both
products (tiles of one dequantized row tile, 2 MiB), not once per product.
Logit transforms: granite divides by L (the head runs on hn/L,
dhn is scaled by 1/L); Gemma 2 caps z' = c·tanh(z/c), so every W0ᵥ in the
accumulator is weighted by (1 − (z'ᵥ/c)²) and dhn = w (a/s − (1 − (z'_y/c)²) W0[y]).
"""

import mlx.core as mx

from . import frozen
from .dequant_matmul import tile_rows
from .frozen import FrozenWeight


def loss_head_value_and_grad(hn, W0: FrozenWeight, targets, mask, chunk,
                             vocab_chunk=None, *, softcap=None, logit_scale=None,
                             denom=None, per_token=False):
    """hn [N, D], targets [N] int, mask [N] → (loss scalar fp32, dhn [N, D]).

    chunk: rows per tile; vocab_chunk: vocabulary entries per tile (None: all);
    softcap: final-logit cap c; logit_scale: logits are divided by it;
    mask: 0/1, or weights of any sign with denom=1 (rows with 0 are no target);
    denom: Σ m of the whole batch when hn is some of its rows (default: these rows');
    per_token: return ℓ [N] (fp32, 0 where mask is 0) in place of L.
    """
    N, D = hn.shape
    V = W0.shape[0]
    vc = V if vocab_chunk is None else max(1, min(V, vocab_chunk))
    inv = None if logit_scale is None else 1.0 / logit_scale
    mask = mask.astype(mx.float32)
    denom = mx.maximum(mask.sum(), 1.0) if denom is None else denom
    loss, tokens = mx.array(0.0, mx.float32), []
    dh = None
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        x = hn[n0:n1] if inv is None else hn[n0:n1] * inv          # [c, D]
        mu, s, acc = _online_softmax(x, W0, V, vc, softcap=softcap)
        y = mx.where(mask[n0:n1] != 0, targets[n0:n1], 0)           # masked ids may be pads
        Wy = W0.take(y).astype(mx.float32)                          # [c, D]
        zy = mx.sum(x.astype(mx.float32) * Wy, axis=-1, keepdims=True)
        if softcap is not None:
            zy = _cap(zy, softcap)
            Wy = Wy * (1 - (zy / softcap) ** 2)
        w = mask[n0:n1, None] / denom                               # [c, 1]
        if inv is not None:
            w = w * inv
        ce = mu + mx.log(s) - zy                                    # [c, 1]
        if per_token:
            tokens.append(mx.where(mask[n0:n1] != 0, ce[:, 0], 0.0))
        else:
            loss = loss + mx.sum(ce * mask[n0:n1, None] / denom)
        dhc = ((acc / s - Wy) * w).astype(hn.dtype)
        if n1 - n0 == N:
            dh = dhc
        else:                                    # filled in place, tile by tile
            dh = mx.zeros(hn.shape, hn.dtype) if dh is None else dh
            dh[n0:n1] = dhc
        del dhc
        mx.eval(loss, dh, *tokens[-1:])
    return (mx.concatenate(tokens) if per_token else loss), dh


def loss_head_value(hn, W0: FrozenWeight, targets, mask, chunk, vocab_chunk=None, *,
                    softcap=None, logit_scale=None, per_token=False):
    """The loss alone (forward-only users such as MeZO): same tiles, no accumulator;
    per_token: ℓ [N] (fp32, 0 where mask is 0) in place of Σ m ℓ / Σ m."""
    N, V = hn.shape[0], W0.shape[0]
    vc = V if vocab_chunk is None else max(1, min(V, vocab_chunk))
    mask = mask.astype(mx.float32)
    denom = mx.maximum(mask.sum(), 1.0)
    loss, tokens = mx.array(0.0, mx.float32), []
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        x = hn[n0:n1] if logit_scale is None else hn[n0:n1] * (1.0 / logit_scale)
        mu, s, _ = _online_softmax(x, W0, V, vc, need_acc=False, softcap=softcap)
        y = mx.where(mask[n0:n1] != 0, targets[n0:n1], 0)
        zy = mx.sum(x.astype(mx.float32) * W0.take(y).astype(mx.float32), axis=-1,
                    keepdims=True)
        if softcap is not None:
            zy = _cap(zy, softcap)
        ce = mu + mx.log(s) - zy                                    # [c, 1]
        if per_token:
            tokens.append(mx.where(mask[n0:n1] != 0, ce[:, 0], 0.0))
            mx.eval(tokens[-1])
        else:
            loss = loss + mx.sum(ce * mask[n0:n1, None]) / denom
            mx.eval(loss)
    return mx.concatenate(tokens) if per_token else loss


def _cap(z, c):
    return mx.tanh(z / c) * c


def _online_softmax(x, W0: FrozenWeight, V, vc, need_acc=True, softcap=None):
    """Running max μ [c,1], Σ exp(Z−μ) [c,1], Σ exp(Z−μ) W0 [c,D] over vocab tiles
    (with a softcap: Z capped, and each term weighted by the cap's derivative)."""
    c, D = x.shape
    mu = mx.full((c, 1), -mx.inf, mx.float32)
    s = mx.zeros((c, 1), mx.float32)
    acc = mx.zeros((c, D), mx.float32) if need_acc else None
    once = W0.quantized and frozen.quantized_path() == "dequant_tiles"
    if once:                    # one dequantized row tile serves both products
        vc = min(vc, tile_rows(D))
    for v0 in range(0, V, vc):
        Wt = W0.rows(v0, min(V, v0 + vc))
        if once:
            Wt = Wt.dequantized_like(x.dtype)
        z = Wt.xWt(x).astype(mx.float32)                            # [c, v]
        if softcap is not None:
            z = _cap(z, softcap)
        mu_new = mx.maximum(mu, z.max(axis=-1, keepdims=True))
        rescale = mx.exp(mu - mu_new)                               # 0 on the first tile
        e = mx.exp(z - mu_new)
        s = s * rescale + e.sum(axis=-1, keepdims=True)
        if need_acc:
            ew = e if softcap is None else e * (1 - (z / softcap) ** 2)
            acc = acc * rescale + Wt.gW(ew.astype(x.dtype)).astype(mx.float32)
        mu = mu_new
        if vc < V:
            mx.eval(mu, s, *([acc] if need_acc else []))
    return mu, s, acc


def loss_head_ref(hn, W, targets, mask, *, softcap=None, logit_scale=None):
    """Plain reference on a dense W (V, D): full logits, autodiff-able in hn."""
    z = (hn @ W.T).astype(mx.float32)
    if logit_scale is not None:
        z = z / logit_scale
    if softcap is not None:
        z = softcap * mx.tanh(z / softcap)
    ce = mx.logsumexp(z, axis=-1) - mx.take_along_axis(z, targets[:, None], axis=-1)[:, 0]
    mask = mask.astype(mx.float32)
    return mx.sum(ce * mask) / mx.maximum(mask.sum(), 1.0)
