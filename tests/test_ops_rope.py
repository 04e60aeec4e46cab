"""RoPE (traditional=False, mlx-lm Qwen2 convention): backward vs mx.vjp of the
reference; forward vs nn.RoPE and mlx-lm's initialize_rope."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.rope_utils import initialize_rope

from gradcheck import Rng, assert_close, ref_vjp
from mesp_mlx.ops.rope import rope, rope_backward, rope_ref

HD = 32


def _rtol(max_pos):
    """fp32 tolerance for rotations up to position `max_pos`.

    Two fp32 implementations may round the angle θ = p·ω differently by a few ulps
    (≈ p·2⁻²⁴ rad each), which moves outputs by that much relative to |x|: at
    position 1000 that is ~6e-5 rad, above the default 1e-5. Small positions keep 1e-5.
    """
    return max(1e-5, 4 * max_pos * 2.0 ** -24)


def _case(T, dtype=mx.float32, seed=0):
    rng = Rng(seed)
    return rng.normal((2, 3, T, HD), dtype), rng.normal((2, 3, T, HD), dtype)


@pytest.mark.parametrize("T", [1, 7, 37])
@pytest.mark.parametrize("offset", [0, 5, 1000])
@pytest.mark.parametrize("base", [10000.0, 1e6])
def test_forward_and_backward(T, offset, base):
    x, dy = _case(T)
    tol = _rtol(offset + T)
    y_ref, (dx_ref,) = ref_vjp(lambda x: rope_ref(x, HD, base, offset), (x,), dy)
    assert_close("y", rope(x, HD, base, offset), y_ref, rtol=tol)
    assert_close("y (nn.RoPE)", nn.RoPE(HD, traditional=False, base=base)(x, offset=offset),
                 y_ref, rtol=tol)
    assert_close("y (initialize_rope)", initialize_rope(HD, base, False)(x, offset=offset),
                 y_ref, rtol=tol)
    assert_close("dx", rope_backward(dy, HD, base, offset), dx_ref, rtol=tol)


@pytest.mark.parametrize("dims", [8, 16])
def test_partial_rotary_dims(dims):
    """dims < head dim: only the first `dims` features rotate, the rest pass through."""
    x, dy = _case(7)
    y_ref, (dx_ref,) = ref_vjp(lambda x: rope_ref(x, dims, 1e4, 3), (x,), dy)
    assert_close("y", rope(x, dims, 1e4, 3), y_ref)
    assert_close("y (nn.RoPE)", nn.RoPE(dims, traditional=False, base=1e4)(x, offset=3), y_ref)
    assert_close("dx", rope_backward(dy, dims, 1e4, 3), dx_ref)


def test_offset_matters():
    """Guards against a backward that ignores the offset."""
    x, dy = _case(7)
    a, b = rope_backward(dy, HD, 1e4, 0), rope_backward(dy, HD, 1e4, 9)
    assert mx.abs(a - b).max().item() > 1e-2


def test_bf16_matches_fp32_truth():
    x, dy = _case(37, mx.bfloat16)
    y_ref, (dx_ref,) = ref_vjp(lambda x: rope_ref(x, HD, 1e6, 4), (x.astype(mx.float32),),
                               dy.astype(mx.float32))
    assert_close("y", rope(x, HD, 1e6, 4), y_ref.astype(mx.bfloat16))
    assert_close("dx", rope_backward(dy, HD, 1e6, 4), dx_ref.astype(mx.bfloat16))
