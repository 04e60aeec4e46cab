"""The one forward walk (engine/walk.py): the evaluation loss equals the model's own,
with any head tiling, and models the engine does not run are evaluated by their
own forward."""

import mlx.nn as nn
import pytest

from mesp_mlx.engine.plan import EngineOptions
from mesp_mlx.engine.step import masked_ce
from mesp_mlx.engine.walk import loss_sum
from mesp_mlx.models.configs import TINY, build_model

from helpers import batch, make


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "granite"])
@pytest.mark.parametrize("opts", [{}, dict(head_rows=5, head_chunk_bytes=4 * 5 * 37)])
def test_loss_sum_is_the_models_own_loss(family, opts):
    model = make({}, family=family)
    model.eval()
    x, y, mask = batch(13, V=TINY[family].get("vocab_size", 256))
    want = (masked_ce(model(x), y, mask) * mask.sum()).item()
    got = loss_sum(model, x, y, mask, EngineOptions(**opts))
    assert abs(got - want) <= 1e-5 * abs(want)


def test_a_model_the_engine_does_not_run_is_evaluated_by_its_own_forward():
    """Trainable base weights (no LoRA applied): the engine refuses to train it, but
    evaluation falls back to the model's forward and gives the same loss."""
    model = build_model(TINY["qwen2"])
    x, y, mask = batch(9)
    want = (masked_ce(model(x), y, mask) * mask.sum()).item()
    assert abs(loss_sum(model, x, y, mask) - want) <= 1e-5 * abs(want)

    class Bare(nn.Module):                       # no `model.embed_tokens`: plain forward
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __call__(self, ids):
            return self.inner(ids)
    bare = Bare(model)
    assert abs(loss_sum(bare, x, y, mask) - want) <= 1e-5 * abs(want)
