"""Exactness of the per-block schedules against plain autodiff, and memory relations."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

import mesp_mlx
from mesp_mlx.arch import build_model, tiny_config
from mesp_mlx.layers import lora_layers

CASES = {
    "gqa2-tied": dict(cfg={}, T=13),
    "gqa6-untied-odd-T": dict(cfg=dict(hidden_size=48, num_attention_heads=6,
                                       num_key_value_heads=1, tie_word_embeddings=False), T=7),
    "mha-r5": dict(cfg=dict(num_key_value_heads=4), T=9, rank=5),
    "partial-layers": dict(cfg=dict(num_hidden_layers=3), T=11, num_layers=2),
    "keys-subset": dict(cfg={}, T=10, keys=["q_proj", "v_proj", "down_proj"]),
    "quantized-4bit": dict(cfg={}, T=12, quantize=dict(group_size=32, bits=4)),
    "quantized-8bit": dict(cfg={}, T=5, quantize=dict(group_size=64, bits=8)),
    "single-token": dict(cfg={}, T=1),
}


def make(cfg, rank=4, num_layers=None, keys=None, quantize=None, dtype=mx.float32,
         dropout=0.0, seed=0):
    model = build_model(tiny_config(**cfg), dtype=dtype, quantize=quantize, seed=seed)
    mesp_mlx.apply_lora(model, rank=rank, num_layers=num_layers, keys=keys, dropout=dropout)
    for _, m in lora_layers(model):          # B ≠ 0, or half the gradients are trivial
        m.lora_b = (0.05 * mx.random.normal(m.lora_b.shape)).astype(dtype)
        m.lora_a = m.lora_a.astype(dtype)
    return model


def batch(T, B=2, V=256, seed=1):
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    x = mx.random.randint(0, V, (B, T), key=k1)
    y = mx.random.randint(0, V, (B, T), key=k2)
    mask = (mx.random.uniform(shape=(B, T), key=k3) > 0.25).astype(mx.float32)
    return x, y, mask


def compare(got, ref, dtype):
    g, r = dict(tree_flatten(got)), dict(tree_flatten(ref))
    assert g.keys() == r.keys()
    for k in r:
        assert g[k].shape == r[k].shape and g[k].dtype == r[k].dtype, k
        a, b = g[k].astype(mx.float32), r[k].astype(mx.float32)
        scale = mx.abs(b).max().item()
        err = mx.abs(a - b).max().item()
        if scale == 0.0:                        # e.g. q/k grads at T = 1
            assert err <= 1e-7, f"{k}: ref is 0, got max {err}"
            continue
        cos = (mx.sum(a * b) / (mx.linalg.norm(a.reshape(-1)) * mx.linalg.norm(b.reshape(-1)))).item()
        msg = f"{k}: max err {err:.3g} (mean {mx.abs(a - b).mean().item():.3g}), scale {scale:.3g}, cos {cos:.7f}"
        if dtype == mx.float32:
            assert err <= 1e-5 * scale and cos >= 0.99999, msg
        else:
            assert cos >= 0.999, msg


def grads_by_method(model, x, y, mask, seed=7):
    out = {}
    for method in ("autodiff", "mebp", "mesp"):
        mx.random.seed(seed)                   # same dropout randomness for every method
        out[method] = mesp_mlx.value_and_grad(model, x, y, mask, method=method)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_exact(name):
    case = dict(CASES[name])
    cfg, T = case.pop("cfg"), case.pop("T")
    model = make(cfg, **case)
    x, y, mask = batch(T)
    res = grads_by_method(model, x, y, mask)
    loss_ref, g_ref = res["autodiff"]
    for method in ("mebp", "mesp"):
        loss, g = res[method]
        assert abs(loss.item() - loss_ref.item()) <= 1e-6 * abs(loss_ref.item()), method
        compare(g, g_ref, mx.float32)


def test_bf16_close():
    model = make({}, dtype=mx.bfloat16)
    x, y, mask = batch(16)
    res = grads_by_method(model, x, y, mask)
    for method in ("mebp", "mesp"):
        compare(res[method][1], res["autodiff"][1], mx.bfloat16)


def test_dropout_same_randomness():
    """The recompute must reuse the forward's dropout masks."""
    model = make({}, dropout=0.3)
    x, y, mask = batch(9)
    res = grads_by_method(model, x, y, mask)
    for method in ("mebp", "mesp"):
        compare(res[method][1], res["autodiff"][1], mx.float32)
    mx.random.seed(8)                          # different randomness → different gradient
    _, g_other = mesp_mlx.value_and_grad(model, x, y, mask, method="mesp")
    a, b = tree_flatten(g_other)[0][1], tree_flatten(res["mesp"][1])[0][1]
    assert mx.abs(a - b).max().item() > 0


