"""Causal GQA attention, plain, sliding-window and softcapped: hand backward (full P
and chunked recompute) vs mx.vjp of the reference; forward vs
mx.fast.scaled_dot_product_attention with mlx-lm's masks."""

import mlx.core as mx
import pytest
from mlx_lm.models.base import create_causal_mask

from gradcheck import Rng, assert_all_close, assert_close, ref_vjp
from mesp_mlx.ops.attention import (attention, attention_backward,
                                    attention_backward_chunked, attention_backward_rows,
                                    attention_chunked, attention_delta, attention_ref)

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


@pytest.mark.parametrize("T", [1, 37])
def test_bf16_matches_fp32_truth(T):
    q, k, v, do, scale = _case(T, 14, 2, mx.bfloat16)
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


def _sdpa_window(q, k, v, sc, window):
    """Independent reference: the fused kernel with mlx-lm's full bool window mask."""
    mask = create_causal_mask(q.shape[2], window_size=window)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=sc, mask=mask)


@pytest.mark.parametrize("T,window,chunk", [(13, 1, 5), (13, 4, 3), (13, 4, 5), (16, 4, 4),
                                            (13, 13, 4), (13, 20, 6), (1, 4, 1)])
@pytest.mark.parametrize("H,K", [(4, 2), (3, 1)])
def test_window_vs_mlx_lm_mask(T, window, chunk, H, K):
    q, k, v, do, sc = _attn_case(T, H, K, seed=2)
    o_ref, grads = ref_vjp(lambda q, k, v: _sdpa_window(q, k, v, sc, window), (q, k, v), do)
    assert_close("o chunked", attention_chunked(q, k, v, sc, chunk, window=window), o_ref)
    assert_all_close(("dq", "dk", "dv"),
                     attention_backward_chunked(do, q, k, v, o_ref, sc, chunk, window=window),
                     grads)


def test_window_at_least_T_is_causal():
    q, k, v, do, sc = _attn_case(13, 4, 2)
    o = attention_chunked(q, k, v, sc, 5)
    grads = attention_backward_chunked(do, q, k, v, o, sc, 5)
    for W in (13, 50):
        assert mx.array_equal(attention_chunked(q, k, v, sc, 5, window=W), o).item()
        for a, b in zip(attention_backward_chunked(do, q, k, v, o, sc, 5, window=W), grads):
            assert mx.array_equal(a, b).item()


def test_window_reads_only_its_keys():
    """NaN in key/value 0: blocks whose window starts after 0 must never touch it."""
    q, k, v, do, sc = _attn_case(13, 4, 2)
    k, v = k.at[:, :, 0].add(mx.nan), v.at[:, :, 0].add(mx.nan)
    o = attention_chunked(q, k, v, sc, 4, window=4)                # blocks [4, 8) on: k0 >= 1
    dq, dk, dv = attention_backward_chunked(do, q, k, v, o, sc, 4, window=4)
    for name, t in (("o", o), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert mx.all(mx.isfinite(t[:, :, 4:])).item(), f"{name} read a key outside its window"


def test_softcap_matches_gemma2_attention():
    """Our softcapped (and windowed) attention inside mlx-lm's gemma2 Attention module."""
    from mlx_lm.models import gemma2
    mx.random.seed(0)
    args = gemma2.ModelArgs("gemma2", hidden_size=32, num_hidden_layers=1,
                            intermediate_size=64, num_attention_heads=4, head_dim=8,
                            rms_norm_eps=1e-6, vocab_size=16, num_key_value_heads=2,
                            attn_logit_softcapping=2.0, query_pre_attn_scalar=8.0)
    att = gemma2.Attention(args)
    x = Rng(7).normal((2, 13, 32))
    heads = lambda y, n: y.reshape(2, 13, n, 8).transpose(0, 2, 1, 3)
    q, k = att.rope(heads(att.q_proj(x), 4)), att.rope(heads(att.k_proj(x), 2))
    v = heads(att.v_proj(x), 2)
    for window in (None, 4):
        o = attention_chunked(q, k, v, att.scale, 5, window=window, softcap=2.0)
        ours = att.o_proj(o.transpose(0, 2, 1, 3).reshape(2, 13, 32))
        assert_close(f"window {window}", ours,
                     att(x, mask=create_causal_mask(13, window_size=window)))


@pytest.mark.parametrize("window,softcap_c", [(None, 2.0), (4, None), (4, 2.0)])
def test_attention_window_softcap_bf16(window, softcap_c):
    q, k, v, do, sc = _attn_case(13, 4, 2, mx.bfloat16)
    f32 = [t.astype(mx.float32) for t in (q, k, v, do)]
    kw = dict(window=window, softcap=softcap_c)
    o_ref, grads = ref_vjp(lambda q, k, v: attention_ref(q, k, v, sc, **kw), f32[:3], f32[3])
    o = attention_chunked(q, k, v, sc, 5, **kw)
    assert_close("o", o, o_ref.astype(mx.bfloat16))
    assert_all_close(("dq", "dk", "dv"),
                     attention_backward_chunked(do, q, k, v, o, sc, 5, **kw),
                     [g.astype(mx.bfloat16) for g in grads])


# ---------------------------------------------------------------- packed rows
SEGS = mx.array([[0] * 4 + [1] * 5 + [2] * 4, [0] * 13], dtype=mx.int32)   # B 2, T 13


def _per_segment(q, k, v, sc, segs, **kw):
    """Independent reference: attention_ref of each segment alone, concatenated."""
    rows = []
    for b in range(q.shape[0]):
        ids = segs[b].tolist()
        cuts = [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]]
        bounds = list(zip([0] + cuts, cuts + [len(ids)]))
        rows.append(mx.concatenate([attention_ref(q[b:b + 1, :, a:e], k[b:b + 1, :, a:e],
                                                  v[b:b + 1, :, a:e], sc, **kw)
                                    for a, e in bounds], axis=2))
    return mx.concatenate(rows, axis=0)


