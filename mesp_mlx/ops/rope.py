"""Rotary position embedding from a frequency table: every mlx-lm variant.

Letters: B batch, H heads, T tokens, hd head dim; d ≤ hd rotated features.
  forward   y[..., :d] = R_θ(m · x[..., :d]),   y[..., d:] = x[..., d:]
            θ_{t,i} = s · t / p_i,  p_i = base^(2i/d) (plain) or a table (Llama 3,
            YaRN, LongRoPE); pairs (x_i, x_{i+d/2}), or interleaved when traditional
  backward  the rotation is orthogonal: dx[..., :d] = m · R_{−θ}(dy[..., :d]) — the same
            kernel with negated periods; dx[..., d:] = dy[..., d:]
Stored: nothing (the rotation depends only on positions).
Packed rows (packing.py) need a position per token, pos [B, T]: mx.fast.rope
takes one scalar offset, so `rope_apply_at` writes the same rotation out with
cos/sin of θ_{b,t,i} = s · pos[b, t] / p_i ([B, 1, T, d/2], one table per call),
and `rope_apply_at_backward` rotates by −θ (sin negated) and multiplies by m.
Module → Rope: nn.RoPE (dims, traditional, base, scale);
Llama3RoPE (dims, traditional, _freqs); YarnRoPE (+ mscale); SuScaledRoPE (dim,
_freqs, _scale); ProportionalRoPE (dims, traditional, _freqs: the unrotated pairs'
periods are ∞, θ = 0); DynamicNTKScalingRoPE = plain while T ≤ max_positions; NoPE: none.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn


@dataclass(frozen=True, eq=False)
class Rope:
    dims: int
    traditional: bool = False
    base: Optional[float] = None          # plain: p_i = base^(2i/dims)
    freqs: Optional[mx.array] = None      # else a table of periods p_i
    scale: float = 1.0                    # s: position scale (linear RoPE: 1/factor)
    mscale: float = 1.0                   # m: multiplies x[..., :dims] first
    max_positions: Optional[int] = None   # exact only up to this T (dynamic NTK)

    def _key(self):
        return (self.dims, self.traditional, self.base, self.scale, self.mscale,
                self.max_positions)

    def __eq__(self, other):            # the table compared by value (a field-wise
        if not isinstance(other, Rope):  # dataclass == would call bool() on an array)
            return NotImplemented
        if self._key() != other._key() or (self.freqs is None) != (other.freqs is None):
            return False
        return self.freqs is None or bool(mx.array_equal(self.freqs, other.freqs))

    def __hash__(self):
        return hash((self._key(), self.freqs is None))

    def periods(self):
        if self.freqs is not None:
            return self.freqs
        return self.base ** (mx.arange(0, self.dims, 2, dtype=mx.float32) / self.dims)


def _premul(x, spec):
    return x if spec.mscale == 1.0 else x.at[..., :spec.dims].multiply(spec.mscale)


def rope_apply(x, spec: Rope, offset: int = 0):
    """x: [B, H, T, hd] at positions offset … offset + T − 1 (a token chunk)."""
    _check_T(x, spec, offset)
    return mx.fast.rope(_premul(x, spec), spec.dims, traditional=spec.traditional,
                        base=spec.base if spec.freqs is None else None, scale=spec.scale,
                        offset=offset, freqs=spec.freqs)


def rope_apply_backward(dy, spec: Rope, offset: int = 0):
    dx = mx.fast.rope(dy, spec.dims, traditional=spec.traditional, base=None,
                      scale=spec.scale, offset=offset, freqs=-spec.periods())
    return _premul(dx, spec)


def _cos_sin(spec: Rope, pos, dtype):
    """cos θ, sin θ with θ = s · pos / p_i; pos [..., T] -> [..., T, d/2]."""
    theta = spec.scale * pos.astype(mx.float32)[..., None] / spec.periods()
    return mx.cos(theta).astype(dtype), mx.sin(theta).astype(dtype)


def _rotate(xr, cos, sin, traditional):
    """R_θ on the rotated features xr [..., T, d] (pairs half-split or interleaved)."""
    d = xr.shape[-1]
    if traditional:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        y = mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
        return y.reshape(*xr.shape)
    x1, x2 = xr[..., :d // 2], xr[..., d // 2:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def rope_apply_at(x, spec: Rope, positions):
    """x: [B, H, T, hd] with token t of row b at positions[b, t] ([B, T] ints)."""
    _check_max(spec, positions)
    cos, sin = _cos_sin(spec, positions[:, None], x.dtype)        # [B, 1, T, d/2]
    d = spec.dims
    y = _rotate(x[..., :d] * spec.mscale, cos, sin, spec.traditional)
    return mx.concatenate([y, x[..., d:]], axis=-1) if d < x.shape[-1] else y


def rope_apply_at_backward(dy, spec: Rope, positions):
    """dx = m · R_{−θ}(dy) on the rotated features, dy elsewhere."""
    cos, sin = _cos_sin(spec, positions[:, None], dy.dtype)
    d = spec.dims
    dx = _rotate(dy[..., :d], cos, -sin, spec.traditional) * spec.mscale
    return mx.concatenate([dx, dy[..., d:]], axis=-1) if d < dy.shape[-1] else dx


def rope_apply_ref(x, spec: Rope, offset: int = 0):
    """Written out with cos/sin (half-split or interleaved pairs, partial dims)."""
    T, d = x.shape[-2], spec.dims
    pos = mx.arange(offset, offset + T, dtype=mx.float32)[:, None]
    theta = spec.scale * pos / spec.periods()
    cos, sin = mx.cos(theta).astype(x.dtype), mx.sin(theta).astype(x.dtype)
    xr, rest = x[..., :d] * spec.mscale, x[..., d:]
    if spec.traditional:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        y = mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
        y = y.reshape(*xr.shape)
    else:
        x1, x2 = xr[..., :d // 2], xr[..., d // 2:]
        y = mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return mx.concatenate([y, rest], axis=-1)


def _check_T(x, spec, offset=0):
    _check_len(spec, offset + x.shape[-2])


def _check_len(spec, T):
    if spec.max_positions is not None and T > spec.max_positions:
        raise ValueError(f"dynamic NTK RoPE rescales beyond {spec.max_positions} "
                         f"positions (got {T}): use method='autodiff'")


def _check_max(spec, positions):
    if spec.max_positions is not None:        # one reduction, only for dynamic NTK
        _check_len(spec, int(positions.max().item()) + 1)


def rope_from_module(m) -> Optional[Rope]:
    """Rope of an mlx-lm RoPE module (None: no rotation); ValueError if unknown."""
    name = type(m).__name__
    if isinstance(m, nn.RoPE):
        return Rope(m.dims, m.traditional, base=m.base, scale=m.scale)
    if name == "Llama3RoPE":
        return Rope(m.dims, m.traditional, freqs=m._freqs)
    if name == "YarnRoPE":
        return Rope(m.dims, m.traditional, freqs=m._freqs, mscale=m.mscale)
    if name == "ProportionalRoPE":          # gemma4: partial rotation as infinite periods
        return Rope(m.dims, m.traditional, freqs=m._freqs)
    if name == "SuScaledRoPE":
        return Rope(m.dim, False, freqs=m._freqs, mscale=m._scale)
    if name == "DynamicNTKScalingRoPE":
        return Rope(m.dims, m.traditional, base=m.base,
                    max_positions=m.max_position_embeddings)
    if name == "NoPE":
        return None
    raise ValueError(f"RoPE variant {name} is not supported by the per-block engine; "
                     "use method='autodiff'")


# Qwen2-style plain RoPE (traditional=False), kept for existing callers and tests
def rope(x, dims, base, offset=0):
    return mx.fast.rope(x, dims, traditional=False, base=base, scale=1.0, offset=offset)


def _neg_periods(dims, base):
    # mx.fast.rope's `freqs` are periods: θ = t / freqs. Negative → R(−θ).
    return -(base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))


def rope_backward(dy, dims, base, offset=0):
    return mx.fast.rope(dy, dims, traditional=False, base=None, scale=1.0,
                        offset=offset, freqs=_neg_periods(dims, base))


def rope_ref(x, dims, base, offset=0):
    T = x.shape[-2]
    half = dims // 2
    inv = base ** (-mx.arange(0, half, dtype=mx.float32) * 2 / dims)       # (dims/2,)
    theta = (mx.arange(T, dtype=mx.float32)[:, None] + offset) * inv     # (T, dims/2)
    cos, sin = mx.cos(theta).astype(x.dtype), mx.sin(theta).astype(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:dims], x[..., dims:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], axis=-1)
