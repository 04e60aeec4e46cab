"""Causal GQA attention: hand backward (full P and chunked recompute) vs mx.vjp
of the reference; forward vs mx.fast.scaled_dot_product_attention."""

import mlx.core as mx
import pytest

from gradcheck import Rng, assert_all_close, assert_close, ref_vjp
from mesp_mlx.ops.attention import (attention, attention_backward,
                                    attention_backward_chunked, attention_ref)

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
