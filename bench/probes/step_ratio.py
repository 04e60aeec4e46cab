"""Step time of mesp against autodiff, paired in one process (A B A B …), so that a
shared machine's drift hits both alike: the ratio of each pair, then min / median /
max. Random weights of a real configuration, fp32, LoRA r 8 on every block linear
(B non-zero), batch 1, one warm-up step of each variant first.

    python -m bench.probes.step_ratio --model LFM2-1.2B --T 256 --pairs 4

Variants: `mesp` (EngineOptions defaults), `mesp one chunk` (every block in one token
chunk) and, with --budget MB, `mesp budget` (that activation budget, as the plan
spends it). Memory is not measured here (bench/families_new.py does, one fresh
process per row).
"""

import argparse
import statistics
import sys
import time

import mlx.core as mx

import mesp_mlx
from bench.point import blas_in_use
from mesp_mlx.engine.lora_layers import lora_layers
from mesp_mlx.engine.plan import EngineOptions
from mesp_mlx.models.configs import build_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="LFM2-1.2B")
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--budget", type=float, default=None, help="MB for `mesp budget`")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    model = build_model(args.model, seed=0)
    mesp_mlx.apply_lora(model, rank=8)
    for _, m in lora_layers(model):
        m.lora_b = 0.01 * mx.random.normal(m.lora_b.shape)
    V = (model.language_model if "language_model" in model else model).args.vocab_size
    ids = mx.random.randint(0, V, (1, args.T + 1), key=mx.random.key(2))
    x, y = ids[:, :-1], ids[:, 1:]
    variants = {"autodiff": ("autodiff", None), "mesp": ("mesp", None),
                "mesp one chunk": ("mesp", EngineOptions(token_chunk_bytes=1 << 40))}
    if args.budget is not None:
        variants["mesp budget"] = ("mesp", EngineOptions(
            activation_budget=int(args.budget * 1e6)))

    def step(name):
        method, opt = variants[name]
        t0 = time.perf_counter()
        mx.eval(mesp_mlx.value_and_grad(model, x, y, method=method, options=opt))
        return time.perf_counter() - t0

    for name in variants:                                    # warm-up (and spec check)
        step(name)
    times = {name: [] for name in variants}
    for _ in range(args.pairs):
        for name in variants:
            times[name].append(step(name))
    print(f"{args.model}, T {args.T}, fp32, r 8, batch 1, {args.pairs} rounds; "
          f"BLAS {blas_in_use()}")
    for name, ts in times.items():
        ratios = [t / a for t, a in zip(ts, times["autodiff"])]
        print(f"  {name:15s} median {statistics.median(ts):6.2f} s   / autodiff per round: "
              f"min {min(ratios):.2f}, median {statistics.median(ratios):.2f}, "
              f"max {max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
