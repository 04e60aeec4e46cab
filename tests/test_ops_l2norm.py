"""q/k normalisation of the gated delta rule: forward bit-equal to mlx-lm's normalize_qk
and equal to the L2 form; hand backward vs mx.vjp of the reference."""

import mlx.core as mx
import pytest
from mlx_lm.models import gated_delta

from gradcheck import Rng, assert_all_close
from mesp_mlx.ops.l2norm import normalize_qk, normalize_qk_backward, normalize_qk_ref

DK = 16
KW = dict(inv_scale=DK ** -0.5, eps=1e-6)


def _case(dtype=mx.float32, std=2.0, seed=0):
    rng = Rng(seed)
    shape = (2, 7, 3, DK)                       # [B, T, Hk, Dk]
    return [rng.normal(shape, dtype, std=std) for _ in range(4)]    # q, k, dq, dk


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_forward_is_mlx_lm(dtype):
    q, k, _, _ = _case(dtype)
    ours, theirs = normalize_qk(q, k, **KW), gated_delta.normalize_qk(q, k, **KW)
    for name, a, b in zip("qk", ours, theirs):
        assert a.dtype == dtype and mx.array_equal(a, b).item(), name


def test_is_an_l2_norm():
    """With inv_scale = Dk^-½: q' = Dk^-½ q / sqrt(Σq² + ε), k' = k / sqrt(Σk² + ε)."""
    q, k, _, _ = _case(std=1e-3)                # Σx² ~ ε: the eps placement matters
    l2 = lambda x: x * mx.rsqrt((x * x).sum(-1, keepdims=True) + KW["eps"])
    assert_all_close(("q", "k"), normalize_qk(q, k, **KW), (DK ** -0.5 * l2(q), l2(k)))


@pytest.mark.parametrize("std", [2.0, 1e-3])
@pytest.mark.parametrize("inv_scale", [DK ** -0.5, 0.7])
def test_forward_and_backward(std, inv_scale):
    q, k, dq, dk = _case(std=std)
    kw = dict(inv_scale=inv_scale, eps=1e-6)
    (yq, yk), grads = mx.vjp(lambda q, k: normalize_qk_ref(q, k, **kw), [q, k], [dq, dk])
    assert_all_close(("q", "k"), normalize_qk(q, k, **kw), (yq, yk))
    assert_all_close(("dq", "dk"), normalize_qk_backward(dq, dk, q, k, **kw), grads)


def test_bf16_matches_fp32_truth():
    q, k, dq, dk = _case(mx.bfloat16)
    f32 = [a.astype(mx.float32) for a in (q, k, dq, dk)]
    outs, grads = mx.vjp(lambda q, k: normalize_qk_ref(q, k, **KW), f32[:2], f32[2:])
    to16 = lambda a: a.astype(mx.bfloat16)
    assert_all_close(("q", "k"), normalize_qk(q, k, **KW), [to16(a) for a in outs])
    assert_all_close(("dq", "dk"), normalize_qk_backward(dq, dk, q, k, **KW),
                     [to16(a) for a in grads])
