"""One block of a real architecture, timed phase by phase: mesp's forward,
its recompute + backward, its backward from a Kept (with and without extras) against
mlx-lm's forward and autodiff's vjp of the same block. Random weights, fp32, LoRA r 8
on all 7 projections with B non-zero, batch 1; fastest of 3 runs after a warm-up.

    python -m bench.probes.block_profile --model Qwen2.5-3B --T 256
    python -m bench.probes.block_profile --model Qwen2.5-3B --T 256 --one-chunk  # 1 chunk
"""

import argparse
import sys
import time

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

import mesp_mlx
from bench import common
from mesp_mlx.engine.block import block_backward, block_forward, layer_mask
from mesp_mlx.engine.lora_layers import LoRALinear
from mesp_mlx.engine.plan import EngineOptions
from mesp_mlx.engine.walk import model_spec
from mesp_mlx.models.configs import build_model, config_for


def fastest(f, n=3):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts) * 1e3


def profile(name, T, one_chunk=False):
    cfg = dict(config_for(name), num_hidden_layers=2, vocab_size=1024)
    model = build_model(cfg)
    mesp_mlx.apply_lora(model, rank=8, scale=20.0, dropout=0.0)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.01
    mx.eval(model.parameters())
    opt = EngineOptions(verify=False, **({"token_chunk_bytes": 1 << 40} if one_chunk else {}))
    spec = model_spec(model, "mesp", T, opt)
    b, layer = spec.blocks[1], model.model.layers[1]
    x = mx.random.normal((1, T, cfg["hidden_size"]))
    g = mx.random.normal(x.shape)
    mx.eval(x, g)

    def backward(kept=None):
        flat = {}
        mx.eval(block_backward(spec.paths, b, x, mx.array(g), flat, opt, kept=kept),
                *flat.values())

    def kept_backward(extras):
        ts = []
        for _ in range(4):
            out, kept = block_forward(b, x, opt, keep=True, extras=extras)
            mx.eval(out, kept.o)
            t = time.perf_counter()
            backward(kept)
            ts.append(time.perf_counter() - t)
        return min(ts[1:]) * 1e3

    mask = layer_mask(b, T)
    keys, vals = zip(*tree_flatten(layer.trainable_parameters()))

    def block(*a):
        layer.update(tree_unflatten(list(zip(keys, a[:-1]))))
        return [layer(a[-1], mask)]

    rows = {"mesp forward": fastest(lambda: mx.eval(block_forward(b, x, opt))),
            "mesp recompute + backward": fastest(backward),
            "mesp backward from Kept": kept_backward(False),
            "mesp backward from Kept + extras (P, σ)": kept_backward(True),
            "mlx-lm forward": fastest(lambda: mx.eval(layer(x, mask))),
            "autodiff vjp (forward + backward)": fastest(
                lambda: mx.eval(mx.vjp(block, list(vals) + [x], [g])))}
    chunks = "one token chunk" if one_chunk else "default token chunks"
    print(f"{name}, T {T}, one block, {chunks}, MLX {mx.__version__}, "
          f"{mx.default_device()}:")
    for k, v in rows.items():
        print(f"  {k}: {v:.1f} ms")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="Qwen2.5-3B")
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--one-chunk", action="store_true")
    a = p.parse_args(argv)
    profile(a.model, a.T, a.one_chunk)
    print("Baseline: mlx-lm's forward and autodiff's vjp of the same block.")
    print(common.footer([common.environment(common.command(__spec__.name, argv))], "float32"))


if __name__ == "__main__":
    sys.exit(main())
