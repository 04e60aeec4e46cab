"""Streamed frozen weights (stream.py, safetensors_io.py): the same gradients as the
resident model, bit for bit; a lower peak; clear errors for a bad weights file.

Bit-identical is the claim (fp32 and 4-bit): streaming changes where W0 comes from,
never the ops or their order, so max |streamed − resident| is asserted to be 0
(mebp's autodiff head excepted: its streamed form is tiled, see below).
"""

import os
import zlib

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

import mesp_mlx
from mesp_mlx.models.configs import TINY, tiny_config
from mesp_mlx.engine.lora_layers import lora_layers
from mesp_mlx.engine.safetensors_io import SafetensorsFile, WeightsFileError
from mesp_mlx.engine.plan import EngineOptions, head_tiles
from mesp_mlx.engine.stream import is_streamed, stream_weights

from helpers import save_dir

Q4 = dict(group_size=32, bits=4)


def with_lora(model, rank=4):
    """Identical LoRA on any copy of the model: A from seed 0, B ≠ 0 by path."""
    mx.random.seed(0)
    mesp_mlx.apply_lora(model, rank=rank)
    for p, m in lora_layers(model):
        m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape, key=mx.random.key(zlib.crc32(p.encode())))
    return model


def pair(path):
    """(resident model, streamed model) of one directory, LoRA applied to both."""
    res = with_lora(load_model(path)[0])
    st = load_model(path, lazy=True)[0]
    stream_weights(st, path)
    return res, with_lora(st)


def batch(T=13, B=2, V=256):
    k = mx.random.split(mx.random.key(1), 3)
    return (mx.random.randint(0, V, (B, T), key=k[0]), mx.random.randint(0, V, (B, T), key=k[1]),
            (mx.random.uniform(shape=(B, T), key=k[2]) > 0.25).astype(mx.float32))


def assert_close_tree(got, ref, rtol=1e-5):
    g, r = dict(tree_flatten(got)), dict(tree_flatten(ref))
    assert g.keys() == r.keys() and r
    for k in r:
        assert g[k].shape == r[k].shape and g[k].dtype == r[k].dtype, k
        err = mx.abs(g[k] - r[k]).max().item()
        scale = max(mx.abs(r[k]).max().item(), 1e-30)
        assert err <= rtol * scale, f"{k}: max err {err:.3g} of {scale:.3g}"


def assert_identical(got, ref):
    g, r = dict(tree_flatten(got)), dict(tree_flatten(ref))
    assert g.keys() == r.keys() and r
    for k in r:
        assert g[k].shape == r[k].shape and g[k].dtype == r[k].dtype, k
        err = mx.abs(g[k] - r[k]).max().item()
        assert mx.array_equal(g[k], r[k]).item(), f"{k}: max err {err:.3g} (want 0)"


@pytest.mark.parametrize("quant", [None, Q4], ids=["fp32", "4bit"])
@pytest.mark.parametrize("family", list(TINY))
def test_streamed_mesp_grads_bit_identical(family, quant, tmp_path):
    res, st = pair(save_dir(tmp_path / "m", tiny_config(family), quant))
    x, y, m = batch()
    l1, g1 = mesp_mlx.value_and_grad(res, x, y, m, method="mesp")
    l2, g2 = mesp_mlx.value_and_grad(st, x, y, m, method="mesp")
    assert l1.item() == l2.item()
    assert_identical(g2, g1)


@pytest.mark.parametrize("quant", [None, Q4], ids=["fp32", "4bit"])
def test_streamed_mebp_mezo_and_eval_match(quant, tmp_path):
    res, st = pair(save_dir(tmp_path / "m", tiny_config("qwen2"), quant))
    x, y, m = batch()
    l1, g1 = mesp_mlx.value_and_grad(res, x, y, m, method="mebp")
    l2, g2 = mesp_mlx.value_and_grad(st, x, y, m, method="mebp")
    # mebp's head is the one place the streamed run tiles differently (StreamedTable:
    # 8 MiB vocabulary tiles, resident: one product), so bits hold only where the BLAS
    # sums every tile shape alike (the bundled one); with OpenBLAS, fp32 rounding
    assert abs(l1.item() - l2.item()) <= 1e-6 * abs(l1.item())
    assert_close_tree(g2, g1)
    e1 = mesp_mlx.mezo_gradient_estimate(res, x, y, m, seed=3)
    e2 = mesp_mlx.mezo_gradient_estimate(st, x, y, m, seed=3)
    assert_identical(e2, e1)
    from mesp_mlx.train.data import Batch
    b = Batch(x, y, m, x.size, int(m.sum().item()))
    r, s = mesp_mlx.evaluate(res, [b]), mesp_mlx.evaluate(st, [b])
    assert abs(r - s) <= 1e-5 * abs(r), (r, s)
    with pytest.raises(ValueError, match="stream"):
        mesp_mlx.value_and_grad(st, x, y, m, method="autodiff")