@pytest.mark.parametrize("window,softcap_c", [(None, None), (3, None), (None, 2.0)])
@pytest.mark.parametrize("chunk", [3, 5, 16])
@pytest.mark.parametrize("H,K", [(2, 2), (6, 1)])
def test_segments_block_diagonal(window, softcap_c, chunk, H, K):
    """With segment ids no query reads a key of another segment: every output and
    gradient equals the segments run one by one (query blocks cut through them)."""
    q, k, v, do, sc = _attn_case(13, H, K, seed=3)
    kw = dict(window=window, softcap=softcap_c)
    o_ref, grads = ref_vjp(lambda q, k, v: _per_segment(q, k, v, sc, SEGS, **kw),
                           (q, k, v), do)
    seg = dict(kw, segments=SEGS)
    assert_close("o ref", attention_ref(q, k, v, sc, **seg), o_ref)
    assert_close("o chunked", attention_chunked(q, k, v, sc, chunk, **seg), o_ref)
    o, P = attention(q, k, v, sc, **seg)
    assert_close("o", o, o_ref)
    assert_all_close(("dq", "dk", "dv"), attention_backward(do, q, k, v, o, P, sc, **seg),
                     grads)
    assert_all_close(("dq c", "dk c", "dv c"),
                     attention_backward_chunked(do, q, k, v, o_ref, sc, chunk, **seg), grads)
    with pytest.raises(AssertionError):                   # the boundary matters
        assert_close("causal only", attention_chunked(q, k, v, sc, chunk, **kw), o_ref)


def test_segments_fused_bool_mask():
    """The fused kernel (mx.fast.sdpa) with keep_mask's [B, 1, T, T] bool mask = the
    per-segment reference, on this backend too."""
    from mesp_mlx.ops.attention import keep_mask
    q, k, v, do, sc = _attn_case(13, 4, 2, seed=4)
    o_ref, grads = ref_vjp(lambda q, k, v: _per_segment(q, k, v, sc, SEGS), (q, k, v), do)
    mask = keep_mask(0, 13, 0, 13, None, SEGS)[:, None]
    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=sc, mask=mask)
    assert mask.shape == (2, 1, 13, 13)
    assert_close("o fused", o, o_ref)


@pytest.mark.parametrize("window,segs", [(None, None), (3, None), (None, SEGS)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_rows_backward_reuses_the_forward_probs(window, segs, dtype):
    """The block's recompute keeps P of one all-T query block (block._keeps_probs):
    the backward from that P equals the one that recomputes it, bit for bit, and
    both match autodiff; a P that cannot serve (several blocks, softcap) is refused."""
    q, k, v, do, sc = _attn_case(13, 6, 2, seed=5)
    q, k, v, do = (a.astype(dtype) for a in (q, k, v, do))
    kw = dict(window=window, segments=segs)
    o, P = attention(q, k, v, sc, **kw)
    rows = lambda t0, t1: (do[:, :, t0:t1], attention_delta(do[:, :, t0:t1], o[:, :, t0:t1]))
    kept = attention_backward_rows(rows, q, k, v, sc, 13, p=P, **kw)
    again = attention_backward_rows(rows, q, k, v, sc, 13, **kw)
    for a, b in zip(kept, again):
        assert mx.array_equal(a, b).item()
    f32 = lambda t: t.astype(mx.float32)
    ref = (lambda q, k, v: attention_ref(q, k, v, sc, **kw)) if segs is None else \
        (lambda q, k, v: _per_segment(q, k, v, sc, segs, window=window))
    _, grads = ref_vjp(ref, tuple(f32(a) for a in (q, k, v)), f32(do))
    if dtype == mx.float32:
        assert_all_close(("dq", "dk", "dv"), kept, grads)
    else:
        assert_all_close(("dq", "dk", "dv"), kept, [g.astype(dtype) for g in grads])
    for bad in (dict(chunk=5), dict(chunk=13, softcap=2.0)):
        with pytest.raises(ValueError, match="one query block"):
            attention_backward_rows(rows, q, k, v, sc, bad.pop("chunk"), p=P, **bad, **kw)
