"""One MLP forward (gate, up, SwiGLU, down) of a real architecture, split three ways:
what a token chunk costs against one chunk of all T rows (the baseline), and why the
block does not split the MLP along F.

    python -m bench.probes.mlp_split                       # Qwen2.5-3B, T 256
    python -m bench.probes.mlp_split --model Qwen2.5-0.5B --T 1024

  one chunk     all T rows at once (the widest tensor T × F)
  token chunks  rows of token_chunk_bytes (EngineOptions' default: 95 rows at 3B), each
                chunk one call per weight: the BLAS packs every weight once per call
  F slices      all T rows, F cut into slices of the same bytes: gate/up take row
                slices of W0 (contiguous), down_proj takes column slices W0[:, j],
                which are strided, so MLX copies each one before the product
Random fp32 weights, no LoRA; fastest of 3 runs after a warm-up, each part evaluated
before the next (as the block schedule does).
"""

import argparse
import sys

import mlx.core as mx

from bench import common
from bench.probes.block_profile import fastest
from mesp_mlx.engine.plan import EngineOptions
from mesp_mlx.models.configs import config_for
from mesp_mlx.ops.swiglu import swiglu


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="Qwen2.5-3B")
    p.add_argument("--T", type=int, default=256)
    a = p.parse_args(argv)
    cfg = config_for(a.model)
    D, F, T = cfg["hidden_size"], cfg["intermediate_size"], a.T
    Wg, Wu, Wd = (mx.random.normal(s) * 0.02 for s in ((F, D), (F, D), (D, F)))
    x = mx.random.normal((1, T, D))
    mx.eval(Wg, Wu, Wd, x)
    budget = EngineOptions().token_chunk_bytes
    rows, cols = max(1, budget // (4 * F)), max(1, budget // (4 * T))

    def tokens(n):
        for t0 in range(0, T, n):
            xc = x[:, t0:t0 + n]
            mx.eval(swiglu(xc @ Wg.T, xc @ Wu.T) @ Wd.T)

    def f_slices(n):
        y = None
        for f0 in range(0, F, n):
            m = swiglu(x @ Wg[f0:f0 + n].T, x @ Wu[f0:f0 + n].T)
            part = m @ Wd[:, f0:f0 + n].T
            y = part if y is None else y + part
            mx.eval(y)

    print(f"{a.model} MLP forward, T {T}, D {D}, F {F}, fp32, MLX {mx.__version__}, "
          f"{mx.default_device()}:")
    for name, f in ((f"one chunk ({T} rows)", lambda: tokens(T)),
                    (f"token chunks of {rows} rows", lambda: tokens(rows)),
                    (f"F slices of {cols}", lambda: f_slices(cols))):
        print(f"  {name}: {fastest(f):.1f} ms")
    print(common.footer([common.environment(common.command(__spec__.name, argv))], "float32"))


if __name__ == "__main__":
    sys.exit(main())
