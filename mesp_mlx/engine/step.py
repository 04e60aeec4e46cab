"""The engine: one training step's loss and exact LoRA gradients.

    loss, grads = value_and_grad(model, inputs, targets, mask, method)

method = "autodiff": plain MLX autodiff through the model (the reference).
         "mebp":     per-block checkpointing, each block re-run under mx.vjp.
         "mesp":     per-block recompute + hand-derived backward (ops/),
                     tensors freed block by block, chunked loss head.
         "mezo":     NOT exact: MeZO's zeroth-order estimate p·z along one
                     random direction (mezo.py), two forward passes.
loss = Σ CE(logits, targets) · mask / Σ mask, or Σ CE · w for given token weights
w [B, T] of any sign (unnormalised; or a function of the per-token CE giving them),
the building block of preference objectives (preference.py).
segments [B, T] (method "mesp"): rows packed with several examples, each run as
if alone (packing.py); the loss is the same token-weighted mean.
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .batch import check_batch, vocab_sizes
from .lora_layers import step_dropout
from .packing import check_segments
from .plan import EngineOptions
from . import mezo
from .backprop import run
from .stream import is_streamed

METHODS = ("autodiff", "mebp", "mesp", "mezo")


def masked_ce(logits, targets, mask):
    """Σ CE · mask / Σ mask with logits [B, T, V] (reference loss)."""
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets)
    mask = mask.astype(mx.float32)
    return (ce * mask).sum() / mx.maximum(mask.sum(), 1.0)


def _check(model, inputs, targets, mask, method):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; supported: {', '.join(METHODS)}")
    return check_batch(inputs, targets, mask, vocab_sizes(model))


def value_and_grad(model, inputs, targets, mask=None, method="mesp", *,
                   options: Optional[EngineOptions] = None, stats: Optional[dict] = None,
                   segments=None, weights=None):
    """Loss and gradients w.r.t. model.trainable_parameters() (same tree).

    options: schedule knobs (chunk sizes, cache policy); stats: if a dict is
    given, the schedule records what it stored (e.g. "checkpoint_bytes").
    segments: [B, T] example ids of packed rows, non-decreasing per row (mesp).
    weights: [B, T] token weights, loss Σ CE · w (in place of mask), or a function
    of the per-token CE [B, T] (fp32) returning them.
    method="mezo" returns MeZO's random estimate (mezo.value_and_grad), not ∇L.
    """
    _check_weights(weights, mask, inputs, method)
    mask = _check(model, inputs, targets, mask, method)
    if segments is not None:
        if method != "mesp":
            raise ValueError(f"packed rows (segments) are supported by method 'mesp' "
                             f"only, got {method!r}: unpack the batch or use mesp")
        check_segments(segments, inputs.shape)
    if method == "mezo":                # an estimate, seed from MLX's global RNG
        return mezo.value_and_grad(model, inputs, targets, mask, options=options,
                                   stats=stats)
    step_dropout(model)
    if method == "autodiff":
        if is_streamed(model):
            raise ValueError("a model with streamed weights (--stream-weights) runs "
                             "with method mesp, mebp or mezo; autodiff needs every "
                             "weight resident")
        return _autodiff(model, inputs, targets, mask, weights)
    return run(model, inputs, targets, mask, method, options, stats, segments, weights)


def _check_weights(weights, mask, inputs, method):
    if weights is None:
        return
    if mask is not None:
        raise ValueError("pass mask or weights, not both: token weights replace the "
                         "masked mean (a position with weight 0 is no target)")
    if method == "mezo":
        raise ValueError("method 'mezo' estimates the gradient of the masked mean "
                         "loss only; token weights need an exact method (mesp, mebp, "
                         "autodiff)")
    if not callable(weights) and (not isinstance(weights, mx.array)
                                  or weights.shape != inputs.shape):
        raise ValueError(f"weights must be an mx.array of the inputs' shape "
                         f"{inputs.shape} (or a function of the per-token loss), got "
                         f"{getattr(weights, 'shape', type(weights).__name__)}")


def _autodiff(model, inputs, targets, mask, weights=None):
    if callable(weights):               # the weights of this forward's per-token CE
        ce = nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets)
        weights = mx.stop_gradient(weights(ce).astype(mx.float32))
        del ce

    def loss_fn(model):
        if weights is None:
            return masked_ce(model(inputs), targets, mask)
        ce = nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets)
        return (ce * weights).sum()

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    mx.eval(loss, grads)
    return loss, grads
