"""The generic block's token chunks (block.spans): exact, the same dropout masks,
and a flatter peak in T."""

import mlx.core as mx
import pytest

import mesp_mlx
from mesp_mlx.models.configs import TINY
from mesp_mlx.engine.plan import EngineOptions

from helpers import batch, chunk_opts, compare, make


FAMILIES = list(TINY)        # every tiny family config (windows < T = 13)


def test_spans_merge_a_short_tail():
    from mesp_mlx.engine.block import spans
    assert spans(13, 4) == [(0, 4), (4, 8), (8, 12), (12, 13)]   # tail 1 = 4/4: kept
    assert spans(13, 6) == [(0, 6), (6, 13)]                      # tail 1 < 6/4: merged
    assert spans(256, 215) == [(0, 256)] and spans(5, 8) == [(0, 5)]
    assert spans(1024, 215) == [(0, 215), (215, 430), (430, 645), (645, 860), (860, 1024)]


@pytest.mark.parametrize("rows", [5, 4, 6])          # 13 = 5+5+3 = 4+4+4+1 = 6+7
@pytest.mark.parametrize("family", FAMILIES)
def test_token_chunks_are_exact(family, rows):
    """Token-chunked recompute/backward = unchunked mesp (fp32 rounding) = autodiff,
    for chunk sizes that do not divide T, on every family."""
    from mesp_mlx.engine.block import token_spans

    model = make({}, family=family)
    x, y, mask = batch(13)
    opt = chunk_opts(model, 2, rows)
    spec = mesp_mlx.engine.walk.model_spec(model, "mesp", 13)
    assert len(token_spans(spec.blocks[-1], opt, 2, 13)) == {5: 3, 4: 4, 6: 2}[rows]
    loss_ref, g_ref = mesp_mlx.value_and_grad(model, x, y, mask, method="autodiff")
    loss_one, g_one = mesp_mlx.value_and_grad(model, x, y, mask, method="mesp")
    loss, g = mesp_mlx.value_and_grad(model, x, y, mask, method="mesp", options=opt)
    assert abs(loss.item() - loss_one.item()) <= 1e-6 * abs(loss_one.item())
    compare(g, g_one, mx.float32)
    compare(g, g_ref, mx.float32)


def test_token_chunks_keep_dropout_masks():
    """A chunk's dropout mask is its rows of the whole input's mask (same as autodiff)."""
    model = make({}, dropout=0.3)
    x, y, mask = batch(11)
    mx.random.seed(3)
    _, g_ref = mesp_mlx.value_and_grad(model, x, y, mask, method="autodiff")
    mx.random.seed(3)
    _, g = mesp_mlx.value_and_grad(model, x, y, mask, method="mesp",
                                   options=chunk_opts(model, 2, 4))
    compare(g, g_ref, mx.float32)


def test_token_chunks_flatten_the_growth_in_T():
    """Same model, T 512 → 1024: with 64-token chunks the peak grows by less than
    half as much as with one chunk (the unchunked working set holds the T×F MLP
    tensors of a whole block at once; F = 16 D here)."""
    cfg = dict(hidden_size=64, intermediate_size=1024, num_hidden_layers=2,
               vocab_size=512, num_attention_heads=4, num_key_value_heads=2)
    model = make(cfg)
    x, y, _ = batch(1024, B=1, V=512)
    attn = dict(attn_chunk_bytes=1 << 18)          # attention: the same small blocks
    opts = {"one chunk": EngineOptions(token_chunk_bytes=1 << 40, **attn),
            "64 tokens": chunk_opts(model, 1, 64, **attn)}
    growth = {}
    for name, opt in opts.items():
        peaks = []
        for T in (512, 1024):
            mesp_mlx.value_and_grad(model, x[:, :8], y[:, :8], options=opt)
            mx.clear_cache()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            loss, g = mesp_mlx.value_and_grad(model, x[:, :T], y[:, :T], options=opt)
            mx.eval(loss, g)
            peaks.append(mx.get_peak_memory() - base)
            del loss, g
        growth[name] = peaks[1] - peaks[0]
    print({k: f"{v / 1e6:.2f} MB" for k, v in growth.items()})
    assert 0 < growth["64 tokens"] < 0.5 * growth["one chunk"], growth
