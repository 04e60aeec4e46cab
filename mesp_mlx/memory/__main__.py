"""Will it fit? `python -m mesp_mlx.memory --model Qwen2.5-3B --max-seq-length 512
--method mesp --device-profile iphone-8gb` builds the real architecture with random
weights (no download), runs the estimate and one measured step, prints both.
Exit status: 0 fits (or no budget), 2 over budget, 1 bad input.
"""

import argparse
import json
import sys
import time

import mlx.core as mx

from ..config import Parser

from .estimate import (MB, MemoryBudgetError, arch_from_config, arch_from_model,
                       estimate, preflight)
from .footprint import device_facts, process_footprint
from .profiles import DEVICE_PROFILES, resolve_budget

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _parser():
    p = Parser(prog="python -m mesp_mlx.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Qwen2.5-0.5B",
                   help="bundled architecture name (Qwen2.5-0.5B/1.5B/3B, suffixes ok)")
    p.add_argument("--config-json", help="a qwen2 config.json to use instead of --model")
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--method", default="mesp", choices=("autodiff", "mebp", "mesp"))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam", "adamw"))
    p.add_argument("--dtype", default="float32", choices=tuple(_DTYPES))
    p.add_argument("--quantize", type=int, choices=(2, 3, 4, 6, 8),
                   help="quantize the frozen weights to this many bits (group 64)")
    p.add_argument("--device-profile", help=f"one of {', '.join(DEVICE_PROFILES)}, auto")
    p.add_argument("--memory-budget", help="e.g. 6GB, 512MB, 1.5GiB (overrides the profile)")
    p.add_argument("--no-measure", action="store_true",
                   help="estimate only: do not build the model or run a step")
    return p


def _config(args) -> dict:
    from ..arch import config_for
    if args.config_json:
        with open(args.config_json) as f:
            return json.load(f)
    return config_for(args.model)


def _measure(cfg, args):
    """Build with random weights, apply LoRA, run one step; (model, peak, seconds)."""
    from .. import apply_lora, value_and_grad
    from ..arch import build_model
    q = {"group_size": 64, "bits": args.quantize} if args.quantize else None
    model = build_model(cfg, dtype=_DTYPES[args.dtype], quantize=q)
    apply_lora(model, rank=args.rank)
    shape = (args.batch_size, args.max_seq_length)
    x = mx.random.randint(0, cfg["vocab_size"], shape)
    y = mx.random.randint(0, cfg["vocab_size"], shape)
    mx.eval(x, y)
    mx.clear_cache()
    mx.reset_peak_memory()
    t = time.perf_counter()
    loss, grads = value_and_grad(model, x, y, method=args.method)
    mx.eval(loss, grads)
    return model, mx.get_peak_memory(), time.perf_counter() - t


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        budget = resolve_budget(args.memory_budget, args.device_profile)
        cfg = _config(args)
        if args.max_seq_length < 1 or args.batch_size < 1 or args.rank < 1:
            raise ValueError("--max-seq-length, --batch-size and --rank must be >= 1")
    except (ValueError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    measured = None
    if args.no_measure:
        arch = arch_from_config(cfg, _DTYPES[args.dtype], args.quantize, args.rank)
    else:
        model, peak, secs = _measure(cfg, args)
        arch, measured = arch_from_model(model, args.rank), (peak, secs)
    est = estimate(arch, args.method, args.max_seq_length, args.batch_size, args.optimizer)
    dev = device_facts()
    print(f"model {args.config_json or args.model} ({args.dtype}"
          f"{f', {args.quantize}-bit' if args.quantize else ''}), {args.method}, "
          f"T={args.max_seq_length}, B={args.batch_size}, r={args.rank}; "
          f"device {dev['device_name']}")
    print(est)
    print(f"\n| | estimate MB | measured MB |\n|---|---:|---:|\n"
          f"| MLX peak | {est.mlx_bytes / MB:.1f} | "
          + (f"{measured[0] / MB:.1f} |" if measured else "not run |"))
    if measured:
        fp = process_footprint()
        print(f"step time {measured[1]:.2f} s; process footprint peak "
              f"{(fp.peak or 0) / MB:.1f} MB ({fp.source})")
    if budget is None:
        print("no budget given (--device-profile or --memory-budget): no verdict")
        return 0
    try:
        preflight(arch, args.method, args.max_seq_length, args.batch_size, budget,
                  args.optimizer)
    except MemoryBudgetError as e:
        print(f"\nverdict: DOES NOT FIT. {e}")
        return 2
    print(f"\nverdict: fits: estimate {est.total_bytes / MB:.0f} MB of a "
          f"{budget / MB:.0f} MB budget ({(budget - est.total_bytes) / MB:.0f} MB headroom)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
