"""Sequence packing: several examples in one row, each as if it ran alone.

Letters: B rows, T tokens; seg[b, t] the example index of position t in row b
(non-decreasing along t), pos[b, t] its position within that example.
  RoPE        θ_{b,t,i} = s · pos[b, t] / p_i      (every example starts at 0)
  attention   query i keeps key j  iff  j ≤ i, seg[i] = seg[j]  (and i − W < j)
Every other op of a block is position-wise, so with these two changes each
example's activations, loss terms and gradients are those of its unpacked run
(padding at the row tail is one more segment, masked out of the loss).
Stored: seg and pos ([B, T] int32 each), derived once per step by the schedule.
"""

from dataclasses import dataclass

import mlx.core as mx

from ..ops.attention import keep_mask


@dataclass(frozen=True)
class Packing:
    segments: mx.array     # [B, T] int32: example index per position
    positions: mx.array    # [B, T] int32: index within the example

    @classmethod
    def of(cls, segments: mx.array) -> "Packing":
        """Positions restart at 0 wherever the segment id changes."""
        seg = segments.astype(mx.int32)
        B, T = seg.shape
        t = mx.broadcast_to(mx.arange(T, dtype=mx.int32), (B, T))
        start = mx.concatenate([mx.ones((B, 1), mx.bool_), seg[:, 1:] != seg[:, :-1]],
                               axis=1)
        first = mx.cummax(mx.where(start, t, 0), axis=1)     # start of t's example
        pos = t - first
        mx.eval(seg, pos)
        return cls(seg, pos)

    def rows(self, t0: int, t1: int) -> mx.array:
        """Positions of the token chunk t0…t1, [B, t1 − t0] (RoPE of that chunk)."""
        return self.positions[:, t0:t1]

    def fused_mask(self, window=None):
        """Bool [B, 1, T, T] for mx.fast.scaled_dot_product_attention."""
        T = self.segments.shape[1]
        return keep_mask(0, T, 0, T, window, self.segments)[:, None]


def check_segments(segments, shape) -> None:
    """ValueError unless segments is an integer [B, T] array, non-decreasing per row."""
    if not isinstance(segments, mx.array):
        raise TypeError(f"segments must be an mx.array [B, T] of example ids, got a "
                        f"{type(segments).__name__}")
    if segments.shape != tuple(shape):
        raise ValueError(f"segments shape {segments.shape} != inputs shape {tuple(shape)}")
    if not mx.issubdtype(segments.dtype, mx.integer):
        raise TypeError(f"segments must hold integer example ids, got {segments.dtype}")
    if segments.shape[1] > 1 and not mx.all(segments[:, 1:] >= segments[:, :-1]).item():
        raise ValueError("segments must be non-decreasing along each row (one "
                         "contiguous run of positions per packed example)")
