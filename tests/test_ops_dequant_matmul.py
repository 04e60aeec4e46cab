"""Dequantized row tiles + dense matmul == mx.quantized_matmul (both products), and
the device dispatch of FrozenWeight (frozen.quantized_path)."""

import mlx.core as mx
import pytest

from mesp_mlx.ops import dequant_matmul as dm
from mesp_mlx.ops import frozen
from mesp_mlx.ops.frozen import FrozenWeight


@pytest.mark.parametrize("bits,group,dtype", [(4, 64, mx.float32), (8, 32, mx.float32),
                                              (4, 64, mx.bfloat16)])
@pytest.mark.parametrize("tile_bytes", [4 << 20, 4 * 128 * 7])    # one tile / 7-row tiles
def test_tiles_equal_quantized_matmul(bits, group, dtype, tile_bytes, monkeypatch):
    monkeypatch.setattr(dm, "ROW_TILE_BYTES", tile_bytes)
    k = mx.random.split(mx.random.key(0), 3)
    W = mx.random.normal((40, 128), key=k[0]).astype(dtype)
    w, s, b = mx.quantize(W, group_size=group, bits=bits)
    x = mx.random.normal((2, 5, 128), key=k[1]).astype(dtype)
    g = mx.random.normal((2, 5, 40), key=k[2]).astype(dtype)
    kw = dict(group_size=group, bits=bits)
    for got, ref in ((dm.xWt_tiles(x, w, s, b, group, bits),
                      mx.quantized_matmul(x, w, s, b, transpose=True, **kw)),
                     (dm.gW_tiles(g, w, s, b, group, bits),
                      mx.quantized_matmul(g, w, s, b, transpose=False, **kw))):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        err = mx.abs(got.astype(mx.float32) - ref.astype(mx.float32)).max().item()
        scale = mx.abs(ref.astype(mx.float32)).max().item()
        tol = 1e-5 if dtype == mx.float32 else 2e-2
        assert err <= tol * scale, f"max err {err:.3g} of {scale:.3g}"


def test_dispatch_by_device_and_forced():
    expected = "dequant_tiles" if mx.default_device() == mx.cpu else "quantized_matmul"
    assert frozen.quantized_path() == expected
    W = mx.random.normal((16, 64), key=mx.random.key(3))
    F = FrozenWeight(*mx.quantize(W, group_size=32, bits=4), group_size=32, bits=4)
    x = mx.random.normal((3, 64), key=mx.random.key(4))
    try:
        outs = {}
        for p in ("quantized_matmul", "dequant_tiles"):
            frozen.set_quantized_path(p)
            assert frozen.quantized_path() == p
            outs[p] = F.xWt(x)
        assert mx.allclose(outs["quantized_matmul"], outs["dequant_tiles"], atol=1e-5).item()
        with pytest.raises(ValueError, match="quantized path"):
            frozen.set_quantized_path("fast")
    finally:
        frozen.set_quantized_path("auto")


@pytest.mark.parametrize("sdtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("bits,group", [(2, 32), (4, 64), (4, 128), (8, 32), (8, 64)])
def test_compiled_unpack_equals_dequantize_bit_for_bit(bits, group, sdtype):
    W = (3 * mx.random.normal((37, 256), key=mx.random.key(bits + group))).astype(sdtype)
    w, s, b = mx.quantize(W, group_size=group, bits=bits)
    ref = mx.dequantize(w, s, b, group_size=group, bits=bits, dtype=mx.float32)
    got = dm.dequant_rows(w, s, b, 0, 37, group, bits, "affine")
    assert got.dtype == mx.float32 and got.shape == ref.shape
    assert mx.array_equal(got, ref).item(), mx.abs(got - ref).max().item()
    part = dm.dequant_rows(w, s, b, 5, 19, group, bits, "affine")        # a row tile
    assert mx.array_equal(part, ref[5:19]).item()


def test_other_modes_fall_back_to_dequantize():
    W = mx.random.normal((8, 64), key=mx.random.key(5))
    w, s, b = mx.quantize(W, group_size=64, bits=3)                   # 3 ∤ 32
    ref = mx.dequantize(w, s, b, group_size=64, bits=3, dtype=mx.float32)
    assert mx.array_equal(dm.dequant_rows(w, s, b, 0, 8, 64, 3, "affine"), ref).item()
