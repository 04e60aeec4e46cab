"""The ops the families add: hand backward vs mx.vjp of the reference (random
cotangent), forward vs the mlx-lm modules; fp32 tight, bf16 by cosine."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import gemma3_text
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.rope_utils import SuScaledRoPE, initialize_rope

from gradcheck import Rng, assert_all_close, assert_close, ref_vjp
from mesp_mlx.ops.attention import (attention, attention_backward,
                                    attention_backward_chunked, attention_chunked,
                                    attention_ref)
from mesp_mlx.ops.frozen import FrozenWeight
from mesp_mlx.ops.geglu import geglu, geglu_backward, geglu_ref
from mesp_mlx.ops.loss_head import (loss_head_ref, loss_head_value,
                                    loss_head_value_and_grad)
from mesp_mlx.ops.rmsnorm import effective_weight, rmsnorm, rmsnorm_backward, rmsnorm_ref
from mesp_mlx.ops.rope import (Rope, rope_apply, rope_apply_backward, rope_apply_ref,
                               rope_from_module)
from mesp_mlx.ops.softcap import softcap, softcap_backward, softcap_ref

DTYPES = [mx.float32, mx.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["w", "1+w", "none"])
@pytest.mark.parametrize("shape", [(2, 5, 24), (2, 3, 5, 8)])      # full width, per head
def test_rmsnorm_effective_weight(kind, shape, dtype):
    rng = Rng(0)
    x, dy = rng.normal(shape, dtype), rng.normal(shape, dtype)
    w = effective_weight(rng.normal(shape[-1:], dtype, std=0.3), kind)
    y, (dx_ref,) = ref_vjp(lambda x: rmsnorm_ref(x, w, 1e-6), (x,), dy)
    assert_close("y", rmsnorm(x, w, 1e-6), y)
    assert_close("dx", rmsnorm_backward(dy, x, w, 1e-6), dx_ref)


def test_gemma_norm_matches_mlx_lm():
    n = gemma3_text.RMSNorm(16, eps=1e-6)
    n.weight = Rng(1).normal((16,), mx.bfloat16, std=0.5)
    x = Rng(2).normal((3, 16), mx.bfloat16)
    assert mx.array_equal(n(x), rmsnorm(x, effective_weight(n.weight, "1+w"), 1e-6)).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approx", [True, False])
def test_geglu(approx, dtype):
    rng = Rng(3)
    a, u, dy = (rng.normal((4, 7, 32), dtype, std=2.0) for _ in range(3))
    mlx_lm_y = (nn.gelu_approx(a) if approx else nn.gelu(a)) * u
    assert mx.array_equal(geglu(a, u, approx), mlx_lm_y).item()
    y, grads = ref_vjp(lambda a, u: geglu_ref(a, u, approx), (a, u), dy)
    assert_close("y", geglu(a, u, approx), y)
    assert_all_close(("da", "du"), geglu_backward(dy, a, u, approx), grads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap(dtype):
    rng = Rng(4)
    s, dy = rng.normal((5, 9), dtype, std=20.0), rng.normal((5, 9), dtype)
    y, (ds,) = ref_vjp(lambda s: softcap_ref(s, 30.0), (s,), dy)
    assert_close("y", softcap(s, 30.0), y)
    assert_close("ds", softcap_backward(dy, softcap(s, 30.0), 30.0), ds)


def _attn_case(T, H, K, dtype=mx.float32, seed=0, hd=8):
    rng = Rng(seed)
    q, do = rng.normal((2, H, T, hd), dtype), rng.normal((2, H, T, hd), dtype)
    k, v = rng.normal((2, K, T, hd), dtype), rng.normal((2, K, T, hd), dtype)
    return q, k, v, do, hd ** -0.5


@pytest.mark.parametrize("window,softcap_c", [(1, None), (4, None), (50, None),
                                              (None, 2.0), (4, 2.0)])
@pytest.mark.parametrize("chunk", [3, 5, 16])
@pytest.mark.parametrize("H,K", [(2, 2), (6, 1)])
def test_attention_window_softcap(window, softcap_c, chunk, H, K):
    q, k, v, do, sc = _attn_case(13, H, K)
    kw = dict(window=window, softcap=softcap_c)
    o_ref, grads = ref_vjp(lambda q, k, v: attention_ref(q, k, v, sc, **kw), (q, k, v), do)
    assert_close("o chunked", attention_chunked(q, k, v, sc, chunk, **kw), o_ref)
    o, P = attention(q, k, v, sc, **kw)
    assert_close("o", o, o_ref)
    assert_all_close(("dq", "dk", "dv"), attention_backward(do, q, k, v, o, P, sc, **kw),
                     grads)
    assert_all_close(("dq c", "dk c", "dv c"),
                     attention_backward_chunked(do, q, k, v, o_ref, sc, chunk, **kw), grads)


def test_attention_window_matches_mlx_lm_mask():
    q, k, v, _, sc = _attn_case(13, 4, 2)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=sc,
                                               mask=create_causal_mask(13, window_size=4))
    assert_close("o", attention_chunked(q, k, v, sc, 5, window=4), ref)


def test_attention_window_softcap_bf16():
    q, k, v, do, sc = _attn_case(13, 4, 2, mx.bfloat16)
    f32 = [t.astype(mx.float32) for t in (q, k, v, do)]
    kw = dict(window=4, softcap=2.0)
    _, grads = ref_vjp(lambda q, k, v: attention_ref(q, k, v, sc, **kw), f32[:3], f32[3])
    o = attention_chunked(q, k, v, sc, 5, **kw)
    assert_all_close(("dq", "dk", "dv"),
                     attention_backward_chunked(do, q, k, v, o, sc, 5, **kw),
                     [g.astype(mx.bfloat16) for g in grads])


def _rope_modules():
    llama3 = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                  high_freq_factor=4.0, original_max_position_embeddings=8192)
    yarn = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                mscale=1.0, mscale_all_dim=0.5)
    return {
        "plain": nn.RoPE(16, base=10000.0),
        "traditional": nn.RoPE(16, traditional=True, base=500.0),
        "linear": initialize_rope(16, 10000.0, False, dict(rope_type="linear", factor=8.0)),
        "llama3": initialize_rope(16, 500000.0, False, llama3, 131072),
        "yarn": initialize_rope(16, 10000.0, False, yarn, 256),
        "longrope-partial": SuScaledRoPE(8, 10000.0, 1024, 64, [1.0, 1.2, 1.4, 1.6],
                                         [1.0, 2.0, 3.0, 4.0]),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(_rope_modules()))
def test_rope_variants(name, dtype):
    mod = _rope_modules()[name]
    spec = rope_from_module(mod)
    rng = Rng(5)
    x, dy = rng.normal((2, 3, 11, 16), dtype), rng.normal((2, 3, 11, 16), dtype)
    assert_close("vs mlx-lm module", rope_apply(x, spec), mod(x))
    y, (dx,) = ref_vjp(lambda x: rope_apply_ref(x, spec), (x,), dy)
    assert_close("y", rope_apply(x, spec), y)
    assert_close("dx", rope_apply_backward(dy, spec), dx)


def test_rope_spec_fields():
    m = _rope_modules()
    assert rope_from_module(m["longrope-partial"]).mscale > 1.0      # _scale != 1
    assert rope_from_module(m["yarn"]).mscale != 1.0
    assert rope_from_module(m["linear"]).scale == 1 / 8

    class Odd(nn.Module):
        pass
    with pytest.raises(ValueError, match="Odd.*autodiff"):
        rope_from_module(Odd())
    with pytest.raises(ValueError, match="positions"):
        rope_apply(mx.zeros((1, 1, 9, 4)), Rope(4, base=10.0, max_positions=8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", [dict(softcap=3.0), dict(logit_scale=4.0),
                                dict(softcap=3.0, logit_scale=0.5)])
@pytest.mark.parametrize("bits", [None, 4])
def test_loss_head_transforms(kw, bits, dtype):
    rng = Rng(6)
    N, D, V = 21, 32, 300
    hn = rng.normal((N, D), dtype)
    W = rng.normal((V, D), std=D ** -0.5 * 4)
    if bits:
        emb = nn.Embedding(V, D)
        emb.weight = W
        W0 = FrozenWeight.of(nn.QuantizedEmbedding.from_embedding(emb, 32, bits))
    else:
        W0 = FrozenWeight(W.astype(dtype))
    t = rng.randint(0, V, (N,))
    m = (rng.uniform((N,)) > 0.3).astype(mx.float32)
    Wd = W0.dense()
    ref, dref = mx.value_and_grad(lambda h: loss_head_ref(h, Wd, t, m, **kw))(hn)
    loss, dh = loss_head_value_and_grad(hn, W0, t, m, 8, 70, **kw)
    tol = 1e-5 if dtype == mx.float32 else 1e-2
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    assert abs(loss_head_value(hn, W0, t, m, 8, 70, **kw).item() - ref.item()) <= \
        tol * abs(ref.item())
    assert_close("dhn", dh, dref)
