"""Memory and speed: our methods against mlx-lm's LoRA step, one fresh process per point.

    python -m bench.memory_bench --preset full --resume      # the table in RESULTS.md
    python -m bench.memory_bench --preset families           # one point per model family
    python -m bench.memory_bench --models 0.5B --seq-lens 128 256 --methods mesp autodiff
    python -m bench.memory_bench --config-json tiny.json --seq-lens 16 --ranks

Each (model, T, r, method) point runs in a fresh subprocess (bench.point); a point that
fails, runs out of memory or times out is kept as a row with its status. Rows are
appended to --results, stamped with commit, date and host; --resume skips points already
there. The section is printed; `python -m bench.report` puts it in bench/RESULTS.md.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import common, memory_tables, point

RESULTS = common.RESULTS / "memory_bench.jsonl"
FAMILIES = common.RESULTS / "families.jsonl"
DEFAULT_METHODS = ("autodiff", "mebp", "mesp", "mezo", "mlx-lm", "mlx-lm+ckpt")
SHORT = {"0.5B": "Qwen2.5-0.5B", "1.5B": "Qwen2.5-1.5B", "3B": "Qwen2.5-3B"}
KEY = ("model", "dtype", "T", "r", "method")
ALL_METHODS_FULL = ("mesp", "mebp", "autodiff", "mezo", "mlx-lm", "mlx-lm+ckpt",
                    "mesp@block", "mesp@none")
FAMILY_MODELS = ("SmolLM2-360M", "Qwen3-0.6B", "gemma-3-1b", "Llama-3.2-1B")
FAMILY_METHODS = ("mesp", "mebp", "autodiff", "mlx-lm", "mlx-lm+ckpt")
TITLES = {"full": "Memory and speed against autodiff and mlx-lm",
          "families": "Model families"}


def model_name(name):
    from mesp_mlx.models.configs import config_for
    name = SHORT.get(name, name)
    config_for(name)                                  # clear ValueError if unknown
    return name


def _sweep(kind, title, models, Ts, rs, methods):
    pts = [dict(model=m, T=T, r=r, method=x)
           for m in models for T in Ts for r in rs for x in methods]
    return dict(kind=kind, title=title, points=pts)


def preset_grid(methods):
    """0.5B: T sweep × all methods, rank sweep × ours; 1.5B and 3B at T 256."""
    small, ours = "Qwen2.5-0.5B", [m for m in methods if m in ("mesp", "mebp", "autodiff")]
    return [
        _sweep("seq", f"Sequence length ({small}, r 8)", [small],
               [128, 256, 512, 1024], [8], methods),
        _sweep("rank", f"LoRA rank ({small}, T 256)", [small], [256],
               [4, 8, 16, 32], ours),
        _sweep("size", "Model size (T 256, r 8)", list(SHORT.values()), [256], [8],
               methods),
    ]


def preset_full(methods):
    """The grid plus the cache-policy sweep: everything the RESULTS.md table holds."""
    small = "Qwen2.5-0.5B"
    order = [m for m in ALL_METHODS_FULL if m in methods]       # table column order
    seq, rank, size = preset_grid([m for m in order if m in DEFAULT_METHODS])
    cache = _sweep("cache", f"Checkpointed baseline and cache policy ({small}, T 256, r 8)",
                   [small], [256], [8],
                   [m for m in ("mesp", "mesp@block", "mesp@none", "mlx-lm+ckpt")
                    if m in methods])
    return [seq, cache, rank, size]


def preset_families(methods):
    """One point per family at T 256, r 8 on every block linear."""
    return [_sweep("family", "Families (T 256, r 8 on every block linear, batch 1)",
                   list(FAMILY_MODELS), [256], [8],
                   [m for m in FAMILY_METHODS if m in methods])]


PRESETS = {"grid": preset_grid, "full": preset_full, "families": preset_families}


def build_sweeps(args, methods):
    if args.preset:
        return PRESETS[args.preset](methods)
    models = args.models + args.json_models
    if not models:
        raise SystemExit("error: no models: give --models and/or --config-json")
    sweeps = [_sweep("seq", f"Sequence length ({m}, r {args.rank})", [m],
                     args.seq_lens, [args.rank], methods) for m in models]
    if args.ranks:
        m = models[0]
        sweeps.append(_sweep("rank", f"LoRA rank ({m}, T {args.rank_seq_len})", [m],
                             [args.rank_seq_len], args.ranks,
                             args.rank_methods or methods))
    return sweeps


def key_of(row, dtype=None):
    return tuple(row.get(k) if k != "dtype" or dtype is None else dtype for k in KEY)


def run_point(spec, timeout):
    """Run one point in a fresh process; always returns a row with a status."""
    cmd = [sys.executable, "-m", "bench.point", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env=common.subprocess_env())
    except subprocess.TimeoutExpired:
        res = {"status": "timeout", "error": f"no result within {timeout:.0f} s"}
    else:
        lines = [l for l in p.stdout.splitlines() if l.startswith(point.RESULT_PREFIX)]
        if lines:
            res = json.loads(lines[-1][len(point.RESULT_PREFIX):])
        else:
            tail = " / ".join(p.stderr.strip().splitlines()[-2:])
            killed = p.returncode < 0
            res = {"status": "killed" if killed else "error",
                   "error": (f"signal {-p.returncode} (OOM killer?) " if killed
                             else f"exit {p.returncode} ") + tail}
    spec = {k: v for k, v in spec.items() if k != "config"}
    return {**spec, **res, "wall_s": round(time.perf_counter() - t0, 2),
            "time": common.now()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=list(PRESETS),
                   help="a predefined grid (grid: T, rank and model-size sweeps; full: the "
                        "grid plus the cache-policy sweep, the RESULTS.md table; families: "
                        "Qwen3/Llama 3.2/gemma 3/SmolLM2 at T 256, rows in "
                        "bench/results/families.jsonl unless --results is given)")
    p.add_argument("--models", nargs="*", default=None,
                   help="bundled architectures: 0.5B, 1.5B, 3B or Qwen2.5-* "
                        "(default: 0.5B unless --config-json is given)")
    p.add_argument("--config-json", nargs="*", default=[], metavar="PATH",
                   help="extra models from qwen2 config.json files (label = file stem)")
    p.add_argument("--seq-lens", nargs="*", type=int, default=[128, 256, 512, 1024])
    p.add_argument("--rank", type=int, default=8, help="rank of the T sweeps")
    p.add_argument("--ranks", nargs="*", type=int, default=[4, 8, 16, 32],
                   help="rank sweep on the first model (empty: none)")
    p.add_argument("--rank-seq-len", type=int, default=256)
    p.add_argument("--rank-methods", nargs="*", default=None)
    p.add_argument("--methods", nargs="*", default=None,
                   help=f"any of {', '.join(point.ALL_METHODS)} "
                        "(default: all; with --preset: a filter)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--steps", type=int, default=1, help="warm steps to average")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per point")
    p.add_argument("--no-mlx-lm-compile", action="store_true",
                   help="run the mlx-lm baselines without the trainer's mx.compile")
    p.add_argument("--results", type=Path, default=None,
                   help="rows file (default: bench/results/memory_bench.jsonl; "
                        "families.jsonl for --preset families)")
    p.add_argument("--resume", action="store_true",
                   help="skip points already in --results (any status)")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume: rerun points whose last row is not ok")
    p.add_argument("--dry-run", action="store_true", help="list the points and exit")
    args = p.parse_args(argv)
    if args.results is None:
        args.results = FAMILIES if args.preset == "families" else RESULTS
    _validate(p, args)
    return args


def _validate(p, args):
    for m in (args.methods or []) + (args.rank_methods or []):
        if m not in point.ALL_METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(point.ALL_METHODS)}")
    if min(args.seq_lens + args.ranks + [args.rank, args.rank_seq_len, args.steps],
           default=1) < 1:
        p.error("sequence lengths, ranks and --steps must be >= 1")
    args.json_models, args.configs = [], {}
    for path in map(Path, args.config_json):
        try:
            args.configs[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"--config-json {path}: {e}")
        args.json_models.append(path.stem)
    if args.models is None:
        args.models = [] if args.config_json else ["Qwen2.5-0.5B"]
    try:
        args.models = [model_name(m) for m in args.models]
    except ValueError as e:
        p.error(str(e))


def render(title, sweeps, rows, dtype="float32", reproduce=None) -> str:
    """The section for `sweeps` from `rows` (the newest row per point wins)."""
    last = {key_of(r): r for r in rows}

    def rows_for(sweep):
        return [last.get(key_of(pt, dtype), {**pt, "status": "missing"})
                for pt in sweep["points"]]
    return memory_tables.section(title, sweeps, rows_for, reproduce)


def section(rows) -> str:
    """The RESULTS.md section of the full grid."""
    return render(TITLES["full"], preset_full(ALL_METHODS_FULL), rows,
                  reproduce="python -m bench.memory_bench --preset full")


def families_section(rows) -> str:
    """The RESULTS.md section of the model families."""
    return render(TITLES["families"], preset_families(FAMILY_METHODS), rows,
                  reproduce="python -m bench.memory_bench --preset families")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    methods = args.methods or list(ALL_METHODS_FULL if args.preset == "full" else
                                   FAMILY_METHODS if args.preset == "families"
                                   else DEFAULT_METHODS)
    sweeps = build_sweeps(args, methods)
    points = list({key_of(pt, args.dtype): pt for s in sweeps for pt in s["points"]}.values())
    if args.dry_run:
        todo = _todo(args, points)
        for pt in todo:
            print(json.dumps(pt))
        print(f"{len(points)} points" + (f", {len(todo)} to run" if args.resume else ""))
        return 0
    _run_all(args, points, common.environment(common.command(__spec__.name, argv)))
    print(render(TITLES.get(args.preset, "Memory and speed"), sweeps,
                 common.load_rows(args.results), args.dtype))
    common.wrote(args.results)
    return 0


def _todo(args, points):
    """The points still to run (all of them unless --resume)."""
    done = {}
    if args.resume:
        for r in common.load_rows(args.results):
            done[key_of(r)] = r.get("status")
    return [pt for pt in points if key_of(pt, args.dtype) not in done
            or (args.retry_failed and done[key_of(pt, args.dtype)] != "ok")]


def _run_all(args, points, env):
    todo = _todo(args, points)
    print(f"{len(points)} points, {len(points) - len(todo)} already done, "
          f"{len(todo)} to run", flush=True)
    t_start = time.perf_counter()
    for i, pt in enumerate(todo, 1):
        spec = dict(pt, dtype=args.dtype, scale=args.scale, steps=args.steps,
                    seed=args.seed, mlx_lm_compile=not args.no_mlx_lm_compile,
                    config=args.configs.get(pt["model"]))
        row = common.append_row(args.results, run_point(spec, args.timeout), env)
        elapsed = time.perf_counter() - t_start
        what = (f"peak above weights {common.mb(row['peak_above_bytes'])} MB, "
                f"{row['s_per_step']:.2f} s/step" if row["status"] == "ok"
                else row.get("error", ""))
        print(f"[{i}/{len(todo)} {elapsed:.0f}s] {pt['model']} T={pt['T']} r={pt['r']} "
              f"{pt['method']}: {row['status']} {what} ({row['wall_s']:.0f}s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
