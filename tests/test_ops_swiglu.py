"""SwiGLU y = silu(gate) ⊙ up: hand backward vs mx.vjp of the reference."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from gradcheck import Rng, assert_all_close, assert_close, ref_vjp
from mesp_mlx.ops.swiglu import (swiglu, swiglu_backward, swiglu_from_saved, swiglu_ref,
                                 swiglu_saving)

F = 96


def _case(T, dtype=mx.float32, seed=0):
    rng = Rng(seed)
    gate = rng.normal((2, T, F), dtype, std=4.0)      # wide range: both silu tails
    up = rng.normal((2, T, F), dtype)
    dy = rng.normal((2, T, F), dtype)
    return gate, up, dy


@pytest.mark.parametrize("T", [1, 7, 37])
def test_forward_and_backward(T):
    gate, up, dy = _case(T)
    y_ref, grads_ref = ref_vjp(swiglu_ref, (gate, up), dy)
    assert_close("y", swiglu(gate, up), y_ref)
    assert_close("y (nn.silu)", nn.silu(gate) * up, y_ref)
    assert_all_close(("dgate", "dup"), swiglu_backward(dy, gate, up), grads_ref)


def test_bf16_matches_fp32_truth():
    gate, up, dy = _case(37, mx.bfloat16)
    y_ref, grads_ref = ref_vjp(swiglu_ref, (gate.astype(mx.float32), up.astype(mx.float32)),
                               dy.astype(mx.float32))
    to16 = lambda a: a.astype(mx.bfloat16)
    assert_close("y", swiglu(gate, up), to16(y_ref))
    assert_all_close(("dgate", "dup"), swiglu_backward(dy, gate, up),
                     [to16(t) for t in grads_ref])


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_saving_forward_is_the_forward_and_feeds_the_backward(dtype):
    """The recompute's swiglu_saving gives swiglu's values bit for bit (the block's
    output must not depend on which one ran) and its σ gives the same backward."""
    gate, up, dy = _case(37, dtype)
    y, sig = swiglu_saving(gate, up)
    assert mx.array_equal(y, swiglu(gate, up)).item()
    for a, b in zip(swiglu_backward(dy, gate, up, sig), swiglu_backward(dy, gate, up)):
        assert mx.array_equal(a, b).item()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_forward_from_a_kept_sigma(dtype):
    """A kept block's backward rebuilds m from its kept σ without an exp: bit-equal to
    swiglu in fp32; in bf16 (σ kept in bf16) within one bf16 rounding of it."""
    gate, up, _ = _case(37, dtype)
    y, sig = swiglu_saving(gate, up)
    m = swiglu_from_saved(gate, up, sig)
    assert m.dtype == y.dtype
    if dtype == mx.float32:
        assert mx.array_equal(m, y).item()
    else:
        err = mx.abs(m.astype(mx.float32) - y.astype(mx.float32))
        assert (err <= 2 ** -7 * mx.abs(y.astype(mx.float32)) + 1e-6).all().item(), \
            f"max {err.max().item():.3g}"
