"""x W0ᵀ and g W0 for a quantized W0 by dequantized row tiles and a dense matmul.

Letters: T tokens (any leading dims), d_in, d_out, n rows per tile.
  x W0ᵀ = [x Ŵ₀ᵀ | x Ŵ₁ᵀ | …]       Ŵⱼ = dequantize(W0[jn:(j+1)n]): (n, d_in) fp32
  g W0  = Σⱼ g[:, jn:(j+1)n] Ŵⱼ
W0 is never dense in full, but in one lazy graph MLX's CPU backend allocates the
outputs of many queued ops ahead of their inputs' release, so tile j is made to
depend on product j−1 via `mx.depends`. Inside `tile_barriers()` (the per-block
schedules, outside any transform) each tile's product is also evaluated before the
next tile is dequantized, which bounds the working set by about one tile.
Elsewhere (autodiff, mebp, mx.compile) only the ordering applies: barriers inside a
transform keep every tile alive for the backward, far worse than none.
Why: on MLX's CPU backend `mx.quantized_matmul` runs at a small fraction of a dense
fp32 matmul's rate, so dequantizing a tile and multiplying densely is faster by an
order of magnitude (docs/how-it-works.md). Metal keeps `mx.quantized_matmul`
(frozen.py chooses; `quantized_path()` says which ran).
The matmul runs in fp32 and each tile's result is cast to x's dtype.
"""

from contextlib import contextmanager
from functools import lru_cache

import mlx.core as mx

ROW_TILE_BYTES = 2 << 20        # one dense fp32 tile of W0 (585 rows at d_in 896)
_BARRIERS = [False]


@contextmanager
def tile_barriers():
    """Evaluate each tile's product before the next tile (never inside transforms)."""
    prev, _BARRIERS[0] = _BARRIERS[0], True
    try:
        yield
    finally:
        _BARRIERS[0] = prev


def _done(part):
    if _BARRIERS[0]:
        mx.eval(part)
    return part


def barrier(*arrays):
    """Evaluate `arrays` now inside `tile_barriers()` (so that the temporaries they
    were made from can go), else nothing."""
    if _BARRIERS[0]:
        mx.eval(*arrays)


def tile_rows(d_in: int) -> int:
    return max(1, ROW_TILE_BYTES // (4 * d_in))


@lru_cache(maxsize=None)
def _unpacker(group_size: int, bits: int):
    """Compiled affine dequantize: q = (w >> shift) & mask, Ŵ = q·s + b in the scales'
    dtype, then fp32. The same values as mx.dequantize(..., dtype=float32) (which also
    computes in the scales' dtype; tested bit for bit), in one compiled kernel
    instead of several passes over the tile."""
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)

    def unpack(wt, s, b):
        n, packed = wt.shape
        q = (wt[..., None] >> shifts) & ((1 << bits) - 1)   # (n, packed, 32/bits)
        q = q.reshape(n, -1, group_size).astype(s.dtype)    # (n, d_in/group, group)
        return (q * s[..., None] + b[..., None]).astype(mx.float32).reshape(n, -1)
    return mx.compile(unpack)


def dequant_rows(w, scales, biases, r0, r1, group_size, bits, mode, after=None):
    """Rows r0…r1 of W0 dense in fp32, computed only once `after` has been."""
    wt = w[r0:r1] if after is None else mx.depends(w[r0:r1], after)
    s, b = scales[r0:r1], None if biases is None else biases[r0:r1]
    if mode == "affine" and b is not None and 32 % bits == 0:
        return _unpacker(group_size, bits)(wt, s, b)
    return mx.dequantize(wt, s, b, group_size=group_size, bits=bits, mode=mode,
                         dtype=mx.float32)


def xWt_tiles(x, w, scales, biases, group_size=64, bits=4, mode="affine"):
    """x W0ᵀ: (..., d_in) -> (..., d_out), W0 packed (d_out, d_in·bits/32)."""
    d_out, d_in = w.shape[0], w.shape[1] * 32 // bits
    n, xf, parts = tile_rows(d_in), x.astype(mx.float32), []
    for r0 in range(0, d_out, n):
        Wt = dequant_rows(w, scales, biases, r0, min(d_out, r0 + n), group_size, bits,
                          mode, parts[-1] if parts else None)
        parts.append(_done((xf @ Wt.T).astype(x.dtype)))     # cast per tile: same values
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def gW_tiles(g, w, scales, biases, group_size=64, bits=4, mode="affine"):
    """g W0: (..., d_out) -> (..., d_in)."""
    d_out, d_in = w.shape[0], w.shape[1] * 32 // bits
    n, dx = tile_rows(d_in), None
    for r0 in range(0, d_out, n):
        r1 = min(d_out, r0 + n)
        Wt = dequant_rows(w, scales, biases, r0, r1, group_size, bits, mode, dx)
        part = g[..., r0:r1].astype(mx.float32) @ Wt
        dx = _done(part if dx is None else dx + part)
    return dx.astype(g.dtype)
