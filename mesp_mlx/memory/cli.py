"""Will it fit? `python -m mesp_mlx.memory --model Qwen2.5-3B --max-seq-length 512
--method mesp --device-profile iphone-8gb` builds the real architecture with random
weights (no download) and prints the estimate; `--measure` also runs one step and
prints what it measured.
A -4bit / -8bit / -bf16 suffix of --model sets --quantize and --dtype (bfloat16,
as mlx-community converts); explicit flags win. Every "what would fit" line is a
set of flags that fits when added to this command.
`--find max-seq-length|batch-size|rank` answers the largest value that fits the
budget from the estimate (`--measure`: confirmed by one measured step there);
--model may also be a config.json or a model directory (no weights are read).
Exit status: 0 fits (or no budget), 2 over budget, 1 bad input.
"""

import argparse
import atexit
import json
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..engine import apply_lora, value_and_grad
from ..engine.plan import EngineOptions
from ..engine.stream import resident_weight_bytes, stream_weights, streamed_weight_bytes
from ..errors import Parser
from ..models.configs import build_model, config_for
from . import fit
from .estimate import (MB, MemoryBudgetError, arch_from_config, arch_from_model, estimate,
                       preflight)
from .footprint import device_facts, idle_footprint, process_footprint
from .profiles import DEVICE_PROFILES, resolve_budget

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_SUFFIX = re.compile(r"-(?:(\d)bit|(bf16|fp16))$", re.I)


def _parser():
    p = Parser(prog="python -m mesp_mlx.memory", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Qwen2.5-0.5B",
                   help="bundled architecture name (Qwen2.5-0.5B/1.5B/3B, ...; a -4bit, "
                        "-8bit or -bf16 suffix sets --quantize/--dtype)")
    p.add_argument("--config-json", help="a config.json to use instead of --model")
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--method", default="mesp", choices=("autodiff", "mebp", "mesp"))
    p.add_argument("--lora-dtype", choices=("float32", "bfloat16", "float16"),
                   help="LoRA parameter dtype (default float32; the paper: bfloat16)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--optimizer", default="adam", choices=("sgd", "adam", "adamw"),
                   help="as training (default: adam)")
    p.add_argument("--dtype", choices=tuple(_DTYPES),
                   help="weights dtype (default: from the --model suffix, else float32)")
    p.add_argument("--quantize", type=int, choices=(2, 3, 4, 6, 8),
                   help="quantize the frozen weights to this many bits (group 64; "
                        "default: from a -Nbit --model suffix)")
    p.add_argument("--device-profile", help=f"one of {', '.join(DEVICE_PROFILES)}, auto")
    p.add_argument("--memory-budget", help="e.g. 6GB, 512MB, 1.5GiB (overrides the profile)")
    p.add_argument("--offload-checkpoints", action="store_true",
                   help="block-input checkpoints in a temporary file (training: "
                        "--offload-checkpoints DIR)")
    p.add_argument("--stream-weights", action="store_true",
                   help="stream the frozen weights block by block from a safetensors "
                        "copy of the model (written to a temporary directory first), "
                        "as training's --stream-weights")
    p.add_argument("--no-measure", action="store_true",
                   help="estimate only (the default): do not build the model or run a step")
    p.add_argument("--find", choices=fit.TARGETS,
                   help="answer the largest value of this flag that fits the budget "
                        "(from the estimate; the other flags held)")
    p.add_argument("--measure", action="store_true",
                   help="confirm the estimate by one measured step on a random-weight "
                        "copy of the model (with --find: at the answer)")
    return p


def variant(name: str) -> tuple:
    """(dtype name or None, bits or None) that a model name's suffix implies."""
    m = _SUFFIX.search(name.split("/")[-1])
    if m is None:
        return None, None
    if m.group(1):
        return "bfloat16", int(m.group(1))
    return ("bfloat16" if m.group(2).lower() == "bf16" else "float16"), None


def _resolve_variant(args):
    dtype, bits = variant(args.model) if not args.config_json else (None, None)
    args.dtype = args.dtype or dtype or "float32"
    args.quantize = args.quantize if args.quantize is not None else bits
    return args


def _config(args) -> dict:
    """--config-json, a config.json / model directory given as --model, or a
    bundled architecture name: the config alone, never the weights."""

    path = args.config_json
    p = Path(args.model).expanduser()
    if not path and (p.is_file() or (p / "config.json").is_file()):
        path = p if p.is_file() else p / "config.json"
    if path:
        with open(path) as f:
            return json.load(f)
    return config_for(args.model)


