"""Disk checkpoints: pwrite/preadv (what mesp_mlx/engine/checkpoints.py does, the
baseline) against a memory map.

    python -m bench.probes.checkpoint_io          # Qwen2.5-0.5B shapes at T 8192
    python -m bench.probes.checkpoint_io --T 2048 --layers 24 --dim 896

Writes L block inputs of [1, T, D] fp32 in forward order, reads them back in reverse
(as the backward does), each way, into ordinary MLX arrays; prints seconds per
direction and the process's peak RSS growth (file pages mapped into the process
count as resident with a map). Neither syncs to disk (the engine never does); the page
cache is left warm, as in a training run.
"""

import argparse
import mmap
import os
import resource
import sys
import tempfile
import time

import mlx.core as mx
import numpy as np

from bench import common


def rss_peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB


def with_pwrite(xs, directory):
    from mesp_mlx.engine.checkpoints import DiskCheckpoints
    st = DiskCheckpoints(directory, sum(x.nbytes for x in xs))
    t0 = time.perf_counter()
    for i, x in enumerate(xs):
        st.put(i, x)
    t1 = time.perf_counter()
    for i in reversed(range(len(xs))):
        mx.eval(st.pop(i))
    t2 = time.perf_counter()
    st.close()
    return t1 - t0, t2 - t1


def with_mmap(xs, directory):
    n = xs[0].nbytes
    fd, path = tempfile.mkstemp(dir=directory)
    os.ftruncate(fd, n * len(xs))
    m = mmap.mmap(fd, n * len(xs))
    t0 = time.perf_counter()
    for i, x in enumerate(xs):
        m[i * n:(i + 1) * n] = memoryview(x).cast("B")
    t1 = time.perf_counter()
    view = np.frombuffer(m, np.float32)
    for i in reversed(range(len(xs))):
        mx.eval(mx.array(view[i * n // 4:(i + 1) * n // 4]).reshape(xs[0].shape))
    t2 = time.perf_counter()
    del view
    m.close()
    os.close(fd)
    os.unlink(path)
    return t1 - t0, t2 - t1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--dim", type=int, default=896)
    p.add_argument("--dir", default=tempfile.gettempdir())
    args = p.parse_args(argv)
    xs = [mx.random.normal((1, args.T, args.dim)) for _ in range(args.layers)]
    mx.eval(xs)
    total = sum(x.nbytes for x in xs) / common.MB
    print(f"{args.layers} × [1, {args.T}, {args.dim}] fp32 = {total:.0f} MB in {args.dir}")
    for name, f in (("pwrite/preadv", with_pwrite), ("mmap", with_mmap)):
        before = rss_peak()
        w, r = f(xs, args.dir)
        print(f"{name:14s} write {w:.2f} s ({total / w:.0f} MB/s), read {r:.2f} s "
              f"({total / r:.0f} MB/s), peak RSS growth "
              f"{(rss_peak() - before) / common.MB:.0f} MB")
    print(common.footer([common.environment(common.command(__spec__.name, argv))], "float32"))


if __name__ == "__main__":
    sys.exit(main())
