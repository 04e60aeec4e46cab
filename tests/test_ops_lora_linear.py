"""LoRA linear + FrozenWeight: hand backward vs mx.vjp of the dense reference.

Quantized W0 is compared against autodiff through `lora_linear_ref` on the
dequantized matrix `W0.dense()`: the frozen weight the op sees is exactly that
matrix, so the fp32 tolerance stays at 1e-5.
"""

import mlx.core as mx
import mlx.nn as nn
import pytest

from gradcheck import Rng, assert_all_close, assert_close, ref_vjp
from mesp_mlx.ops.frozen import FrozenWeight
from mesp_mlx.ops.lora_linear import (lora_linear, lora_linear_backward, lora_linear_fn,
                                      lora_linear_ref)

D_IN, D_OUT, R, S = 128, 96, 8, 20.0


def _frozen(rng, bits=None, group_size=64, dtype=mx.float32):
    W = rng.normal((D_OUT, D_IN), dtype, std=D_IN ** -0.5)
    if bits is None:
        return FrozenWeight(W)
    w, scales, biases = mx.quantize(W, group_size=group_size, bits=bits)
    return FrozenWeight(w, scales, biases, group_size, bits)


def _case(T, bias, drop, bits=None, group_size=64, dtype=mx.float32, seed=0):
    """Inputs (x, W0, A, B, bias, m) and a random cotangent g, B != 0."""
    rng = Rng(seed)
    W0 = _frozen(rng, bits, group_size, dtype)
    x = rng.normal((2, T, D_IN), dtype)
    A = rng.uniform((D_IN, R), -D_IN ** -0.5, D_IN ** -0.5, dtype)
    B = rng.normal((R, D_OUT), dtype, std=0.1)          # non-zero: dA depends on it
    b = rng.normal((D_OUT,), dtype) if bias else None
    m = rng.dropout_multiplier(x.shape, dtype=dtype) if drop else None
    g = rng.normal((2, T, D_OUT), dtype)
    return x, W0, A, B, b, m, g


def _ref_grads(x, W0, A, B, b, m, g):
    fn = lambda x, A, B: lora_linear_ref(x, W0.dense(), A, B, S, b, m)
    return ref_vjp(fn, (x, A, B), g)


@pytest.mark.parametrize("T", [1, 7, 37])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("drop", [False, True])
def test_dense_forward_and_backward(T, bias, drop):
    x, W0, A, B, b, m, g = _case(T, bias, drop)
    y_ref, grads_ref = _ref_grads(x, W0, A, B, b, m, g)
    assert_close("y", lora_linear(x, W0, A, B, S, b, m), y_ref)
    got = lora_linear_backward(g, x, W0, A, B, S, m)
    assert_all_close(("dx", "dA", "dB"), got, grads_ref)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bias,drop", [(False, False), (True, True)])
def test_quantized_forward_and_backward(bits, group_size, bias, drop):
    x, W0, A, B, b, m, g = _case(7, bias, drop, bits, group_size)
    assert W0.quantized and W0.shape == (D_OUT, D_IN)
    y_ref, grads_ref = _ref_grads(x, W0, A, B, b, m, g)
    assert_close("y", lora_linear(x, W0, A, B, S, b, m), y_ref)
    got = lora_linear_backward(g, x, W0, A, B, S, m)
    assert_all_close(("dx", "dA", "dB"), got, grads_ref)


