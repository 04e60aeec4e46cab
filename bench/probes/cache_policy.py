"""Step time with the allocator cache cleared after each step (the baseline, the
default) or kept: mesp with an activation budget, EngineOptions(clear_cache="step" |
"none"); one fresh process per point (memory_bench.run_point), fastest of 3 warm steps.

    python -m bench.probes.cache_policy                 # Qwen2.5-3B T 256
    python -m bench.probes.cache_policy --model Qwen2.5-0.5B --budget 1.48e9

The default budgets are autodiff's extra peak at the same point (RESULTS.md).
"""

import argparse
import sys

from bench import common
from bench.memory_bench import run_point

MB = common.MB


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="Qwen2.5-3B")
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--budget", type=float, default=3.34e9,
                   help="activation budget, bytes (default: 3B T 256 autodiff's extra)")
    a = p.parse_args(argv)
    env = common.environment(common.command(__spec__.name, argv))
    for policy in ("none", "step"):
        spec = dict(model=a.model, T=a.T, r=8, method="mesp", steps=3, dtype="float32",
                    scale=20.0, seed=0, tag=f"clear_cache={policy}",
                    options={"activation_budget": int(a.budget), "clear_cache": policy})
        r = run_point(spec, 3600)
        if r.get("status") != "ok":
            print(f"clear_cache={policy}: {r.get('status')} {r.get('error', '')}")
            continue
        ph = r["phases"]
        print(f"{a.model} T {a.T} budget {a.budget / MB:.0f} MB, clear_cache={policy}: "
              f"fastest {min(r['step_times_s']):.2f} s/step (forward {ph['forward_s']:.2f} "
              f"s, head {ph['head_s']:.2f} s, backward {ph['backward_s']:.2f} s), peak "
              f"above weights {r['peak_above_bytes'] / MB:.1f} MB", flush=True)
    print(common.footer([env], "float32"))


if __name__ == "__main__":
    sys.exit(main())
