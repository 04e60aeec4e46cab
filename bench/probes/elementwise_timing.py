"""Elementwise costs on this backend that shape the recompute: exp and mx.sigmoid per
element, and mesp's compiled SwiGLU kernels (mesp_mlx/ops/swiglu.py) against the plain
ops they replace (the baseline). fp32, fastest of 20 runs after 3 warm-ups.

    python -m bench.probes.elementwise_timing           # [256, 4864] and [256, 11008]
"""

import sys
import time

import mlx.core as mx

from bench import common
from mesp_mlx.ops.swiglu import swiglu_backward, swiglu_saving


def fastest(f, *a, n=20):
    for _ in range(3):
        mx.eval(f(*a))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        mx.eval(f(*a))
        ts.append(time.perf_counter() - t)
    return min(ts) * 1e3


def plain_saving(a, u):          # the uncompiled ops swiglu_saving replaces
    sig = mx.sigmoid(a)
    return (a * sig) * u, sig


def plain_backward(dy, a, u):    # the uncompiled backward, σ recomputed
    sig = mx.sigmoid(a)
    return dy * u * (sig * (1 + a * (1 - sig))), dy * (a * sig)


def main():
    print(f"MLX {mx.__version__}, {mx.default_device()}, fp32, ms (ns per element)")
    for F in (4864, 11008):
        a, u, dy = (mx.random.normal((1, 256, F)) for _ in range(3))
        mx.eval(a, u, dy)
        n = a.size
        rows = {"exp": fastest(mx.exp, a), "mx.sigmoid": fastest(mx.sigmoid, a),
                "forward + σ, plain ops": fastest(plain_saving, a, u),
                "forward + σ, swiglu_saving": fastest(swiglu_saving, a, u),
                "backward, plain ops": fastest(plain_backward, dy, a, u),
                "backward, swiglu_backward": fastest(swiglu_backward, dy, a, u)}
        for k, v in rows.items():
            print(f"  [256, {F}] {k}: {v:.1f} ms ({v * 1e6 / n:.1f} ns)")
    print(common.footer([common.environment(common.command(__spec__.name, []))], "float32"))


if __name__ == "__main__":
    sys.exit(main())
