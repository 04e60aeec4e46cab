"""xIELU (Apertus): forward equals mlx-lm's XieLU, hand backward vs mx.vjp of the
reference and of mlx-lm's own function; fp32 tight, bf16 by cosine."""

import mlx.core as mx
import pytest
from mlx_lm.models.activations import XieLU

from gradcheck import Rng, assert_close, ref_vjp
from mesp_mlx.ops.xielu import xielu, xielu_backward, xielu_ref


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_xielu(dtype):
    rng = Rng(5)
    act = XieLU(alpha_p_init=0.7, alpha_n_init=0.9, beta=0.4)
    act.update({k: v.astype(dtype) for k, v in act.parameters().items()})
    p = [getattr(act, n) for n in ("alpha_p", "alpha_n", "beta", "eps")]
    x, dy = rng.normal((3, 9, 32), dtype, std=2.0), rng.normal((3, 9, 32), dtype)
    x[0, 0, :4] = mx.array([0.0, -1e-7, 1e-7, -2e-6], dtype)        # around 0 and ε
    mlx_lm = act.__call__
    assert mx.array_equal(xielu(x, *p), mlx_lm(x)).item()
    y, (dx,) = ref_vjp(lambda x: xielu_ref(x, *p), (x,), dy)
    assert_close("y", xielu(x, *p), y)
    got = xielu_backward(dy, x, *p)
    assert_close("dx", got, dx)
    assert_close("dx (mlx)", got, ref_vjp(mlx_lm, (x,), dy)[1][0])

