"""Elementwise costs on this backend that shape the recompute (issue 13): exp and
mx.sigmoid per element, against mesp's compiled SwiGLU kernels (ops/swiglu.py).
fp32, fastest of 20 runs after 3 warm-ups.

    python bench/elementwise_timing.py                  # [256, 4864] and [256, 11008]
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from mesp_mlx.ops.swiglu import swiglu_backward, swiglu_saving  # noqa: E402


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


if __name__ == "__main__":
    sys.exit(main())
