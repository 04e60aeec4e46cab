"""Causal GQA attention, plain, sliding-window and softcapped: hand backward (full P
and chunked recompute) vs mx.vjp of the reference; forward vs
mx.fast.scaled_dot_product_attention with mlx-lm's masks."""

import mlx.core as mx
import pytest
from mlx_lm.models.base import create_causal_mask

from gradcheck import Rng, assert_all_close, assert_close, ref_vjp
from mesp_mlx.ops.attention import (attention, attention_backward,
                                    attention_backward_chunked, attention_chunked,
                                    attention_ref)

HD = 16
GQA = [(2, 2), (6, 1), (14, 2)]          # (H, K): ratios 1:1, 6:1, 7:1


def _case(T, H, K, dtype=mx.float32, seed=0):
    rng = Rng(seed)
    q = rng.normal((1, H, T, HD), dtype)
    k = rng.normal((1, K, T, HD), dtype)
    v = rng.normal((1, K, T, HD), dtype)
    do = rng.normal((1, H, T, HD), dtype)
    return q, k, v, do, HD ** -0.5


def _probs(q, k, scale):
    """Causal softmax probabilities [B, H, T, T], written out independently."""
    B, H, T, _ = q.shape
    kk = mx.repeat(k, H // k.shape[1], axis=1)
    s = (q * scale) @ kk.swapaxes(-1, -2)
    causal = mx.tril(mx.ones((T, T), dtype=mx.bool_))
    return mx.softmax(mx.where(causal, s, -mx.inf), axis=-1)


@pytest.mark.parametrize("T", [1, 7, 37])
@pytest.mark.parametrize("H,K", GQA)
def test_forward_and_backward(T, H, K):
    q, k, v, do, scale = _case(T, H, K)
    o_ref, grads_ref = ref_vjp(lambda q, k, v: attention_ref(q, k, v, scale), (q, k, v), do)
    o, P = attention(q, k, v, scale)
    assert_close("o", o, o_ref)
    assert_close("o (mx.fast.sdpa)",
                 mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"),
                 o_ref)
    # P is stored in the grouped layout [B, K, G·T, T]; a reshape gives [B, H, T, T].
    assert P.shape == (1, K, (H // K) * T, T), f"P layout {P.shape}"
    assert_close("P", P.reshape(1, H, T, T), _probs(q, k, scale))
    got = attention_backward(do, q, k, v, o, P, scale)
    assert_all_close(("dq", "dk", "dv"), got, grads_ref)


@pytest.mark.parametrize("T,chunk", [(7, 1), (7, 3), (7, 7), (36, 9), (36, 12),
                                     (37, 8), (37, 37), (37, 64)])
@pytest.mark.parametrize("H,K", GQA)
def test_chunked_backward(T, chunk, H, K):
    q, k, v, do, scale = _case(T, H, K, seed=1)
    o_ref, grads_ref = ref_vjp(lambda q, k, v: attention_ref(q, k, v, scale), (q, k, v), do)
    got = attention_backward_chunked(do, q, k, v, o_ref, scale, chunk)
    assert_all_close(("dq", "dk", "dv"), got, grads_ref)


def test_bf16_matches_fp32_truth():
    q, k, v, do, scale = _case(37, 14, 2, mx.bfloat16)
    f32 = [a.astype(mx.float32) for a in (q, k, v, do)]
    o_ref, grads_ref = ref_vjp(lambda q, k, v: attention_ref(q, k, v, scale), f32[:3], f32[3])
    to16 = lambda a: a.astype(mx.bfloat16)
    o, P = attention(q, k, v, scale)
    assert_close("o", o, to16(o_ref))
    assert_all_close(("dq", "dk", "dv"), attention_backward(do, q, k, v, o, P, scale),
                     [to16(t) for t in grads_ref])
    assert_all_close(("dq chunked", "dk chunked", "dv chunked"),
                     attention_backward_chunked(do, q, k, v, o, scale, 8),
                     [to16(t) for t in grads_ref])


def _attn_case(T, H, K, dtype=mx.float32, seed=0, hd=8):
    rng = Rng(seed)
    q, do = rng.normal((2, H, T, hd), dtype), rng.normal((2, H, T, hd), dtype)
    k, v = rng.normal((2, K, T, hd), dtype), rng.normal((2, K, T, hd), dtype)
    return q, k, v, do, hd ** -0.5


@pytest.mark.parametrize("window,softcap_c", [(1, None), (4, None), (50, None),
                                              (None, 2.0), (4, 2.0)])
@pytest.mark.parametrize("chunk", [3, 5, 16])
@pytest.mark.parametrize("H,K", [(2, 2), (6, 1)])
def test_attention_window_softcap(window, softcap_c, chunk, H, K):
    q, k, v, do, sc = _attn_case(13, H, K)
    kw = dict(window=window, softcap=softcap_c)
    o_ref, grads = ref_vjp(lambda q, k, v: attention_ref(q, k, v, sc, **kw), (q, k, v), do)
    assert_close("o chunked", attention_chunked(q, k, v, sc, chunk, **kw), o_ref)
    o, P = attention(q, k, v, sc, **kw)
    assert_close("o", o, o_ref)
    assert_all_close(("dq", "dk", "dv"), attention_backward(do, q, k, v, o, P, sc, **kw),
                     grads)
    assert_all_close(("dq c", "dk c", "dv c"),
                     attention_backward_chunked(do, q, k, v, o_ref, sc, chunk, **kw), grads)


def test_attention_window_matches_mlx_lm_mask():
    q, k, v, _, sc = _attn_case(13, 4, 2)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=sc,
                                               mask=create_causal_mask(13, window_size=4))
    assert_close("o", attention_chunked(q, k, v, sc, 5, window=4), ref)


def test_attention_window_softcap_bf16():
    q, k, v, do, sc = _attn_case(13, 4, 2, mx.bfloat16)
    f32 = [t.astype(mx.float32) for t in (q, k, v, do)]
    kw = dict(window=4, softcap=2.0)
    _, grads = ref_vjp(lambda q, k, v: attention_ref(q, k, v, sc, **kw), f32[:3], f32[3])
    o = attention_chunked(q, k, v, sc, 5, **kw)
    assert_all_close(("dq", "dk", "dv"),
                     attention_backward_chunked(do, q, k, v, o, sc, 5, **kw),
                     [g.astype(mx.bfloat16) for g in grads])
