"""The pre-flight estimate against a measured full-depth step (the baseline; the
estimate should be within ±10% at T 2048), checkpoints in memory and on disk; one
fresh process per point.

    python -m bench.probes.estimate_check               # Qwen2.5-0.5B, T 2048
    python -m bench.probes.estimate_check --model Qwen2.5-0.5B --T 1024

Both sides are the MLX peak above the weights and the LoRA parameters (what
memory_bench's peak_above_bytes measures): the estimate's checkpoints, LoRA gradients
and working set. SGD (no optimizer state), fp32, r 8 on all 7 projections, batch 1.
"""

import argparse
import sys

from bench import common
from bench.memory_bench import run_point

MB = common.MB


def check(model, T, timeout=3600):
    import mlx.core as mx
    from mesp_mlx.models.configs import config_for
    from mesp_mlx.memory.estimate import arch_from_config, estimate
    arch = arch_from_config(config_for(model), mx.float32)
    for ck, method in (("memory", "mesp"), ("disk", "mesp@disk")):
        r = run_point(dict(model=model, T=T, r=8, method=method, steps=0,
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
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="Qwen2.5-0.5B")
    p.add_argument("--T", type=int, default=2048)
    a = p.parse_args(argv)
    check(a.model, a.T)
    print(common.footer([common.environment(common.command(__spec__.name, argv))], "float32"))


if __name__ == "__main__":
    sys.exit(main())