def _measure(cfg, args):
    """Build with random weights, apply LoRA and the optimizer state, run one
    step; (model, peak, seconds)."""

    q = {"group_size": 64, "bits": args.quantize} if args.quantize else None
    model = build_model(cfg, dtype=_DTYPES[args.dtype], quantize=q)
    apply_lora(model, rank=args.rank, dtype=args.lora_dtype)
    opt = {"sgd": optim.SGD, "adam": optim.Adam, "adamw": optim.AdamW}[args.optimizer](
        learning_rate=1e-5)
    opt.init(model.trainable_parameters())           # resident during the step, as in training
    if args.stream_weights:
        _stream_from_copy(model)
    shape = (args.batch_size, args.max_seq_length)
    x = mx.random.randint(0, cfg.get("vocab_size") or cfg["text_config"]["vocab_size"], shape)
    mx.eval(x, opt.state)
    mx.clear_cache()
    mx.reset_peak_memory()
    t = time.perf_counter()
    opts = EngineOptions(checkpoints="disk" if args.offload_checkpoints else "memory")
    loss, grads = value_and_grad(model, x, x, method=args.method, options=opts)
    mx.eval(loss, grads)
    return model, mx.get_peak_memory(), time.perf_counter() - t


def _stream_from_copy(model):
    """Save the random model to a temporary directory (removed at exit) and stream it."""
    from pathlib import Path


    d = Path(tempfile.mkdtemp(prefix="mesp-stream-"))
    atexit.register(shutil.rmtree, d, True)
    frozen = {k: v for k, v in tree_flatten(model.parameters())
              if not k.endswith((".lora_a", ".lora_b"))}
    mx.save_safetensors(str(d / "model.safetensors"), frozen)
    del frozen
    stream_weights(model, d)          # the in-memory copies are freed here
    mx.clear_cache()


def _print_measured(model, est, peak, secs):
    fp, resident = process_footprint(), resident_weight_bytes(model)
    idle, streamed = idle_footprint(), streamed_weight_bytes(model)
    print(f"\n| | estimate MB | measured MB |\n|---|---:|---:|\n"
          f"| MLX peak | {est.mlx_bytes / MB:.1f} | {peak / MB:.1f} |")
    print(f"MLX peak {peak / MB:.1f} MB in total (weights included), "
          f"{(peak - resident) / MB:.1f} MB above the {resident / MB:.1f} MB of "
          "frozen weights resident"
          + (f" ({streamed / MB:.1f} MB streamed from disk)" if streamed else ""))
    print(f"step time {secs:.2f} s; process footprint peak "
          f"{(fp.peak or 0) / MB:.1f} MB ({fp.source}); an idle process with MLX "
          f"imported: {(idle or 0) / MB:.1f} MB")


def _what_cannot_fit(arch, runtime: int, budget: int) -> str:
    """Which fixed part is over the budget on its own ('' if neither)."""
    if runtime >= budget:
        return (f"The runtime alone (Python, MLX and the libraries, measured: "
                f"{runtime / MB:.0f} MB) does not fit.")
    if arch.weight_bytes + runtime > budget:
        return (f"The weights ({arch.weight_bytes / MB:.0f} MB) and the runtime "
                f"({runtime / MB:.0f} MB) do not fit together.")
    return ""


def _config_name(args) -> str:
    return args.config_json or args.model


def _why(e: Exception) -> str:
    if isinstance(e, KeyError):
        return f"the key {e.args[0]!r} is missing"
    return str(e)


def _header(args, dev) -> str:
    quant = (f", {args.quantize}-bit" if args.quantize else "") + (
        ", streamed weights" if getattr(args, "stream_weights", False) else "")
    return (f"model {args.config_json or args.model} ({args.dtype}{quant}), {args.method}, "
            f"T={args.max_seq_length}, B={args.batch_size}, r={args.rank}, "
            f"{args.optimizer}; device {dev['device_name']}")


