"""GeGLU y = G(a) ⊙ u (tanh and erf GELU): forward equals mlx-lm's expression,
hand backward vs mx.vjp of the reference; fp32 tight, bf16 by cosine."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from gradcheck import Rng, assert_all_close, assert_close, ref_vjp
from mesp_mlx.ops.geglu import geglu, geglu_backward, geglu_ref

DTYPES = [mx.float32, mx.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approx", [True, False])
def test_geglu(approx, dtype):
    rng = Rng(3)
    a, u, dy = (rng.normal((4, 7, 32), dtype, std=2.0) for _ in range(3))
    mlx_lm = lambda a, u: (nn.gelu_approx(a) if approx else nn.gelu(a)) * u
    assert mx.array_equal(geglu(a, u, approx), mlx_lm(a, u)).item()
    y, grads = ref_vjp(lambda a, u: geglu_ref(a, u, approx), (a, u), dy)
    assert_close("y", geglu(a, u, approx), y)
    got = geglu_backward(dy, a, u, approx)
    assert_all_close(("da", "du"), got, grads)
    # the derivative is of mlx's own function, not only of our written-out reference
    assert_all_close(("da (mlx)", "du (mlx)"), got, ref_vjp(mlx_lm, (a, u), dy)[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approx", [True, False])
def test_geglu_saving(approx, dtype):
    """The recompute's product is geglu's to rounding, and its saved fp32 term gives
    the backward of an unsaved call (the same ops on the same values)."""
    from mesp_mlx.ops.geglu import geglu_saving
    rng = Rng(4)
    a, u, dy = (rng.normal((4, 7, 32), dtype, std=2.0) for _ in range(3))
    y, s = geglu_saving(a, u, approx)
    assert y.dtype == geglu(a, u, approx).dtype and s.dtype == mx.float32
    assert_close("y (saving)", y, geglu(a, u, approx))
    for got, want in zip(geglu_backward(dy, a, u, approx, s), geglu_backward(dy, a, u, approx)):
        assert mx.array_equal(got, want).item()