def test_matches_mlx_lm_lora_layers():
    """Independent reference: mlx-lm's own LoRALinear under nn.value_and_grad."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = make({})
    ref = build_model(tiny_config(), seed=0)
    ref.freeze()
    linear_to_lora_layers(ref, 2, {"rank": 4, "scale": 20.0, "dropout": 0.0})
    ref.update(model.trainable_parameters())
    x, y, mask = batch(11)

    def loss_fn(m):
        return mesp_mlx.engine.masked_ce(m(x), y, mask)

    _, g_ref = nn.value_and_grad(ref, loss_fn)(ref)
    _, g = mesp_mlx.value_and_grad(model, x, y, mask, method="mesp")
    compare(g, g_ref, mx.float32)


def test_errors():
    model = make({})
    x, y, mask = batch(4)
    with pytest.raises(ValueError, match="supported: autodiff, mebp, mesp"):
        mesp_mlx.value_and_grad(model, x, y, method="bogus")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        mesp_mlx.value_and_grad(model, x[0], y[0])

    class Other(nn.Module):
        model_type = "gpt2"
    with pytest.raises(ValueError, match="supported: qwen2"):
        mesp_mlx.value_and_grad(Other(), x, y, method="mesp")


def _peak(model, x, y, method, stats=None):
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    loss, g = mesp_mlx.value_and_grad(model, x, y, method=method, stats=stats)
    mx.eval(loss, g)
    peak = mx.get_peak_memory() - base
    del g
    return peak


def test_memory_relations():
    """mesp < mebp < autodiff peak, and checkpoints are exactly L·B·T·D·itemsize."""
    cfg = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=6,
               vocab_size=4096, num_attention_heads=8, num_key_value_heads=2)
    model = make(cfg)
    B, T = 1, 256
    x, y, _ = batch(T, B=B, V=4096)
    stats = {}
    peaks = {m: _peak(model, x, y, m, stats if m == "mesp" else None)
             for m in ("autodiff", "mebp", "mesp")}
    assert peaks["mesp"] < peaks["mebp"] < peaks["autodiff"], peaks
    assert stats["checkpoint_bytes"] == 6 * B * T * 128 * 4
    assert stats["n_checkpoints"] == 6


@pytest.mark.parametrize("opts", [
    dict(fused_attention=True),                                   # the Metal path
    dict(attn_chunk_bytes=4 * 4 * 13 * 5, head_rows=7, head_chunk_bytes=4 * 7 * 100),
    dict(clear_cache="block"),
])
def test_options_do_not_change_gradients(opts):
    """Tiling (attention query blocks, head row/vocab tiles) and cache policy are exact."""
    from mesp_mlx.schedule import EngineOptions

    model = make({})
    x, y, mask = batch(13)
    loss_ref, g_ref = mesp_mlx.value_and_grad(model, x, y, mask, method="autodiff")
    loss, g = mesp_mlx.value_and_grad(model, x, y, mask, method="mesp",
                                      options=EngineOptions(**opts))
    assert abs(loss.item() - loss_ref.item()) <= 1e-6 * abs(loss_ref.item())
    compare(g, g_ref, mx.float32)
