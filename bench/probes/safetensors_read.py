"""os.preadv (the baseline) against np.memmap for the reads weight streaming does
(mesp_mlx/engine/safetensors_io.py).

    python -m bench.probes.safetensors_read [--dir /tmp]

A Qwen2.5-0.5B-sized 4-bit tied embedding (151936 × 896, packed uint32 + bf16
scales/biases) is written once; then, from the page cache, we time (a) the head's
vocabulary tiles (contiguous row ranges), (b) one block's tensors read whole, and
(c) the 256 random rows of an embedding lookup, each as an MLX array.
"""

import argparse
import os
import sys
import tempfile
import time

import mlx.core as mx
import numpy as np

from bench import common
from mesp_mlx.engine.safetensors_io import SafetensorsFile


def _pread(f, name, r0=None, r1=None, ids=None):
    """os.preadv into a numpy buffer (one call per run of rows), then an MLX copy."""
    dt, shape, b0, _ = f.entries[name]
    npdt = {"U32": np.uint32, "BF16": np.uint16}[dt]
    row = int(np.prod(shape[1:])) * np.dtype(npdt).itemsize
    runs = [(int(i), int(i) + 1) for i in ids] if ids is not None else [(r0, r1)]
    out = np.empty((sum(b - a for a, b in runs), *shape[1:]), npdt)
    flat, at = out.reshape(-1).view(np.uint8), 0
    for a, b in runs:
        n = (b - a) * row
        os.preadv(f._fd, [flat[at:at + n]], b0 + a * row)
        at += n
    return mx.array(out)


def _memmap(f, name, r0=None, r1=None, ids=None):
    """np.memmap of the tensor for this read, the slice (or gather) copied to MLX."""
    dt, shape, b0, _ = f.entries[name]
    m = np.memmap(f.path, {"U32": np.uint32, "BF16": np.uint16}[dt], "r", offset=b0,
                  shape=shape)
    return mx.array(np.ascontiguousarray(m[ids] if ids is not None else m[r0:r1]))


def _cases(f, V, D, F, ids, tile):
    def tiles(rd):
        return lambda: [mx.eval(rd(f, "embed.weight", v, min(V, v + tile)),
                                rd(f, "embed.scales", v, min(V, v + tile)))
                        for v in range(0, V, tile)]
    return {
        "head tiles (all V)": (tiles(_pread), tiles(_memmap)),
        "block tensors whole": tuple(
            (lambda rd: lambda: mx.eval(rd(f, "up.weight", 0, F),
                                        rd(f, "down.weight", 0, D)))(rd)
            for rd in (_pread, _memmap)),
        "256 embedding rows": tuple(
            (lambda rd: lambda: mx.eval(rd(f, "embed.weight", ids=ids),
                                        rd(f, "embed.scales", ids=ids)))(rd)
            for rd in (_pread, _memmap)),
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default=tempfile.gettempdir())
    a = p.parse_args(argv)
    V, D, F = 151936, 896, 4864
    rng = mx.random.key(0)
    w = {"embed.weight": mx.random.randint(0, 2**31, (V, D // 8), key=rng).astype(mx.uint32),
         "embed.scales": mx.random.normal((V, D // 64)).astype(mx.bfloat16),
         "up.weight": mx.random.randint(0, 2**31, (F, D // 8)).astype(mx.uint32),
         "down.weight": mx.random.randint(0, 2**31, (D, F // 8)).astype(mx.uint32)}
    path = os.path.join(a.dir, "stream_read_bench.safetensors")
    mx.save_safetensors(path, w)
    f = SafetensorsFile(path)
    ids = np.unique(np.random.default_rng(0).integers(0, V, 256))
    tile = (8 << 20) // (4 * 512)                      # head tile: 512 rows × this vocab
    cases = _cases(f, V, D, F, ids, tile)
    print("| read | os.preadv ms | np.memmap ms |\n|---|---:|---:|")
    for name, (pr, mm) in cases.items():
        res = []
        for fn in (pr, mm):
            fn()
            t = time.perf_counter()
            for _ in range(5):
                fn()
            res.append((time.perf_counter() - t) / 5 * 1e3)
        print(f"| {name} | {res[0]:.1f} | {res[1]:.1f} |")
    f.close()
    os.unlink(path)
    print(common.footer([common.environment(common.command(__spec__.name, argv))],
                        "uint32 / bfloat16 (4-bit packed weights and scales)"))


if __name__ == "__main__":
    main()
