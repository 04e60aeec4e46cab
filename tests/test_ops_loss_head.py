"""Chunked LM head + masked cross-entropy: (loss, dhn) vs mx.value_and_grad of
the reference, for chunk sizes that do and don't divide N, dense and quantized W0,
with and without final-logit softcap and logit scaling."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from gradcheck import Rng, assert_close
from mesp_mlx.ops.frozen import FrozenWeight
from mesp_mlx.ops.loss_head import loss_head_ref, loss_head_value, loss_head_value_and_grad

N, D, V = 37, 64, 1000
DTYPES = [mx.float32, mx.bfloat16]


def _case(mask_kind="partial", bits=None, seed=0):
    rng = Rng(seed)
    hn = rng.normal((N, D))
    W = rng.normal((V, D), std=D ** -0.5 * 4)
    if bits is None:
        W0 = FrozenWeight(W)
    else:   # tied embedding: the head is the (quantized) embedding table
        emb = nn.Embedding(V, D)
        emb.weight = W
        W0 = FrozenWeight.of(nn.QuantizedEmbedding.from_embedding(emb, 64, bits))
    targets = rng.randint(0, V, (N,))
    if mask_kind == "ones":
        mask = mx.ones((N,))
    elif mask_kind == "zeros":
        mask = mx.zeros((N,))
    else:   # first 8 tokens fully masked out (a whole chunk for chunk 8), then random
        mask = mx.concatenate([mx.zeros((8,)), (rng.uniform((N - 8,)) > 0.3).astype(mx.float32)])
    return hn, W0, targets, mask


def _ref(hn, W0, targets, mask):
    return mx.value_and_grad(lambda h: loss_head_ref(h, W0.dense(), targets, mask))(hn)


def test_reference_is_masked_mean_cross_entropy():
    hn, W0, targets, mask = _case()
    ce = nn.losses.cross_entropy(hn @ W0.dense().T, targets)
    assert_close("ref loss", loss_head_ref(hn, W0.dense(), targets, mask),
                 (ce * mask).sum() / mask.sum())


@pytest.mark.parametrize("chunk", [1, 8, 10, 37, 64])
@pytest.mark.parametrize("mask_kind", ["ones", "partial"])
def test_value_and_grad(chunk, mask_kind):
    hn, W0, targets, mask = _case(mask_kind)
    loss_ref, dhn_ref = _ref(hn, W0, targets, mask)
    loss, dhn = loss_head_value_and_grad(hn, W0, targets, mask, chunk)
    assert_close("loss", loss, loss_ref)
    assert_close("dhn", dhn, dhn_ref)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_tied_embedding(bits):
    hn, W0, targets, mask = _case("partial", bits)
    assert W0.quantized and W0.shape == (V, D)
    loss_ref, dhn_ref = _ref(hn, W0, targets, mask)
    loss, dhn = loss_head_value_and_grad(hn, W0, targets, mask, 10)
    assert_close("loss", loss, loss_ref)
    assert_close("dhn", dhn, dhn_ref)


def test_masked_tokens_contribute_nothing():
    """Masked rows get exactly zero gradient and do not move the loss, even if huge."""
    hn, W0, targets, mask = _case("partial")
    loss, dhn = loss_head_value_and_grad(hn, W0, targets, mask, 8)
    assert mx.all(dhn[:8] == 0).item(), "masked rows must have zero gradient"
    hn2 = mx.concatenate([1e4 * mx.ones((8, D)), hn[8:]])   # logits ~1e5 on masked rows
    loss2, dhn2 = loss_head_value_and_grad(hn2, W0, targets, mask, 8)
    assert not mx.isnan(loss2).item() and mx.all(mx.isfinite(dhn2)).item()
    assert_close("loss (masked rows changed)", loss2, loss)
    assert_close("dhn (masked rows changed)", dhn2, dhn)


@pytest.mark.parametrize("kw", [{}, dict(softcap=3.0, logit_scale=0.5)])
def test_signed_weights_and_per_token_losses(kw):
    """mask = weights of any sign with denom=1: L = Σ w ℓ (nothing normalised, rows
    with negative weight still scored); per_token: ℓ itself, 0 where w = 0."""
    hn, W0, targets, mask = _case("partial")
    w = mask * Rng(3).normal((N,))

    def ref_tokens(h):
        z = (h @ W0.dense().T).astype(mx.float32)
        if "logit_scale" in kw:
            z = z / kw["logit_scale"]
        if "softcap" in kw:
            z = kw["softcap"] * mx.tanh(z / kw["softcap"])
        return nn.losses.cross_entropy(z, targets)

    loss_ref, dhn_ref = mx.value_and_grad(lambda h: mx.sum(ref_tokens(h) * w))(hn)
    loss, dhn = loss_head_value_and_grad(hn, W0, targets, w, 10, 300, denom=1.0, **kw)
    assert_close("loss", loss, loss_ref)
    assert_close("dhn", dhn, dhn_ref)
    tokens, dhn1 = loss_head_value_and_grad(hn, W0, targets, w, 10, 300, denom=1.0,
                                            per_token=True, **kw)
    assert_close("dhn (per_token)", dhn1, dhn)
    want = mx.where(w != 0, ref_tokens(hn), 0.0)
    assert_close("per-token loss", tokens, want)
    assert_close("per-token loss (value)", loss_head_value(hn, W0, targets, w, 10, 300,
                                                           per_token=True, **kw), want)


@pytest.mark.parametrize("chunk", [8, 10])
def test_all_zero_mask(chunk):
    hn, W0, targets, mask = _case("zeros")
    loss, dhn = loss_head_value_and_grad(hn, W0, targets, mask, chunk)
    assert loss.shape == () and dhn.shape == hn.shape and dhn.dtype == hn.dtype
    assert loss.item() == 0.0, f"loss {loss.item()} with an all-zero mask"
    assert mx.all(dhn == 0).item(), "non-zero (or NaN) gradient with an all-zero mask"


def test_bf16_matches_fp32_truth():
    hn, W0, targets, mask = _case("partial")
    hn16, W16 = hn.astype(mx.bfloat16), FrozenWeight(W0.w.astype(mx.bfloat16))
    f32 = FrozenWeight(W16.w.astype(mx.float32))
    loss_ref, dhn_ref = _ref(hn16.astype(mx.float32), f32, targets, mask)
    loss, dhn = loss_head_value_and_grad(hn16, W16, targets, mask, 10)
    # The loss stays fp32, but its logits come from a bf16 matmul (8-bit mantissa):
    # ~2⁻⁹ per logit, mostly averaging out (measured 1.3e-4), so 1e-3 instead of 1e-5.
    assert_close("loss", loss, loss_ref, rtol=1e-3)
    assert_close("dhn", dhn, dhn_ref.astype(mx.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", [dict(softcap=3.0), dict(logit_scale=4.0),
                                dict(softcap=3.0, logit_scale=0.5)])
@pytest.mark.parametrize("bits", [None, 4])
def test_loss_head_transforms(kw, bits, dtype):
    rng = Rng(6)
    N, D, V = 21, 32, 300
    hn = rng.normal((N, D), dtype)
    W = rng.normal((V, D), std=D ** -0.5 * 4)
    if bits:
        emb = nn.Embedding(V, D)
        emb.weight = W
        W0 = FrozenWeight.of(nn.QuantizedEmbedding.from_embedding(emb, 32, bits))
    else:
        W0 = FrozenWeight(W.astype(dtype))
    t = rng.randint(0, V, (N,))
    m = (rng.uniform((N,)) > 0.3).astype(mx.float32)
    Wd = W0.dense()
    ref, dref = mx.value_and_grad(lambda h: loss_head_ref(h, Wd, t, m, **kw))(hn)
    loss, dh = loss_head_value_and_grad(hn, W0, t, m, 8, 70, **kw)
    tol = 1e-5 if dtype == mx.float32 else 1e-2
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    assert abs(loss_head_value(hn, W0, t, m, 8, 70, **kw).item() - ref.item()) <= \
        tol * abs(ref.item())
    assert_close("dhn", dh, dref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_head_dequantized_once_per_tile(dtype, monkeypatch):
    """CPU path: a vocabulary tile is one dequantized row tile (here 7 rows, so
    143 tiles) used for both products; same loss and dhn as the reference."""
    from mesp_mlx.ops import dequant_matmul as dm
    from mesp_mlx.ops import frozen
    monkeypatch.setattr(dm, "ROW_TILE_BYTES", 4 * D * 7)
    monkeypatch.setattr(frozen, "quantized_path", lambda: "dequant_tiles")
    hn, W0, targets, mask = _case("partial", 4)
    hn = hn.astype(dtype)
    calls = []
    real = dm.dequant_rows
    monkeypatch.setattr(frozen, "dequant_rows", lambda *a, **k: calls.append(a[3:5]) or real(*a, **k))
    loss_ref, dhn_ref = _ref(hn, W0, targets, mask)
    loss, dhn = loss_head_value_and_grad(hn, W0, targets, mask, 64)
    assert len(calls) == -(-V // 7)                 # each row tile dequantized once
    tol = 1e-5 if dtype == mx.float32 else 1e-2     # bf16 logits, fp32 loss
    assert abs(loss.item() - loss_ref.item()) <= tol * abs(loss_ref.item())
    assert_close("dhn", dhn, dhn_ref)
