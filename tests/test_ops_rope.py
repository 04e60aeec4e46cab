"""RoPE: the plain Qwen2 form (rope/rope_backward) and the Rope table form of every
mlx-lm variant: backward vs mx.vjp of the reference; forward vs nn.RoPE and the
mlx-lm modules built by rope_utils."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.rope_utils import SuScaledRoPE, initialize_rope
from mlx_lm.models.smollm3 import NoPE

from gradcheck import Rng, assert_close, ref_vjp
from mesp_mlx.ops.rope import (Rope, rope, rope_apply, rope_apply_at, rope_apply_at_backward,
                               rope_apply_backward, rope_apply_ref, rope_backward,
                               rope_from_module, rope_ref)

HD = 32
DTYPES = [mx.float32, mx.bfloat16]


def _rtol(max_pos):
    """fp32 tolerance for rotations up to position `max_pos`.

    Two fp32 implementations may round the angle θ = p·ω differently by a few ulps
    (≈ p·2⁻²⁴ rad each), which moves outputs by that much relative to |x|: at
    position 1000 that is ~6e-5 rad, above the default 1e-5. Small positions keep 1e-5.
    """
    return max(1e-5, 4 * max_pos * 2.0 ** -24)


def _case(T, dtype=mx.float32, seed=0):
    rng = Rng(seed)
    return rng.normal((2, 3, T, HD), dtype), rng.normal((2, 3, T, HD), dtype)


@pytest.mark.parametrize("T", [1, 7, 37])
@pytest.mark.parametrize("offset", [0, 5, 1000])
@pytest.mark.parametrize("base", [10000.0, 1e6])
def test_forward_and_backward(T, offset, base):
    x, dy = _case(T)
    tol = _rtol(offset + T)
    y_ref, (dx_ref,) = ref_vjp(lambda x: rope_ref(x, HD, base, offset), (x,), dy)
    assert_close("y", rope(x, HD, base, offset), y_ref, rtol=tol)
    assert_close("y (nn.RoPE)", nn.RoPE(HD, traditional=False, base=base)(x, offset=offset),
                 y_ref, rtol=tol)
    assert_close("y (initialize_rope)", initialize_rope(HD, base, False)(x, offset=offset),
                 y_ref, rtol=tol)
    assert_close("dx", rope_backward(dy, HD, base, offset), dx_ref, rtol=tol)


@pytest.mark.parametrize("dims", [8, 16])
def test_partial_rotary_dims(dims):
    """dims < head dim: only the first `dims` features rotate, the rest pass through."""
    x, dy = _case(7)
    y_ref, (dx_ref,) = ref_vjp(lambda x: rope_ref(x, dims, 1e4, 3), (x,), dy)
    assert_close("y", rope(x, dims, 1e4, 3), y_ref)
    assert_close("y (nn.RoPE)", nn.RoPE(dims, traditional=False, base=1e4)(x, offset=3), y_ref)
    assert_close("dx", rope_backward(dy, dims, 1e4, 3), dx_ref)


def test_offset_matters():
    """Guards against a backward that ignores the offset."""
    x, dy = _case(7)
    a, b = rope_backward(dy, HD, 1e4, 0), rope_backward(dy, HD, 1e4, 9)
    assert mx.abs(a - b).max().item() > 1e-2


def test_bf16_matches_fp32_truth():
    x, dy = _case(37, mx.bfloat16)
    y_ref, (dx_ref,) = ref_vjp(lambda x: rope_ref(x, HD, 1e6, 4), (x.astype(mx.float32),),
                               dy.astype(mx.float32))
    assert_close("y", rope(x, HD, 1e6, 4), y_ref.astype(mx.bfloat16))
    assert_close("dx", rope_backward(dy, HD, 1e6, 4), dx_ref.astype(mx.bfloat16))


def _rope_modules():
    llama3 = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                  high_freq_factor=4.0, original_max_position_embeddings=8192)
    yarn = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                mscale=1.0, mscale_all_dim=0.5)
    return {
        "plain": nn.RoPE(16, base=10000.0),
        "traditional": nn.RoPE(16, traditional=True, base=500.0),
        "linear": initialize_rope(16, 10000.0, False, dict(rope_type="linear", factor=8.0)),
        "llama3": initialize_rope(16, 500000.0, False, llama3, 131072),
        "llama3-traditional": initialize_rope(16, 500000.0, True, llama3, 131072),
        "yarn": initialize_rope(16, 10000.0, False, yarn, 256),
        "longrope-partial": SuScaledRoPE(8, 10000.0, 1024, 64, [1.0, 1.2, 1.4, 1.6],
                                         [1.0, 2.0, 3.0, 4.0]),
        "dynamic": initialize_rope(16, 10000.0, False, dict(rope_type="dynamic", factor=2.0),
                                   32),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(_rope_modules()))
def test_rope_variants(name, dtype):
    mod = _rope_modules()[name]
    spec = rope_from_module(mod)
    rng = Rng(5)
    x, dy = rng.normal((2, 3, 11, 16), dtype), rng.normal((2, 3, 11, 16), dtype)
    assert mx.array_equal(rope_apply(x, spec), mod(x)).item(), "differs from the module"
    y, (dx,) = ref_vjp(lambda x: rope_apply_ref(x, spec), (x,), dy)
    assert_close("y", rope_apply(x, spec), y)
    assert_close("dx", rope_apply_backward(dy, spec), dx)


@pytest.mark.parametrize("name", ["plain", "traditional", "llama3", "yarn", "longrope-partial"])
def test_rope_offset_is_a_token_chunk(name):
    """Rows t0…t1 of the full rotation (and of its backward) = the chunk at offset t0."""
    spec = rope_from_module(_rope_modules()[name])
    rng = Rng(6)
    x, dy = rng.normal((1, 2, 13, 16)), rng.normal((1, 2, 13, 16))
    t0, t1 = 5, 11
    full, back = rope_apply(x, spec), rope_apply_backward(dy, spec)
    assert_close("y chunk", rope_apply(x[:, :, t0:t1], spec, t0), full[:, :, t0:t1])
    assert_close("dx chunk", rope_apply_backward(dy[:, :, t0:t1], spec, t0),
                 back[:, :, t0:t1])
    y, (dx,) = ref_vjp(lambda x: rope_apply_ref(x, spec, t0), (x[:, :, t0:t1],),
                       dy[:, :, t0:t1])
    assert_close("y ref", rope_apply(x[:, :, t0:t1], spec, t0), y)
    assert_close("dx ref", rope_apply_backward(dy[:, :, t0:t1], spec, t0), dx)
    with pytest.raises(AssertionError):          # the offset matters
        assert_close("no offset", rope_apply(x[:, :, t0:t1], spec), full[:, :, t0:t1])


def test_rope_spec_fields():
    m = _rope_modules()
    assert rope_from_module(m["longrope-partial"]).mscale > 1.0      # _scale != 1
    assert rope_from_module(m["yarn"]).mscale != 1.0
    assert rope_from_module(m["linear"]).scale == 1 / 8
    assert rope_from_module(m["dynamic"]).max_positions == 32
    assert rope_from_module(NoPE()) is None
    assert rope_from_module(m["llama3"]) == rope_from_module(m["llama3"])
    assert rope_from_module(m["llama3"]) != rope_from_module(m["yarn"])
    assert len({rope_from_module(m["plain"]), Rope(16, base=10000.0)}) == 1

    class Odd(nn.Module):
        pass
    with pytest.raises(ValueError, match="Odd.*autodiff"):
        rope_from_module(Odd())
    with pytest.raises(ValueError, match="positions"):
        rope_apply(mx.zeros((1, 1, 9, 4)), Rope(4, base=10.0, max_positions=8))
    with pytest.raises(ValueError, match="positions"):
        rope_apply(mx.zeros((1, 1, 4, 4)), Rope(4, base=10.0, max_positions=8), offset=5)


# ---------------------------------------------------------------- per-token positions
ROWS = [[0, 4, 9, 13], [0, 13]]          # segment starts of two packed rows of 13 tokens


def _positions(rows, T):
    return mx.array([[t - max(a for a in starts if a <= t) for t in range(T)]
                     for starts in rows], dtype=mx.int32)


def _segmented_ref(x, spec, rows):
    """Each segment of each row rotated on its own from position 0 (rope_apply_ref)."""
    T = x.shape[2]
    out = []
    for b, starts in enumerate(rows):
        bounds = list(zip(starts, starts[1:] + [T]))
        out.append(mx.concatenate([rope_apply_ref(x[b:b + 1, :, a:e], spec)
                                   for a, e in bounds if e > a], axis=2))
    return mx.concatenate(out, axis=0)


@pytest.mark.parametrize("name", ["plain", "traditional", "linear", "llama3",
                                  "llama3-traditional", "yarn", "longrope-partial"])
def test_rope_at_positions_restarts_per_segment(name):
    """rope_apply_at = each packed segment rotated alone from 0 (forward), and its
    backward = mx.vjp of that reference; = rope_apply itself for positions arange."""
    spec = rope_from_module(_rope_modules()[name])
    rng = Rng(7)
    x, dy = rng.normal((2, 3, 13, 16)), rng.normal((2, 3, 13, 16))
    pos = _positions(ROWS, 13)
    y, (dx,) = ref_vjp(lambda x: _segmented_ref(x, spec, ROWS), (x,), dy)
    assert_close("y", rope_apply_at(x, spec, pos), y)
    assert_close("dx", rope_apply_at_backward(dy, spec, pos), dx)
    _, (dx_auto,) = ref_vjp(lambda x: rope_apply_at(x, spec, pos), (x,), dy)
    assert_close("dx (vjp of rope_apply_at)", rope_apply_at_backward(dy, spec, pos), dx_auto)
    ar = mx.broadcast_to(mx.arange(5, 18, dtype=mx.int32), (2, 13))
    assert_close("y = rope_apply", rope_apply_at(x, spec, ar), rope_apply(x, spec, 5))
    assert_close("dx = rope_apply_backward", rope_apply_at_backward(dy, spec, ar),
                 rope_apply_backward(dy, spec, 5))
    with pytest.raises(AssertionError):          # the restart matters
        assert_close("no restart", rope_apply(x, spec), y)


def test_rope_at_bf16_and_dynamic_limit():
    spec = rope_from_module(_rope_modules()["plain"])
    rng = Rng(8)
    x = rng.normal((2, 3, 13, 16), mx.bfloat16)
    pos = _positions(ROWS, 13)
    y = rope_apply_at(x, spec, pos)
    assert y.dtype == mx.bfloat16
    assert_close("y bf16", y, _segmented_ref(x.astype(mx.float32), spec, ROWS)
                 .astype(mx.bfloat16))
    dyn = rope_from_module(_rope_modules()["dynamic"])        # exact up to 32 positions
    rope_apply_at(x, dyn, pos + 19)                            # max position 31: fine
    with pytest.raises(ValueError, match="positions"):
        rope_apply_at(x, dyn, pos + 20)
