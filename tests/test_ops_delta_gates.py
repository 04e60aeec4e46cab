"""Delta-rule gates g = exp(−exp(A_log)·softplus(a + dt_bias)), β = σ(b): forward
bit-equal to mlx-lm's, hand backward (da, db) vs mx.vjp of the reference."""

import mlx.core as mx
import pytest
from mlx_lm.models.gated_delta import compute_g

from gradcheck import Rng, assert_all_close
from mesp_mlx.ops.delta_gates import delta_gates, delta_gates_backward, delta_gates_ref

H = 6


def _case(dtype=mx.float32, seed=0):
    rng = Rng(seed)
    a = rng.normal((2, 37, H), dtype, std=3.0)        # both softplus tails
    b = rng.normal((2, 37, H), dtype, std=3.0)
    A_log = mx.log(rng.uniform((H,), 0.5, 16.0)).astype(dtype)   # mlx-lm's init range
    dt_bias = rng.normal((H,), dtype)
    dg, dbeta = rng.normal((2, 37, H)), rng.normal((2, 37, H), dtype)
    return a, b, A_log, dt_bias, dg, dbeta


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_forward_is_mlx_lm(dtype):
    a, b, A_log, dt_bias, _, _ = _case(dtype)
    g, beta = delta_gates(a, b, A_log, dt_bias)
    assert g.dtype == mx.float32 and beta.dtype == dtype
    assert mx.array_equal(g, compute_g(A_log, a, dt_bias)).item()
    assert mx.array_equal(beta, mx.sigmoid(b)).item()
    assert all(mx.array_equal(x, y).item()
               for x, y in zip(delta_gates_ref(a, b, A_log, dt_bias), (g, beta)))


def test_forward_and_backward():
    a, b, A_log, dt_bias, dg, dbeta = _case()
    fn = lambda a, b: delta_gates_ref(a, b, A_log, dt_bias)
    outs, grads = mx.vjp(fn, [a, b], [dg, dbeta])
    assert_all_close(("da", "db"), delta_gates_backward(dg, dbeta, a, b, A_log, dt_bias),
                     grads)


def test_bf16_matches_fp32_truth():
    """bf16 a, b, A_log, dt_bias (g fp32): against autodiff of the same bf16 graph,
    whose rounding points the backward shares, and the fp32 gradients of those inputs."""
    a, b, A_log, dt_bias, dg, dbeta = _case(mx.bfloat16)
    got = delta_gates_backward(dg, dbeta, a, b, A_log, dt_bias)
    _, grads = mx.vjp(lambda a, b: delta_gates_ref(a, b, A_log, dt_bias), [a, b], [dg, dbeta])
    assert_all_close(("da", "db"), got, grads)
    f32 = [x.astype(mx.float32) for x in (a, b, A_log, dt_bias, dbeta)]
    _, truth = mx.vjp(lambda a, b: delta_gates_ref(a, b, *f32[2:4]), f32[:2], [dg, f32[4]])
    assert_all_close(("da (fp32 truth)", "db (fp32 truth)"), got,
                     [t.astype(mx.bfloat16) for t in truth])
