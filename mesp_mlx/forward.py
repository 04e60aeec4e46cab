"""Forward-only loss through the per-block engine: evaluation of a streamed model.

    total = loss_sum(model, inputs, targets, mask)     # Σ CE · mask (a float)

A model whose frozen weights are streamed (stream.py) cannot run mlx-lm's own
__call__ (its modules hold placeholders), so evaluation walks the ModelSpec as the
training forward does: embedding rows, each block inside `weights.block(b)` with
an evaluation barrier, then the tiled loss head (ops/loss_head.py), never the
[N, V] logits. Dropout is off when the model is in eval mode.
"""

import mlx.core as mx

from .block import block_forward
from .ops.dequant_matmul import tile_barriers
from .ops.loss_head import loss_head_value
from .schedule import EngineOptions, head_tiles, model_spec
from .stream import weight_source


def loss_sum(model, inputs, targets, mask, options=None) -> float:
    with tile_barriers():               # outside any transform: evaluate per W0 tile
        return _loss_sum(model, inputs, targets, mask, options or EngineOptions())


def _loss_sum(model, inputs, targets, mask, opt) -> float:
    spec = model_spec(model, "mesp", inputs.shape[1], opt)
    weights = weight_source(model)
    h = spec.embed_ids(inputs)
    mx.eval(h)
    for b in spec.blocks:
        with weights.block(b):
            h = block_forward(b, h, opt)
            mx.eval(h)
    V, D = spec.head.shape
    rows, vocab = head_tiles(opt, inputs.size, V)
    m = mask.reshape(-1).astype(mx.float32)
    mean = loss_head_value(spec.norm(h.reshape(-1, D)), spec.head, targets.reshape(-1), m,
                           rows, vocab, softcap=spec.final_softcap,
                           logit_scale=spec.logit_scale)
    return mean.item() * max(m.sum().item(), 1.0)
