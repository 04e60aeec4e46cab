"""The pre-flight estimate against a measured full-depth step (issue 12: within ±10% at
T 2048), checkpoints in memory and on disk; one fresh process per point.

    python bench/estimate_check.py                      # Qwen2.5-0.5B, T 2048
    python bench/estimate_check.py --model Qwen2.5-0.5B --T 1024

Both sides are the MLX peak above the weights and the LoRA parameters (what
memory_bench's peak_above_bytes measures): the estimate's checkpoints, LoRA gradients
and working set. SGD (no optimizer state), fp32, r 8 on all 7 projections, batch 1.
"""

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import memory_bench  # noqa: E402

MB = 2**20


def check(model, T, timeout=3600):
    import mlx.core as mx
    from mesp_mlx.models.configs import config_for
    from mesp_mlx.memory.estimate import arch_from_config, estimate
    arch = arch_from_config(config_for(model), mx.float32)
    for ck, method in (("memory", "mesp"), ("disk", "mesp@disk")):
        r = memory_bench.run_point(dict(model=model, T=T, r=8, method=method, steps=0,
                                        dtype="float32", scale=20.0, seed=0,
                                        tag="estimate check"), timeout)
        e = estimate(arch, "mesp", T, 1, "sgd", fused_sdpa=False, checkpoints=ck, runtime=0)
        est = e.checkpoints + e.lora_grads + e.activations
        if r.get("status") != "ok":
            print(f"{model} T {T} checkpoints in {ck}: {r.get('status')}")
            continue
        got = r["peak_above_bytes"]
        print(f"{model} T {T} checkpoints in {ck}: estimate {est / MB:.1f} MB, measured "
              f"{got / MB:.1f} MB above weights + LoRA ({est / got - 1:+.1%})", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="Qwen2.5-0.5B")
    p.add_argument("--T", type=int, default=2048)
    a = p.parse_args(argv)
    check(a.model, a.T)


if __name__ == "__main__":
    sys.exit(main())
