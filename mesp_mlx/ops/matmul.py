"""a @ b for the engine's activation products, with half-precision operands on the CPU
backend multiplied in fp32 and the result rounded once to the dtype of a @ b.

  mm(a, b) = round(fp32(a) @ fp32(b))   (CPU backend, a half operand; rounded to the
  mm(a, b) = a @ b                     dtype a @ b would have had) · otherwise, Metal
Why: MLX's CPU backend multiplies bf16 with a generic kernel that never reaches the
BLAS, several times slower than the fp32 product it could use. The values are those of the bf16
kernel (it also accumulates in fp32 and rounds once): bit-identical with MLX's
bundled BLAS, up to fp32 summation order with another BLAS. The fp32 copies of the
operands are transient; the attention tiles are already sized for fp32 scores.
"""

import mlx.core as mx

HALF = (mx.bfloat16, mx.float16)


def fp32_products() -> bool:
    """True where half-precision products go through fp32 (the CPU backend)."""
    return mx.default_device() == mx.cpu


def lift(a: mx.array) -> mx.array:
    """a as an fp32 operand where half products go through fp32, else a itself: one
    copy a caller can share between two products (lora_linear_backward)."""
    return a.astype(mx.float32) if a.dtype in HALF and fp32_products() else a


def mm(a: mx.array, b: mx.array, dtype=None) -> mx.array:
    """a @ b in `dtype` (default the product's own, mx.result_type(a, b)); on the CPU
    backend half operands are multiplied in fp32 and the result rounded once."""
    out = mx.result_type(a, b) if dtype is None else dtype
    if (a.dtype in HALF or b.dtype in HALF or out in HALF) and fp32_products():
        return (a.astype(mx.float32) @ b.astype(mx.float32)).astype(out)
    y = a @ b
    return y if y.dtype == out else y.astype(out)
