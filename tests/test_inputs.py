"""Every method rejects bad ids and malformed batches
with a clear error before touching the model (no NaN, no segfault)."""

import mlx.core as mx
import pytest

import mesp_mlx
from mesp_mlx.models.configs import build_model, tiny_config
from mesp_mlx.engine.batch import vocab_sizes

V = 64


@pytest.fixture(scope="module")
def model():
    m = build_model(tiny_config(vocab_size=V, tie_word_embeddings=False), seed=0)
    return mesp_mlx.apply_lora(m, rank=2)


def ids(fill=3, B=1, T=4):
    return mx.full((B, T), fill, mx.int32)


def test_vocab_sizes(model):
    assert vocab_sizes(model) == (V, V)
    assert vocab_sizes(object()) == (None, None)


@pytest.mark.parametrize("method", mesp_mlx.METHODS)
@pytest.mark.parametrize("where,bad", [("targets", V), ("targets", 10**6),
                                       ("inputs", V), ("inputs", 10**6)])
def test_out_of_range_ids_name_id_and_vocab(model, method, where, bad):
    x, y = ids(), ids()
    if where == "targets":
        y = mx.array([[1, 2, bad, 3]], mx.int32)
    else:
        x = mx.array([[1, bad, 2, 3]], mx.int32)
    with pytest.raises(ValueError, match=rf"{where} contain the id {bad}.* {V} rows"):
        mesp_mlx.value_and_grad(model, x, y, method=method)


@pytest.mark.parametrize("method", mesp_mlx.METHODS)
def test_negative_targets_are_rejected(model, method):
    y = mx.array([[1, -1, 2, 3]], mx.int32)
    with pytest.raises(ValueError, match=r"targets contain the id -1.*mask"):
        mesp_mlx.value_and_grad(model, ids(), y, method=method)


def test_last_valid_id_is_accepted(model):
    loss, _ = mesp_mlx.value_and_grad(model, ids(V - 1), ids(V - 1), method="mesp")
    assert mx.isfinite(loss).item() and loss.item() > 0


@pytest.mark.parametrize("x,y,err,match", [
    (ids().astype(mx.float32), ids(), TypeError, r"integer token ids, got dtype .*float32"),
    ([[1, 2, 3]], [[2, 3, 4]], TypeError, r"mx.array of token ids .* got a list"),
    (mx.zeros((1, 0), mx.int32), mx.zeros((1, 0), mx.int32), ValueError, r"empty batch"),
    (mx.zeros((0, 4), mx.int32), mx.zeros((0, 4), mx.int32), ValueError, r"empty batch"),
])
@pytest.mark.parametrize("method", ["mesp", "autodiff"])
def test_malformed_batches_are_clear(model, method, x, y, err, match):
    with pytest.raises(err, match=match):
        mesp_mlx.value_and_grad(model, x, y, method=method)


def test_mezo_api_checks_too(model):
    with pytest.raises(ValueError, match=rf"id {V}\b"):
        mesp_mlx.mezo_gradient_estimate(model, ids(), ids(V))