def test_need_dx_false_and_no_lora():
    x, W0, A, B, b, m, g = _case(7, True, True)
    _, (dx_ref, dA_ref, dB_ref) = _ref_grads(x, W0, A, B, b, m, g)
    dx, dA, dB = lora_linear_backward(g, x, W0, A, B, S, m, need_dx=False)
    assert dx is None
    assert_all_close(("dA", "dB"), (dA, dB), (dA_ref, dB_ref))
    # Without LoRA the layer is a frozen linear: y = x W0ᵀ + b, dx = g W0.
    y_ref, (dx0_ref,) = ref_vjp(lambda x: x @ W0.dense().T + b, (x,), g)
    assert_close("y (no LoRA)", lora_linear(x, W0, bias=b), y_ref)
    dx0, dA0, dB0 = lora_linear_backward(g, x, W0)
    assert dA0 is None and dB0 is None
    assert_close("dx (no LoRA)", dx0, dx0_ref)


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("bias,drop", [(False, False), (True, True)])
def test_custom_function_vjp_and_grad(bits, bias, drop):
    x, W0, A, B, b, m, g = _case(37, bias, drop, bits)
    y_ref, grads_ref = _ref_grads(x, W0, A, B, b, m, g)
    fn = lambda x, A, B: lora_linear_fn(x, A, B, W0, S, b, m)
    y, grads = mx.vjp(fn, [x, A, B], [g])
    assert_close("y", y[0], y_ref)
    assert_all_close(("dx", "dA", "dB"), grads, grads_ref)
    # Through mx.grad of a scalar loss <y, g>: same gradients.
    loss = lambda x, A, B: (fn(x, A, B) * g).sum()
    got = mx.grad(loss, argnums=(0, 1, 2))(x, A, B)
    assert_all_close(("dx (grad)", "dA (grad)", "dB (grad)"), got, grads_ref)


def test_custom_function_is_used():
    """The wrapper's VJP must be the hand backward, not autodiff of the forward."""
    x, W0, A, B, b, m, g = _case(7, False, False)
    fn = lambda x, A, B: lora_linear_fn(x, A, B, W0, S, b, m)
    _, grads = mx.vjp(fn, [x, A, B], [g])
    hand = lora_linear_backward(g, x, W0, A, B, S, m)
    for name, a, h in zip(("dx", "dA", "dB"), grads, hand):
        assert mx.array_equal(a, h).item(), f"{name}: vjp differs from hand backward"


def test_bf16_matches_fp32_truth():
    x, W0, A, B, b, m, g = _case(37, True, True, dtype=mx.bfloat16)
    f32 = lambda a: None if a is None else a.astype(mx.float32)
    W32 = FrozenWeight(f32(W0.w))
    y_ref, grads_ref = _ref_grads(f32(x), W32, f32(A), f32(B), f32(b), f32(m), f32(g))
    to16 = lambda a: a.astype(mx.bfloat16)
    assert_close("y", lora_linear(x, W0, A, B, S, b, m), to16(y_ref))
    got = lora_linear_backward(g, x, W0, A, B, S, m)
    assert_all_close(("dx", "dA", "dB"), got, [to16(t) for t in grads_ref])


@pytest.mark.parametrize("bits", [4, 8])
def test_frozen_weight_products_and_of(bits):
    rng = Rng(1)
    lin = nn.Linear(D_IN, D_OUT)
    q = nn.QuantizedLinear.from_linear(lin, group_size=32, bits=bits)
    x, g = rng.normal((3, 5, D_IN)), rng.normal((3, 5, D_OUT))
    Fd, Fq = FrozenWeight.of(lin), FrozenWeight.of(q)
    assert not Fd.quantized and Fq.quantized
    assert Fd.shape == Fq.shape == (D_OUT, D_IN)
    assert (Fq.group_size, Fq.bits) == (32, bits)
    Wq = mx.dequantize(q.weight, q.scales, q.biases, group_size=32, bits=bits)
    assert_close("dense()", Fq.dense(), Wq)
    assert_close("dense() (float)", Fd.dense(), lin.weight)
    for F, W in ((Fd, lin.weight), (Fq, Wq)):
        assert_close(f"xWt q={F.quantized}", F.xWt(x), x @ W.T)
        assert_close(f"gW q={F.quantized}", F.gW(g), g @ W)
    assert_close("xWt vs QuantizedLinear", Fq.xWt(x) + q.bias, q(x))