def main(argv=None) -> int:
    args = _resolve_variant(_parser().parse_args(argv))
    args.measure = args.measure or (args.stream_weights and not args.find)  # measured only
    try:
        budget = resolve_budget(args.memory_budget, args.device_profile)
        cfg = _config(args)
        if args.max_seq_length < 1 or args.batch_size < 1 or args.rank < 1:
            raise ValueError("--max-seq-length, --batch-size and --rank must be >= 1")
        if args.measure and args.no_measure:
            raise ValueError("--measure and --no-measure contradict each other")
        if args.stream_weights and args.method == "autodiff":
            raise ValueError("--stream-weights runs with mesp or mebp (autodiff needs "
                             "every weight resident)")
    except (ValueError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.find:
        return _find(args, cfg, budget)
    dtype = _DTYPES[args.dtype]
    ckpt = "disk" if args.offload_checkpoints else "memory"
    try:
        arch = arch_from_config(cfg, dtype, args.quantize, args.rank)
    except (KeyError, TypeError, ValueError) as e:
        print(f"error: {_config_name(args)} cannot be read as a model configuration: "
              f"{_why(e)}", file=sys.stderr)
        return 1
    est = estimate(arch, args.method, args.max_seq_length, args.batch_size, args.optimizer,
                   checkpoints=ckpt)
    print(_header(args, device_facts()))
    print(est)
    if args.measure:
        print(f"\nmeasuring one {args.method} step on a random-weight copy of the model "
              "(building it can take a minute or more)...", flush=True)
        model, peak, secs = _measure(cfg, args)
        arch = arch_from_model(model, args.rank)
        est = estimate(arch, args.method, args.max_seq_length, args.batch_size,
                       args.optimizer, checkpoints=ckpt)
        _print_measured(model, est, peak, secs)
    else:
        print("\n(estimate only; add --measure to confirm it with one measured step)")
    if budget is None:
        print("no budget given (--device-profile or --memory-budget): no verdict")
        return 0
    q4 = None if args.quantize else arch_from_config(cfg, dtype, 4, args.rank)
    try:
        preflight(arch, args.method, args.max_seq_length, args.batch_size, budget,
                  args.optimizer, arch_4bit=q4, checkpoints=ckpt)
    except MemoryBudgetError as e:            # the table is above: summary and advice only
        print(f"\nverdict: DOES NOT FIT. {e.summary}")
        why = _what_cannot_fit(arch, est.runtime, budget)
        if why:
            print(why)
        if e.advice:
            print("What would fit (add to this command):")
            for a in e.advice:
                flags = shlex.join(a.flags)
                print(f"  {flags}" + ("" if a.text.startswith(flags) else f"    # {a.text}"))
        else:
            print("Nothing smaller in T, method or 4-bit fits: use a smaller model or a "
                  "larger budget.")
        return 2
    print(f"\nverdict: fits: estimate {est.total_bytes / MB:.0f} MB of a "
          f"{budget / MB:.0f} MB budget ({(budget - est.total_bytes) / MB:.0f} MB headroom)")
    return 0


def _find(args, cfg, budget) -> int:
    """--find: the largest value that fits (exit 0), or 2 when not even 1 does."""
    if budget is None:
        print(f"error: --find {args.find} needs a budget: --device-profile or "
              "--memory-budget", file=sys.stderr)
        return 1
    arch = arch_from_config(cfg, _DTYPES[args.dtype], args.quantize, args.rank)
    ceiling = fit.limit(args.find, cfg, arch)
    v = fit.find(args.find, arch, args.rank, args.method, args.max_seq_length,
                 args.batch_size, args.optimizer, budget, ceiling)
    name = fit.flag_name(args.find)
    held = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in
                     ("max_seq_length", "batch_size", "rank") if k != name)
    print(f"model {args.config_json or args.model} ({args.dtype}"
          f"{f', {args.quantize}-bit' if args.quantize else ''}), {args.method}, "
          f"{held}, {args.optimizer}; budget {budget / MB:.0f} MB")
    if not v:
        why = _what_cannot_fit(arch, estimate(arch, args.method, 1, 1).runtime, budget)
        ways = ["a smaller model"] + (["4-bit weights (--quantize 4)"] if not args.quantize
                                      else []) + \
            (["--method mesp"] if args.method != "mesp" else []) + ["a larger budget"]
        print(f"verdict: DOES NOT FIT at --{args.find} 1{': ' + why if why else ''}; use "
              + ", ".join(ways[:-1]) + " or " + ways[-1])
        return 2
    setattr(args, name, v)
    a = arch if name != "rank" else arch_from_config(cfg, _DTYPES[args.dtype],
                                                      args.quantize, v)
    est = estimate(a, args.method, args.max_seq_length, args.batch_size, args.optimizer)
    print(f"largest --{args.find} that fits: {v}"
          + (" (the model's limit)" if v == ceiling else "")
          + f"; estimate {est.total_bytes / MB:.0f} MB of {budget / MB:.0f} MB")
    print(est)
    print(f"add to the training command: --{args.find} {v}")
    if not args.measure:
        return 0
    _, peak, secs = _measure(cfg, args)
    total = peak + est.runtime
    ok = total <= budget
    print(f"measured at --{args.find} {v}: MLX peak {peak / MB:.1f} MB (estimate "
          f"{est.mlx_bytes / MB:.1f}), with the runtime {total / MB:.1f} MB, step "
          f"{secs:.2f} s: " + ("fits, confirmed" if ok else
                               "DOES NOT FIT: the estimate is optimistic here; use a "
                               f"smaller value (e.g. --{args.find} {max(v * 9 // 10, 1)})"))
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
