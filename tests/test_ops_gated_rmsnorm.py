"""Gated RMSNorm rms_norm(y)·w ⊙ silu(z): forward bit-equal to mlx-lm's
Qwen3NextRMSNormGated, hand backward (dy, dz) vs mx.vjp of the reference."""

import mlx.core as mx
import pytest
from mlx_lm.models.qwen3_next import Qwen3NextRMSNormGated

from gradcheck import Rng, assert_all_close, assert_close, ref_vjp
from mesp_mlx.ops.gated_rmsnorm import (gated_rmsnorm, gated_rmsnorm_backward,
                                        gated_rmsnorm_ref)

DV = 16


def _case(dtype=mx.float32, std=2.0, seed=0):
    rng = Rng(seed)
    shape = (2, 7, 3, DV)                               # [B, T, H, Dv]
    y = rng.normal(shape, dtype, std=std)
    z = rng.normal(shape, dtype, std=4.0)               # both silu tails
    w = rng.normal((DV,), dtype)
    dout = rng.normal(shape, dtype)
    return y, z, w, dout


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_forward_is_mlx_lm(dtype):
    y, z, w, _ = _case(dtype)
    norm = Qwen3NextRMSNormGated(DV, eps=1e-6)
    norm.weight = w
    out = gated_rmsnorm(y, z, w, 1e-6)
    assert out.dtype == dtype and mx.array_equal(out, norm(y, z)).item()


@pytest.mark.parametrize("std", [2.0, 1e-3])           # 1e-3: mean(y²) ~ eps
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_forward_and_backward(std, eps):
    y, z, w, dout = _case(std=std)
    out_ref, grads = ref_vjp(lambda y, z: gated_rmsnorm_ref(y, z, w, eps), (y, z), dout)
    assert_close("out", gated_rmsnorm(y, z, w, eps), out_ref)
    assert_all_close(("dy", "dz"), gated_rmsnorm_backward(dout, y, z, w, eps), grads)


def test_bf16_matches_fp32_truth():
    y, z, w, dout = _case(mx.bfloat16)
    f32 = [a.astype(mx.float32) for a in (y, z, w, dout)]
    fn = lambda y, z: gated_rmsnorm_ref(y, z, f32[2], 1e-6)
    out_ref, grads = ref_vjp(fn, f32[:2], f32[3])
    to16 = lambda a: a.astype(mx.bfloat16)
    assert_close("out", gated_rmsnorm(y, z, w, 1e-6), to16(out_ref))
    assert_all_close(("dy", "dz"), gated_rmsnorm_backward(dout, y, z, w, 1e-6),
                     [to16(a) for a in grads])
