"""Helpers shared by the test files (no test file imports another):
the CLI in-process, tiny LoRA models with B ≠ 0, batches, gradient comparison."""

import contextlib
import io
import json
import re
import zlib

import mlx.core as mx
from mlx.utils import tree_flatten

import mesp_mlx
from mesp_mlx.engine.lora_layers import apply_lora, lora_layers
from mesp_mlx.engine.plan import EngineOptions
from mesp_mlx.lora import main
from mesp_mlx.models.configs import build_model, tiny_config
from mesp_mlx.train.config import TrainConfig


def cli(*args):
    """(exit code, stdout, stderr) of main(args)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def base(model_dir, data_dir, adapter_dir, *extra):
    return ["--model", model_dir, "--data", data_dir, "--adapter-path", adapter_dir,
            "--batch-size", 4, "--max-seq-length", 128, "--learning-rate", 1e-2,
            "--steps-per-report", 2, "--steps-per-eval", 2, "--val-batches", 1,
            "--rank", 4, "--scale", 2.0, *extra]


def losses(text):
    return {int(i): float(v) for i, v in re.findall(r"Iter (\d+): train loss ([\d.]+)", text)}


B_STD = {"qwen3_5": 0.01}     # LoRA B ~ N(0, std²) where it is not 0.05 (test_qwen3_5.py)


def make(cfg, rank=4, num_layers=None, keys=None, quantize=None, dtype=mx.float32,
         dropout=0.0, seed=0, family="qwen2"):
    model = build_model(tiny_config(family, **cfg), dtype=dtype, quantize=quantize,
                        seed=seed)
    mesp_mlx.apply_lora(model, rank=rank, num_layers=num_layers, keys=keys, dropout=dropout)
    set_lora_b(model, B_STD.get(family, 0.05), dtype)
    randomize_norms(model)
    return model


def set_lora_b(model, std, dtype=mx.float32):
    """B ≠ 0, or half the gradients are trivial."""
    for _, m in lora_layers(model):
        m.lora_b = (std * mx.random.normal(m.lora_b.shape)).astype(dtype)
        m.lora_a = m.lora_a.astype(dtype)


def randomize_norms(model):
    """Norm weights ≠ 1, so the backward through w is tested; effective weight ≈ 1 ±
    0.1 (Gemma's 1 + w norms get w ≈ 0: their mlx-lm init of w = 1 doubles every
    norm, which makes a random tiny model chaotic enough that fp32 op order shows).
    gemma4's layer_scalar, 1 at init, gets 1 ± 0.1 too; its attention has scale 1, so
    its q/k norm weights get hd^-¼ (logits of std ~1, as 1/√hd gives elsewhere)."""
    for path, m in model.named_modules():
        if "weight" in m and m.weight.ndim == 1 and "RMSNorm" in type(m).__name__:
            base = 0.0 if type(m).__module__.startswith("mlx_lm.models.gemma") else 1.0
            noise = 0.1 * mx.random.normal(m.weight.shape, key=mx.random.key(zlib.crc32(path.encode())))
            m.weight = (base + noise).astype(m.weight.dtype)
        if "layer_scalar" in m:                 # gemma4's frozen block-output scale
            noise = 0.1 * mx.random.normal((1,), key=mx.random.key(zlib.crc32(path.encode())))
            m.layer_scalar = (1.0 + noise).astype(m.layer_scalar.dtype)
    for _, m in model.named_modules():
        if getattr(m, "scale", None) == 1.0 and "q_norm" in m:   # gemma4: no 1/√hd
            for n in ("q_norm", "k_norm"):      # logits of std ~1, not √hd (a near
                if n in m:                      # one-hot softmax amplifies rounding)
                    m[n].weight = m[n].weight * m.head_dim ** -0.25


def step_peak(model, x, y, method="mesp", options=None, stats=None):
    """MLX peak of one value_and_grad step above what was active before it (cache
    cleared first, so the allocator's cache does not hide the step's buffers)."""
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    loss, g = mesp_mlx.value_and_grad(model, x, y, method=method, options=options,
                                      stats=stats)
    mx.eval(loss, g)
    return mx.get_peak_memory() - base


def batch(T, B=2, V=256, seed=1):
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    x = mx.random.randint(0, V, (B, T), key=k1)
    y = mx.random.randint(0, V, (B, T), key=k2)
    mask = (mx.random.uniform(shape=(B, T), key=k3) > 0.25).astype(mx.float32)
    return x, y, mask


def compare(got, ref, dtype):
    g, r = dict(tree_flatten(got)), dict(tree_flatten(ref))
    assert g.keys() == r.keys() and r
    G = max(mx.abs(v.astype(mx.float32)).max().item() for v in r.values())
    assert G > 0, "every reference gradient is 0: the test could not fail"
    for k in r:
        assert g[k].shape == r[k].shape and g[k].dtype == r[k].dtype, k
        a, b = g[k].astype(mx.float32), r[k].astype(mx.float32)
        scale = mx.abs(b).max().item()
        err = mx.abs(a - b).max().item()
        msg = (f"{k}: max err {err:.3g} (mean {mx.abs(a - b).mean().item():.3g}), "
               f"scale {scale:.3g}, model max {G:.3g}")
        if dtype == mx.float32:
            assert err <= 1e-5 * scale + 1e-6 * G, msg
        if scale == 0.0:                        # e.g. q/k grads at T = 1
            continue
        cos = (mx.sum(a * b) / (mx.linalg.norm(a.reshape(-1)) *
                                mx.linalg.norm(b.reshape(-1)))).item()
        assert cos >= (0.99999 if dtype == mx.float32 else 0.999), f"{msg}, cos {cos:.7f}"


def lora_model(model_dir, dropout=0.0, seed=0):
    import mlx_lm
    model, _ = mlx_lm.load(str(model_dir))
    mx.random.seed(seed)
    return apply_lora(model, rank=4, scale=2.0, dropout=dropout)


def train_cfg(**kw):
    base = dict(train=True, iters=6, batch_size=4, learning_rate=1e-2,
                steps_per_report=2, steps_per_eval=100, val_batches=2, method="autodiff",
                adapter_path=None)
    base.update(kw)
    return TrainConfig(**base)


def save_dir(path, cfg, quantize=None, seed=1):
    """config.json + model.safetensors of a random model (what mlx_lm.load reads)."""
    path.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg, seed=seed, quantize=quantize)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    cfg = dict(cfg, **({"quantization": quantize} if quantize else {}))
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def check_exact(model, x, y, mask, dtype=mx.float32):
    res = grads_by_method(model, x, y, mask)
    loss_ref, g_ref = res["autodiff"]
    for method in ("mebp", "mesp"):
        loss, g = res[method]
        tol = 1e-6 if dtype == mx.float32 else 1e-2
        assert abs(loss.item() - loss_ref.item()) <= tol * abs(loss_ref.item()), method
        compare(g, g_ref, dtype)


def grads_by_method(model, x, y, mask, seed=7, methods=("autodiff", "mebp", "mesp")):
    out = {}
    for method in methods:
        mx.random.seed(seed)                   # same dropout randomness for every method
        out[method] = mesp_mlx.value_and_grad(model, x, y, mask, method=method)
    return out


def chunk_opts(model, B, rows, **kw):
    """EngineOptions whose token chunks are `rows` tokens (the bytes of [B, rows, F])."""
    F = mesp_mlx.engine.walk.model_spec(model, "mesp", 8).blocks[-1].down
    F = mesp_mlx.engine.block._frozen(F).shape[1]
    return EngineOptions(token_chunk_bytes=4 * B * F * rows, **kw)
