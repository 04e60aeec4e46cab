"""One training batch, and its validation before any method touches the model.

Every method indexes an embedding table with `inputs` and a [V, D] head with
`targets`. MLX does not bounds-check those gathers: an id ≥ V reads past the
table (NaN or negative losses, segfaults, heap corruption) and a negative
target wraps silently. One min/max reduction per array catches all of it.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx


@dataclass
class Batch:
    """Token ids and the loss mask of one step."""
    inputs: mx.array      # [B, T] int32
    targets: mx.array     # [B, T] int32
    mask: mx.array        # [B, T] float32, 1 where a real, trained target is
    n_tokens: int         # non-padding input positions (processed)
    n_targets: int        # mask.sum() (trained)
    segments: Optional[mx.array] = None   # [B, T] int32 example ids of packed rows


def _rows(module) -> Optional[int]:
    w = getattr(module, "weight", None) if module is not None else None
    return int(w.shape[0]) if isinstance(w, mx.array) and w.ndim == 2 else None


def vocab_sizes(model) -> Tuple[Optional[int], Optional[int]]:
    """(embedding rows, head rows) of an mlx-lm model: the bounds of input and
    target ids; None where the model has no recognisable table."""
    lm = model["language_model"] if isinstance(model, dict) and "language_model" in model \
        else model
    inner = getattr(lm, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    v_in = _rows(embed)
    v_out = _rows(lm["lm_head"]) if isinstance(lm, dict) and "lm_head" in lm else v_in
    return v_in, v_out


def _array(x, name):
    if not isinstance(x, mx.array):
        raise TypeError(f"{name} must be an mx.array of token ids with shape [B, T], got "
                        f"a {type(x).__name__}; wrap it: mx.array(ids, dtype=mx.int32)")
    return x


def _check_ids(name, lo, hi, vocab, what):
    if lo < 0:
        raise ValueError(f"{name} contain the id {lo}; ids must be >= 0 (to leave a "
                         "position out of the loss, set mask[b, t] = 0 instead of "
                         "using -1 or -100)")
    if vocab is not None and hi >= vocab:
        raise ValueError(f"{name} contain the id {hi}, but the model's {what} has "
                         f"{vocab} rows (valid ids 0..{vocab - 1}); the tokenizer and "
                         "the model do not match, or the ids are corrupt")


def check_batch(inputs, targets, mask=None, vocab=(None, None)):
    """Validate [B, T] integer inputs/targets (ids in range) and the mask;
    returns the mask (ones if None). vocab: vocab_sizes(model)."""
    _array(inputs, "inputs")
    _array(targets, "targets")
    if inputs.ndim != 2 or inputs.shape != targets.shape:
        raise ValueError(f"inputs and targets must both be [B, T] int arrays, got "
                         f"{inputs.shape} and {targets.shape}")
    if inputs.size == 0:
        raise ValueError(f"empty batch {inputs.shape}: need B >= 1 sequences of T >= 1 "
                         "tokens")
    for name, x in (("inputs", inputs), ("targets", targets)):
        if not mx.issubdtype(x.dtype, mx.integer):
            raise TypeError(f"{name} must hold integer token ids, got dtype {x.dtype}; "
                            f"use {name}.astype(mx.int32) if the values are whole ids")
    lo_in, hi_in, lo_t, hi_t = mx.stack([inputs.min(), inputs.max(), targets.min(),
                                        targets.max()]).tolist()
    _check_ids("inputs", lo_in, hi_in, vocab[0], "embedding table")
    _check_ids("targets", lo_t, hi_t, vocab[1], "output head")
    if mask is None:
        return mx.ones(inputs.shape, mx.float32)
    if not isinstance(mask, mx.array):
        raise TypeError(f"mask must be an mx.array [B, T] of 0/1, got a "
                        f"{type(mask).__name__}")
    if mask.shape != inputs.shape:
        raise ValueError(f"mask shape {mask.shape} != inputs shape {inputs.shape}")
    return mask
