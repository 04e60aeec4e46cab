"""Step time with the allocator cache cleared after each step or kept (issue 13):
mesp with an activation budget, EngineOptions(clear_cache="step" | "none"); one fresh
process per point (memory_bench.run_point), fastest of 3 warm steps.

    python bench/cache_policy.py                        # Qwen2.5-3B T 256, 3185 MB
    python bench/cache_policy.py --model Qwen2.5-0.5B --budget 1409e6
"""

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import memory_bench  # noqa: E402

MB = 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="Qwen2.5-3B")
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--budget", type=float, default=3185 * MB,
                   help="activation budget, bytes (default: 3B T 256 autodiff's extra)")
    a = p.parse_args(argv)
    for policy in ("none", "step"):
        spec = dict(model=a.model, T=a.T, r=8, method="mesp", steps=3, dtype="float32",
                    scale=20.0, seed=0, tag=f"clear_cache={policy}",
                    options={"activation_budget": int(a.budget), "clear_cache": policy})
        r = memory_bench.run_point(spec, 3600)
        if r.get("status") != "ok":
            print(f"clear_cache={policy}: {r.get('status')} {r.get('error', '')}")
            continue
        ph = r["phases"]
        print(f"{a.model} T {a.T} budget {a.budget / MB:.0f} MB, clear_cache={policy}: "
              f"fastest {min(r['step_times_s']):.2f} s/step (forward {ph['forward_s']:.2f} "
              f"s, head {ph['head_s']:.2f} s, backward {ph['backward_s']:.2f} s), peak "
              f"above weights {r['peak_above_bytes'] / MB:.1f} MB", flush=True)


if __name__ == "__main__":
    sys.exit(main())
