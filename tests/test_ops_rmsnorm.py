"""RMSNorm (effective weight w, 1+w or none; full width and per head): hand backward
vs mx.vjp of the reference; forward vs mx.fast.rms_norm and mlx-lm's norm modules."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import gemma3_text

from gradcheck import Rng, assert_all_close, assert_close, ref_vjp
from mesp_mlx.ops.rmsnorm import effective_weight, rmsnorm, rmsnorm_backward, rmsnorm_ref

D = 64
DTYPES = [mx.float32, mx.bfloat16]


def _case(T, eps, dtype=mx.float32, seed=0, std=3.0):
    rng = Rng(seed)
    x = rng.normal((2, T, D), dtype, std=std)
    w = rng.normal((D,), dtype)                       # non-trivial weight, not ones
    dy = rng.normal((2, T, D), dtype)
    return x, w, dy


@pytest.mark.parametrize("T", [1, 7, 37])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
@pytest.mark.parametrize("std", [3.0, 1e-3])     # 1e-3: mean(x²) ~ eps, so eps matters
def test_forward_and_backward(T, eps, std):
    x, w, dy = _case(T, eps, std=std)
    y_ref, (dx_ref,) = ref_vjp(lambda x: rmsnorm_ref(x, w, eps), (x,), dy)
    assert_close("y", rmsnorm(x, w, eps), y_ref)
    assert_close("y (mx.fast)", mx.fast.rms_norm(x, w, eps), y_ref)
    assert_close("dx", rmsnorm_backward(dy, x, w, eps), dx_ref)


def test_backward_scale_invariance():
    """RMSNorm is scale-invariant in x, so dx ⟂ x per row: a structural check."""
    x, w, dy = _case(7, 1e-12)
    dx = rmsnorm_backward(dy, x, w, 1e-12)
    dots = (dx * x).sum(-1)
    assert mx.abs(dots).max().item() <= 1e-4 * mx.abs(dx).max().item() * D


def test_bf16_matches_fp32_truth():
    x, w, dy = _case(37, 1e-6, mx.bfloat16)
    f32 = [a.astype(mx.float32) for a in (x, w, dy)]
    y_ref, (dx_ref,) = ref_vjp(lambda x: rmsnorm_ref(x, f32[1], 1e-6), (f32[0],), f32[2])
    got = (rmsnorm(x, w, 1e-6), rmsnorm_backward(dy, x, w, 1e-6))
    assert_all_close(("y", "dx"), got, (y_ref.astype(mx.bfloat16), dx_ref.astype(mx.bfloat16)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["w", "1+w", "none"])
@pytest.mark.parametrize("shape", [(2, 5, 24), (2, 3, 5, 8)])      # full width, per head
def test_rmsnorm_effective_weight(kind, shape, dtype):
    rng = Rng(0)
    x, dy = rng.normal(shape, dtype), rng.normal(shape, dtype)
    w = effective_weight(rng.normal(shape[-1:], dtype, std=0.3), kind)
    y, (dx_ref,) = ref_vjp(lambda x: rmsnorm_ref(x, w, 1e-6), (x,), dy)
    assert_close("y", rmsnorm(x, w, 1e-6), y)
    assert_close("dx", rmsnorm_backward(dy, x, w, 1e-6), dx_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 16), (2, 3, 5, 16)])       # full width, per head
def test_norms_match_mlx_lm(shape, dtype):
    """Bit-equal to nn.RMSNorm (w) and gemma3_text.RMSNorm (1 + w, q/k norms too)."""
    rng = Rng(1)
    x = rng.normal(shape, dtype)
    for kind, n in (("w", nn.RMSNorm(16, eps=1e-6)), ("1+w", gemma3_text.RMSNorm(16, eps=1e-6))):
        n.weight = rng.normal((16,), dtype, std=0.5)
        y = rmsnorm(x, effective_weight(n.weight, kind), 1e-6)
        assert mx.array_equal(n(x), y).item(), kind
    assert mx.array_equal(rmsnorm(x, effective_weight(n.weight, "none"), 1e-6),
                          mx.fast.rms_norm(x, None, 1e-6)).item()
    with pytest.raises(ValueError, match="kind"):
        effective_weight(n.weight, "1-w")
