"""Causal depthwise conv (Qwen3.5: conv then silu; LFM2: optional bias): forward vs
mlx-lm's nn.Conv1d on left-zero-padded input, hand backward vs mx.vjp of the
reference, packed segments vs separate runs."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from gradcheck import Rng, assert_all_close, assert_close, ref_vjp
from mesp_mlx.ops.causal_conv import causal_conv, causal_conv_backward, causal_conv_ref

C = 6


def _case(T, K=4, bias=True, dtype=mx.float32, seed=0):
    rng = Rng(seed)
    x = rng.normal((2, T, C), dtype, std=2.0)
    w = rng.normal((C, K, 1), dtype, std=0.5)
    b = rng.normal((C,), dtype) if bias else None
    dy = rng.normal((2, T, C), dtype)
    return x, w, b, dy


def _mlx_lm(x, w, b, silu):
    """What the layers run: nn.Conv1d(C, C, K, groups=C) on K − 1 zeros then x."""
    K = w.shape[1]
    conv = nn.Conv1d(C, C, K, groups=C, bias=b is not None)
    conv.update({"weight": w} if b is None else {"weight": w, "bias": b})
    y = conv(mx.concatenate([mx.zeros((x.shape[0], K - 1, C), x.dtype), x], axis=1))
    return nn.silu(y) if silu else y


def _ref_grads(x, w, b, dy, silu, segments=None):
    prim = (x, w) if b is None else (x, w, b)
    fn = lambda x, w, b=None: causal_conv_ref(x, w, b, silu=silu, segments=segments)
    return ref_vjp(fn, prim, dy)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("silu,bias", [(True, False), (False, True), (False, False)])
def test_forward_is_mlx_lm(silu, bias, dtype):
    x, w, b, _ = _case(37, bias=bias, dtype=dtype)
    assert mx.array_equal(causal_conv(x, w, b, silu=silu), _mlx_lm(x, w, b, silu)).item()


@pytest.mark.parametrize("T", [1, 3, 37])
@pytest.mark.parametrize("K", [4, 3])
@pytest.mark.parametrize("silu,bias", [(True, False), (False, True)])
def test_forward_and_backward(T, K, silu, bias):
    x, w, b, dy = _case(T, K, bias)
    y_ref, grads_ref = _ref_grads(x, w, b, dy, silu)
    assert_close("y", causal_conv(x, w, b, silu=silu), y_ref)
    dx, dw, db = causal_conv_backward(dy, x, w, b, silu=silu, weight_grads=True)
    got = (dx, dw) if b is None else (dx, dw, db)
    assert_all_close(("dx", "dw", "db")[:len(got)], got, grads_ref)
    assert causal_conv_backward(dy, x, w, b, silu=silu)[1:] == (None, None)


SEGMENTS = [[0] * 10 + [1] * 2 + [2] * 25, [0] * 36 + [1]]


@pytest.mark.parametrize("silu,bias", [(True, False), (False, True)])
def test_segments_are_separate_runs(silu, bias):
    """Each packed example sees zero history; dx, dw, db as the reference's."""
    x, w, b, dy = _case(37, bias=bias, seed=1)
    seg = mx.array(SEGMENTS, mx.int32)
    y = causal_conv(x, w, b, silu=silu, segments=seg)
    for r, row in enumerate(SEGMENTS):
        bounds = [0] + [t for t in range(1, 37) if row[t] != row[t - 1]] + [37]
        for t0, t1 in zip(bounds, bounds[1:]):
            assert_close(f"y[{r}, {t0}:{t1}]", y[r:r + 1, t0:t1],
                         _mlx_lm(x[r:r + 1, t0:t1], w, b, silu))
    y_ref, grads_ref = _ref_grads(x, w, b, dy, silu, seg)
    assert_close("y (reference)", y, y_ref)
    got = causal_conv_backward(dy, x, w, b, silu=silu, segments=seg, weight_grads=True)
    got = got[:2] if b is None else got
    assert_all_close(("dx", "dw", "db")[:len(got)], got, grads_ref)


def test_bf16_matches_fp32_truth():
    x, w, _, dy = _case(37, dtype=mx.bfloat16)
    f32 = [a.astype(mx.float32) for a in (x, w, dy)]
    y_ref, (dx_ref, _) = _ref_grads(f32[0], f32[1], None, f32[2], silu=True)
    to16 = lambda a: a.astype(mx.bfloat16)
    got = (causal_conv(x, w, silu=True), causal_conv_backward(dy, x, w, silu=True)[0])
    assert_all_close(("y", "dx"), got, (to16(y_ref), to16(dx_ref)))
