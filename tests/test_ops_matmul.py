"""mm: half-precision products through fp32 on the CPU backend give the values of
the plain product (the same fp32 accumulation, rounded once to the operand dtype)."""

import mlx.core as mx
import pytest

from mesp_mlx.ops import matmul
from mesp_mlx.ops.matmul import mm

SHAPES = [((1, 2, 96, 16), (1, 2, 16, 40)), ((7, 64), (64, 8)), ((3, 5, 8), (8, 48))]


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("sa,sb", SHAPES)
def test_mm_equals_plain_product(sa, sb, dtype):
    k = mx.random.split(mx.random.key(0), 2)
    a = mx.random.normal(sa, key=k[0]).astype(dtype)
    b = mx.random.normal(sb, key=k[1]).astype(dtype)
    got, ref = mm(a, b), a @ b
    assert got.dtype == ref.dtype and got.shape == ref.shape
    # fp32 sums in another order (another BLAS) may round one element to its neighbour
    ulp = {mx.bfloat16: 2.0**-7, mx.float16: 2.0**-10, mx.float32: 1e-6}[dtype]
    scale = mx.abs(ref.astype(mx.float32)).max().item()
    err = mx.abs(got.astype(mx.float32) - ref.astype(mx.float32)).max().item()
    assert err <= ulp * scale, f"max err {err:.3g} of {scale:.3g}"
    exact = mx.array_equal(got, ref).item()
    mismatched = (got != ref).sum().item()
    assert exact or mismatched <= max(1, got.size // 1000), mismatched


def test_mixed_dtypes_promote_as_plain_matmul():
    a = mx.ones((4, 8), mx.bfloat16)
    b = mx.ones((8, 3), mx.float32)
    assert mm(a, b).dtype == mx.float32 and mm(b.T, a.T).dtype == mx.float32


def test_fp32_path_only_on_cpu(monkeypatch):
    assert matmul.fp32_products() == (mx.default_device() == mx.cpu)
    a = mx.random.normal((4, 8), key=mx.random.key(1)).astype(mx.bfloat16)
    monkeypatch.setattr(matmul, "fp32_products", lambda: False)      # as on Metal
    got = mm(a, a.T)
    assert got.dtype == mx.bfloat16 and mx.array_equal(got, a @ a.T).item()
