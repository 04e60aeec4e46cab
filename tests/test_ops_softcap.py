"""Softcap y = c·tanh(s/c): hand backward (from the output) vs mx.vjp of the reference."""

import mlx.core as mx
import pytest

from gradcheck import Rng, assert_close, ref_vjp
from mesp_mlx.ops.softcap import softcap, softcap_backward, softcap_ref

DTYPES = [mx.float32, mx.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap(dtype):
    rng = Rng(4)
    s, dy = rng.normal((5, 9), dtype, std=20.0), rng.normal((5, 9), dtype)
    y, (ds,) = ref_vjp(lambda s: softcap_ref(s, 30.0), (s,), dy)
    assert_close("y", softcap(s, 30.0), y)
    assert_close("ds", softcap_backward(dy, softcap(s, 30.0), 30.0), ds)
