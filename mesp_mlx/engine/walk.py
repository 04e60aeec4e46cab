"""The one forward walk over a model's blocks, shared by every per-block path.

    spec = model_spec(model, method, T, options)       # read + verified once
    h = walk(spec, spec.embed_ids(inputs), run)       # embedding -> blocks
    total = loss_sum(model, inputs, targets, mask)    # Σ CE · mask, forward only
    logp = row_logprobs(model, inputs, targets, mask) # Σ log p · mask per row [B]

`walk` runs blocks [start, stop) of a ModelSpec, each inside `weights.block(b)`
(streamed frozen weights are read just before a block runs and released after it)
and with an evaluation barrier after it, so at most one block's tensors are alive.
The backprop driver (backprop.py), MeZO's two forwards (mezo.py) and evaluation
all go through it; `run(i, b, h)` says what a block does (plain forward, forward
that keeps tensors, perturbed forward).
`loss_sum` ends with the tiled loss head (ops/loss_head.py), never the [N, V]
logits. A model the engine does not run (an autodiff-only family, or weights other
than LoRA left trainable) is evaluated through its own forward, one row and
`EVAL_ROWS` positions of logits at a time.
"""

from contextlib import nullcontext
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from ..ops.dequant_matmul import tile_barriers
from ..ops.loss_head import loss_head_value
from .block import block_forward, layer_mask
from .families import read_spec
from .links import StepLinks
from ..errors import UnsupportedModelError
from .plan import EngineOptions, head_tiles
from .stream import is_streamed, weight_source
from .verify import verify_spec

EVAL_ROWS = 512     # positions per logits chunk when evaluating through the model itself


def model_spec(model, method: str, T: int, opt: Optional[EngineOptions] = None):
    """The model's ModelSpec, checked against the model's own forward (once); with
    streamed weights, its head and embedding read the weights file."""
    opt = opt or EngineOptions()
    spec = read_spec(model)
    if spec.max_tokens is not None and T > spec.max_tokens[0]:
        raise UnsupportedModelError(
            f"{spec.family}: the per-block engines are exact up to {spec.max_tokens[0]} "
            f"tokens a row ({spec.max_tokens[1]}), got {T}; use method='autodiff' "
            "(--method autodiff)")
    weights = weight_source(model)
    if opt.verify:
        verify_spec(model, spec, method, T, opt, weights)
    return weights.spec(spec)


def walk(spec, h, run: Callable, weights=None, start: int = 0, stop: Optional[int] = None,
         around: Optional[Callable] = None):
    """h after blocks [start, stop): h = run(i, block, h) for each, inside the block's
    weights (and `around(i, block)`, a context manager, if given), evaluated."""
    stop = len(spec.blocks) if stop is None else stop
    for i in range(start, stop):
        b = spec.blocks[i]
        with (weights.block(b) if weights is not None else nullcontext()), \
                (around(i, b) if around is not None else nullcontext()):
            h = run(i, b, h)
            mx.eval(h)
    return h


def own_block(b, h, links=None):
    """The mlx-lm block itself on h (mebp's forward) with its cross-block inputs; a
    source of shared K, V hands them to `links`."""
    side, kv = (None, None) if links is None else (links.side, links.kv)
    out, kv_out = b.run(h, layer_mask(b, h.shape[1]), side, kv)
    if links is not None and links.export:
        links.put_kv(*kv_out)
    return out


def head_mean(spec, h, targets, mask, opt: EngineOptions, per_token=False) -> mx.array:
    """Σ CE · mask / Σ mask of the final hidden state h [B, T, D], tile by tile
    (per_token: the CE of each position [B·T], 0 where mask is 0)."""
    V, D = spec.head.shape
    rows, vocab = head_tiles(opt, targets.size, V)
    return loss_head_value(spec.norm(h.reshape(-1, D)), spec.head, targets.reshape(-1),
                           mask.reshape(-1).astype(mx.float32), rows, vocab,
                           softcap=spec.final_softcap, logit_scale=spec.logit_scale,
                           per_token=per_token)


def loss_sum(model, inputs, targets, mask, options: Optional[EngineOptions] = None) -> float:
    """Σ CE · mask over the batch, forward only (dropout as the model's mode says)."""
    opt = options or EngineOptions()
    try:
        spec = model_spec(model, "mesp", inputs.shape[1], opt)
    except ValueError:      # a family or a model state the engine does not run
        if is_streamed(model):
            raise
        return _own_forward_sum(model, inputs, targets, mask)
    with tile_barriers():               # outside any transform: evaluate per W0 tile
        h = spec.embed_ids(inputs)
        mx.eval(h)
        links = StepLinks(spec, inputs, h)
        h = walk(spec, h, lambda i, b, h: block_forward(b, h, opt,
                                                        links=links.forward(i, b)),
                 weight_source(model))
        n = max(mask.astype(mx.float32).sum().item(), 1.0)
        return head_mean(spec, h, targets, mask, opt).item() * n


def row_logprobs(model, inputs, targets, mask, options: Optional[EngineOptions] = None,
                 method: str = "mesp") -> mx.array:
    """Σₜ mask · log p(targets) of each row, [B] fp32, forward only: the blocks as
    `method` runs them (mebp: the model's own blocks) and the tiled head."""
    opt = options or EngineOptions()
    try:
        spec = model_spec(model, "mesp" if method == "mesp" else "mebp",
                          inputs.shape[1], opt)
    except ValueError:      # a family or a model state the engine does not run
        if is_streamed(model) or method != "autodiff":
            raise
        return -_own_forward_rows(model, inputs, targets, mask)
    with tile_barriers():               # outside any transform: evaluate per W0 tile
        h = spec.embed_ids(inputs)
        mx.eval(h)
        links = StepLinks(spec, inputs, h)
        if method == "mesp":
            run = lambda i, b, h: block_forward(b, h, opt,              # noqa: E731
                                                links=links.forward(i, b))
        else:
            run = lambda i, b, h: own_block(b, h, links.forward(i, b))  # noqa: E731
        h = walk(spec, h, run, weight_source(model))
        ce = head_mean(spec, h, targets, mask, opt, per_token=True)
        out = -(ce.reshape(mask.shape) * mask).sum(axis=1)
        mx.eval(out)
        return out


def _own_forward_sum(model, inputs, targets, mask) -> float:
    """Σ CE · mask through the model's own forward, never the full [B, T, V] logits."""
    return _own_forward_rows(model, inputs, targets, mask).sum().item()


def _own_forward_rows(model, inputs, targets, mask) -> mx.array:
    """Σₜ CE · mask of each row [B] through the model's own forward, a row and
    EVAL_ROWS positions of logits at a time."""
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "embed_tokens"):
        ce = nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets)
        return (ce * mask).sum(axis=1)
    head = model.lm_head if hasattr(model, "lm_head") else body.embed_tokens.as_linear
    rows = []
    for r in range(inputs.shape[0]):
        h = body(inputs[r:r + 1])                               # [1, T, D]
        total = mx.array(0.0)
        for t in range(0, h.shape[1], EVAL_ROWS):
            s = slice(t, t + EVAL_ROWS)
            ce = nn.losses.cross_entropy(head(h[:, s]).astype(mx.float32),
                                         targets[r:r + 1, s])
            total = total + (ce * mask[r:r + 1, s]).sum()
            mx.eval(total)
        rows.append(total)
    return mx.stack(rows)