def _peak(model, x, y, m, opt):
    mesp_mlx.value_and_grad(model, x, y, m, method="mesp", options=opt)     # verify once
    mx.clear_cache()
    mx.reset_peak_memory()
    loss, g = mesp_mlx.value_and_grad(model, x, y, m, method="mesp", options=opt)
    mx.eval(loss, g)
    return mx.get_peak_memory()


def test_streamed_peak_below_resident_by_weights(tmp_path):
    """MLX peak with all weights counted: resident − streamed ≥ W − block − head tile
    (one model alive at a time: the peak counts everything MLX holds)."""
    import gc

    cfg = tiny_config("qwen2", hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                      vocab_size=4096)
    path = save_dir(tmp_path / "m", cfg)
    x, y, m = batch(T=32, B=1, V=4096)
    opt = EngineOptions()
    res = with_lora(load_model(path)[0])
    resident = _peak(res, x, y, m, opt)
    del res
    gc.collect()
    mx.clear_cache()
    st = load_model(path, lazy=True)[0]
    ws = stream_weights(st, path)
    streamed = _peak(with_lora(st), x, y, m, opt)
    W, blk = ws.streamed_bytes(), ws.block_bytes()
    tile = head_tiles(opt, x.size, 4096)[1] * 128 * 4
    assert W > 4 * blk, "weights must dominate for the relation to say anything"
    saved = resident - streamed
    assert saved >= W - blk - tile, (f"resident {resident / 1e6:.2f} MB, streamed "
                                     f"{streamed / 1e6:.2f} MB: saved {saved / 1e6:.2f} MB < "
                                     f"W {W / 1e6:.2f} − block {blk / 1e6:.2f} − tile "
                                     f"{tile / 1e6:.2f}")


def test_truncated_or_changed_file_is_a_clear_error(tmp_path):
    path = save_dir(tmp_path / "m", tiny_config("qwen2"))
    f = path / "model.safetensors"
    res, st = pair(path)
    x, y, m = batch()
    mesp_mlx.value_and_grad(st, x, y, m, method="mesp")
    size = f.stat().st_size
    os.truncate(f, size // 2)                     # mid-run: between two steps
    with pytest.raises(WeightsFileError, match="changed while training"):
        mesp_mlx.value_and_grad(st, x, y, m, method="mesp")
    with pytest.raises(WeightsFileError, match="truncated"):
        SafetensorsFile(f)                        # and at open: the header says more


def test_reader_ranges_rows_and_dtypes(tmp_path):
    a = {"f": mx.arange(24, dtype=mx.float32).reshape(6, 4),
         "b": mx.arange(12).reshape(4, 3).astype(mx.bfloat16),
         "u": mx.arange(10, dtype=mx.uint32).reshape(5, 2)}
    mx.save_safetensors(str(tmp_path / "t.safetensors"), a)
    f = SafetensorsFile(tmp_path / "t.safetensors")
    for k, v in a.items():
        assert f.read(k).dtype == v.dtype and mx.array_equal(f.read(k), v).item()
        assert mx.array_equal(f.read(k, 1, 3), v[1:3]).item()
        ids = np.array([0, 2, 3])
        assert mx.array_equal(f.read_rows(k, ids), v[mx.array(ids)]).item()


def test_placeholders_hold_no_memory(tmp_path):
    cfg = tiny_config("qwen2", vocab_size=4096)
    path = save_dir(tmp_path / "m", cfg, Q4)
    import gc
    gc.collect()
    before = mx.get_active_memory()          # other tests' arrays may still be alive
    st = load_model(path, lazy=True)[0]
    ws = stream_weights(st, path)
    assert is_streamed(st)
    held = mx.get_active_memory() - before
    assert held < ws.streamed_bytes() / 20, f"placeholders hold {held} bytes"
    q = st.model.layers[0].self_attn.q_proj
    assert q.weight.shape == (64, 64 * 4 // 32) and q.scales.shape == (64, 2)


def test_streamed_table_logits_and_vjp_match_dense(tmp_path):
    """StreamedTable(hn) and its custom VJP == hn Wᵀ and dZ W on the dense table."""
    path = save_dir(tmp_path / "m", tiny_config("qwen2", vocab_size=512), Q4)
    st = load_model(path, lazy=True)[0]
    ws = stream_weights(st, path)
    W = ws.head.rows(0, 512).dense()
    hn = mx.random.normal((3, 64), key=mx.random.key(5))
    dz = mx.random.normal((3, 512), key=mx.random.key(6))
    z, (dh,) = mx.vjp(ws.head, [hn], [dz])[0][0], mx.vjp(ws.head, [hn], [dz])[1]
    assert mx.allclose(z, hn @ W.T, atol=1e-4).item()
    assert mx.allclose(dh, dz @ W, atol=1e-4).item()
