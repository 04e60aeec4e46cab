"""Where a training process's memory goes before MLX allocates anything for the step.

    python -m bench.probes.process_memory [--model DIR]

Resident set size (Linux VmRSS, MB = 10⁶ bytes) after each stage of what
`python -m mesp_mlx.lora` does before its first step, in one fresh process: the
interpreter, MLX, numpy, mesp_mlx, mlx-lm's import (which brings transformers), the
model (loaded lazily, weights streamed if --model is given) and its tokenizer.
The differences are what each stage adds; MLX's own buffers are listed apart.
"""

import argparse
import re
import subprocess
import sys

STAGES = (
    ("python", "pass"),
    ("mlx", "import mlx.core, mlx.nn, mlx.optimizers"),
    ("numpy", "import numpy"),
    ("mesp_mlx", "import mesp_mlx, mesp_mlx.lora"),
    ("mlx-lm (with transformers)", "import mlx_lm"),
)
LOAD = ("from mesp_mlx.models.loading import load_model\n"
        "model, tok, _ = load_model({d!r}, log=lambda *a: None, stream_weights=True)")
REPORT = ("import re, mlx.core as mx\n"
          "rss = int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read())"
          ".group(1)) * 1024\n"
          "print(rss, mx.get_active_memory() + mx.get_cache_memory())")


def measure(model_dir=None):
    """[(stage, RSS bytes, MLX bytes)], each stage in a process that ran all before it."""
    stages = list(STAGES)
    if model_dir:
        stages.append(("model (streamed) and tokenizer", LOAD.format(d=str(model_dir))))
    out, code = [], ""
    for name, stmt in stages:
        code += stmt + "\n"
        p = subprocess.run([sys.executable, "-c", code + REPORT], capture_output=True,
                           text=True, check=True)
        rss, mlx = map(int, p.stdout.split()[-2:])
        out.append((name, rss, mlx))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a model directory to load as the CLI does (streamed)")
    args = p.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("this probe reads /proc/self/status (Linux)")
        return 1
    rows, prev = measure(args.model), 0
    print("| stage | RSS after (MB) | added (MB) | of it MLX buffers (MB) |")
    print("|---|---:|---:|---:|")
    for name, rss, mlx in rows:
        print(f"| {name} | {rss / 1e6:.1f} | {(rss - prev) / 1e6:.1f} | {mlx / 1e6:.1f} |")
        prev = rss
    return 0


if __name__ == "__main__":
    sys.exit(main())
