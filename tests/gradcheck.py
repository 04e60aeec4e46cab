"""Shared helpers for the op tests: seeded inputs, reference VJPs, comparison.

`assert_close` checks shape, then dtype, then values with a per-dtype rule:
  fp32       max |got - ref| <= rtol · max(max |ref|, floor)   (rtol = 1e-5 unless a test says why)
             floor: `assert_all_close` gives the tensors of one op's gradient a shared
             floor of 0.1 × the largest reference among them, so a reference that is
             exactly 0 (dq, dk at T = 1) is held to the rounding noise of its siblings
             (which differs between BLAS libraries), never to a bound of 0.
  bf16/fp16  cosine(got, ref) >= 0.999; a reference at its siblings' noise level
             (max |ref| <= 2⁻⁸ · floor, e.g. exactly 0) has no direction to compare, so
             it is held to max |got - ref| <= 2⁻⁸ · floor instead.
On failure the message names the tensor and gives max and mean abs error.
"""

import mlx.core as mx
import numpy as np

RTOL_FP32 = 1e-5
MIN_COSINE = {mx.bfloat16: 0.999, mx.float16: 0.999}
LOW_BITS = 2.0 ** -8            # bf16 rounding step, relative


class Rng:
    """Deterministic array factory: each call draws from the next split key."""

    def __init__(self, seed: int = 0):
        self.key = mx.random.key(seed)

    def _next(self):
        self.key, k = mx.random.split(self.key)
        return k

    def normal(self, shape, dtype=mx.float32, std=1.0):
        return (std * mx.random.normal(shape, key=self._next())).astype(dtype)

    def uniform(self, shape, lo=0.0, hi=1.0, dtype=mx.float32):
        return mx.random.uniform(lo, hi, shape, key=self._next()).astype(dtype)

    def randint(self, lo, hi, shape):
        return mx.random.randint(lo, hi, shape, key=self._next())

    def dropout_multiplier(self, shape, p=0.25, dtype=mx.float32):
        """m = mask / (1 - p), like LoRALinear.drop_multiplier."""
        keep = mx.random.bernoulli(1.0 - p, shape, key=self._next())
        return keep.astype(dtype) / (1.0 - p)


def ref_vjp(fn, primals, cotangent):
    """Gradients of `fn(*primals)` w.r.t. every primal, for one cotangent."""
    out, grads = mx.vjp(fn, list(primals), [cotangent])
    return out[0], grads


def _stats(got: np.ndarray, ref: np.ndarray):
    err = np.abs(got - ref)
    return float(err.max(initial=0.0)), float(err.mean()) if err.size else 0.0


def assert_close(name, got, ref, rtol=RTOL_FP32, min_cos=None, floor=0.0):
    """Shape, dtype, then values of `got` against `ref` (see module docstring)."""
    assert got is not None, f"{name}: got None"
    assert tuple(got.shape) == tuple(ref.shape), \
        f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype} != reference {ref.dtype}"
    g = np.array(got.astype(mx.float32), dtype=np.float64)
    r = np.array(ref.astype(mx.float32), dtype=np.float64)
    assert np.isfinite(g).all(), f"{name}: non-finite values in result"
    assert np.isfinite(r).all(), f"{name}: non-finite values in reference"
    max_err, mean_err = _stats(g, r)
    if got.dtype in MIN_COSINE:
        if float(np.abs(r).max(initial=0.0)) <= LOW_BITS * floor:
            assert max_err <= LOW_BITS * floor, (
                f"{name} ({got.dtype}): reference at noise level, max abs err "
                f"{max_err:.3e} > 2^-8 * floor = {LOW_BITS * floor:.3e}")
            return
        cos_min = MIN_COSINE[got.dtype] if min_cos is None else min_cos
        denom = np.linalg.norm(g) * np.linalg.norm(r)
        cos = float((g.ravel() @ r.ravel()) / denom) if denom > 0 else float(
            np.array_equal(g, r))
        assert cos >= cos_min, (f"{name} ({got.dtype}): cosine {cos:.6f} < {cos_min}; "
                                f"max abs err {max_err:.3e}, mean abs err {mean_err:.3e}")
        return
    scale = max(float(np.abs(r).max(initial=0.0)), floor)
    bound = rtol * scale
    assert scale > 0, f"{name}: reference and floor are 0: the check could not fail"
    assert max_err <= bound, (f"{name} ({got.dtype}): max abs err {max_err:.3e} > "
                              f"{rtol:g} * max(max|ref|, floor) = {bound:.3e}; "
                              f"mean abs err {mean_err:.3e}")


def assert_all_close(names, got, ref, **kw):
    """`assert_close` over parallel sequences of tensors."""
    assert len(got) == len(ref) == len(names), "tensor count mismatch"
    floor = 0.1 * max(float(mx.abs(b.astype(mx.float32)).max().item()) for b in ref)
    for n, a, b in zip(names, got, ref):
        assert_close(n, a, b, floor=floor, **kw)
