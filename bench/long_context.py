"""Long context: mesp's peak at T 1024-8192, checkpoints in memory and on disk, one
fresh process per point, against autodiff and mlx-lm where they fit.

    python -m bench.long_context                      # the grid below
    python -m bench.long_context --only full          # only the full-depth points
    python -m bench.long_context --only full --again --methods mesp mesp@disk   # remeasure
    python -m bench.long_context --ab-tree ../old     # mesp's time against an older checkout

A full-depth step at T 8192 is slow on a small CPU, so the long points are measured at 2
and 4 of the model's real blocks (real widths, heads, vocabulary) and the full depth is
the straight line through them: the checkpoints and the LoRA gradients grow by one
block's worth per block, the per-block working set does not. The rows measured at full
depth (T 1024, 2048) check that line against a real full-depth peak.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import common
from bench.memory_bench import run_point
from bench.point import RESULT_PREFIX

RESULTS = common.RESULTS / "long_context.jsonl"
MB = common.MB
Q05, Q15, Q3 = "Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-3B"
# (model, T, method, layers or None = all, steps; 0 = the first step alone)
FULL = [(Q05, 1024, "mesp", None, 1), (Q05, 1024, "mesp@disk", None, 1),
        (Q05, 1024, "autodiff", None, 1),
        (Q05, 2048, "mesp", None, 0), (Q05, 2048, "mesp@disk", None, 0),
        (Q05, 2048, "autodiff", None, 0),
        (Q05, 1024, "mlx-lm", None, 1), (Q05, 1024, "mlx-lm+ckpt", None, 1),
        (Q05, 2048, "mlx-lm", None, 0), (Q05, 2048, "mlx-lm+ckpt", None, 0)]
LINE_POINTS = ((Q05, 2048), (Q05, 4096), (Q05, 8192), (Q15, 4096), (Q3, 4096))
LINES = [(m, T, meth, L, 0) for m, T in LINE_POINTS
         for meth in ("mesp", "mesp@disk") for L in (2, 4)]
# autodiff at T >= 4096 is not run: its estimate is over the measuring machine's 24 GB
NOT_RUN = [(m, T, meth) for m, T in ((Q05, 4096), (Q05, 8192), (Q15, 4096), (Q3, 4096))
           for meth in ("autodiff", "mlx-lm")]
AB = dict(model=Q05, T=1024, method="mesp")            # the A/B point, full depth


def spec_of(model, T, method, layers, steps):
    from mesp_mlx.models.configs import config_for
    cfg = config_for(model)
    full = cfg["num_hidden_layers"]
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return dict(model=model, T=T, r=8, method=method, layers=layers or full,
                full_layers=full, steps=steps, dtype="float32", scale=20.0, seed=0,
                config=cfg)


def key(r):
    return (r["model"], r["T"], r["method"], r["layers"])


def points(rows):
    """The newest row per grid point (A/B rows excluded)."""
    return {key(r): r for r in rows if "ab" not in r}


def run(points_, env, timeout, again=False, results=RESULTS):
    """Measure the points without an ok row (every point with `again`: the newest row
    of a point is the one rendered)."""
    done = points(common.load_rows(results))
    for i, pt in enumerate(points_, 1):
        spec = spec_of(*pt)
        if not again and done.get(key(spec), {}).get("status") == "ok":
            continue
        t0 = time.time()
        row = common.append_row(results, run_point(spec, timeout), env)
        print(f"[{i}/{len(points_)}] {pt}: {row.get('status')} "
              f"{common.mb(row.get('peak_above_bytes') or 0)} MB, "
              f"{row.get('s_per_step', 0):.1f} s/step ({time.time() - t0:.0f} s)",
              flush=True)


def _worker(tree: Path, spec: dict):
    """The command and environment that measure `spec` with the checkout at `tree`."""
    env = dict(common.subprocess_env(), PYTHONPATH=str(tree))
    if (tree / "bench" / "point.py").exists():
        return [sys.executable, "-m", "bench.point", json.dumps(spec)], env
    # a checkout from before bench/ was a package: its worker is memory_bench.py
    return [sys.executable, str(tree / "bench" / "memory_bench.py"), "--worker",
            json.dumps(spec)], env


def run_ab(tree, pairs, env, timeout, results=RESULTS):
    """mesp at T 1024, full depth: an older checkout (`tree`) against this one,
    alternating old, new, old, new, … in one run; rows tagged ab = old/new."""
    for k in range(pairs):
        for which, root in (("old", tree), ("new", common.ROOT)):
            spec = spec_of(AB["model"], AB["T"], AB["method"], None, 2)
            cmd, penv = _worker(root, spec)
            t0 = time.time()
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=penv)
            line = [x for x in p.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
            row = json.loads(line[-1][len(RESULT_PREFIX):]) if line else \
                {"status": "error", "error": p.stderr[-300:]}
            spec.pop("config")
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12",
                                     "HEAD"], capture_output=True, text=True).stdout.strip()
            row = {**spec, **row, "ab": which, "ab_pair": k, "time": common.now(),
                   "commit": commit or None,
                   "dirty": env["dirty"] if which == "new" else None}
            row = common.append_row(results, row, env)
            print(f"A/B {which} #{k}: {row.get('status')} steps {row.get('step_times_s')} "
                  f"({time.time() - t0:.0f} s)", flush=True)


def ab_run(rows) -> list:
    """The rows of the newest A/B run: from its first (old, pair 0) row on."""
    starts = [i for i, r in enumerate(rows) if r.get("ab") == "old" and r.get("ab_pair") == 0]
    return [r for r in rows[starts[-1]:] if "ab" in r] if starts else []


def ab_lines(rows):
    """A table of the newest A/B run, and its ratio per pair."""
    run_ = [r for r in ab_run(rows) if r.get("status") == "ok"]
    best = {(r["ab_pair"], r["ab"]): min(r["step_times_s"]) for r in run_}
    pairs = sorted({k for k, w in best if (k, "old") in best and (k, "new") in best})
    if not pairs:
        return []
    body = []
    for which, name in (("old", "older (baseline)"), ("new", "newer (the one that ran it)")):
        rs = [r for r in run_ if r["ab"] == which]
        body.append([name, rs[0].get("commit") or "not recorded",
                     ", ".join(f"{best[k, which]:.1f}" for k in pairs),
                     common.mb(max(r["peak_above_bytes"] for r in rs))])
    q = min(best[k, "new"] for k in pairs) / min(best[k, "old"] for k in pairs)
    per = ", ".join(f"{best[k, 'new'] / best[k, 'old']:.3f}" for k in pairs)
    return (["", f"### Time against an older checkout (`--ab-tree`), {AB['model']} "
             f"T {AB['T']}, full depth", "",
             f"mesp of both checkouts alternated in one run ({len(pairs)} pair"
             f"{'s' * (len(pairs) > 1)}, fastest of "
             "2 warm steps each); baseline: the older checkout.", ""]
            + common.table(["checkout", "commit", "fastest s/step per pair",
                            "peak above weights MB"], body, "llrr")
            + ["", f"Time ratio newer / older: {q:.3f} (per pair: {per})."])


def line_through(rows, model, T, method):
    """Peak above weights at full depth from the 2- and 4-block points (a, b: a + b·L)."""
    p2, p4 = (rows.get((model, T, method, L)) for L in (2, 4))
    if not (p2 and p4 and p2.get("status") == p4.get("status") == "ok"):
        return None
    b = (p4["peak_above_bytes"] - p2["peak_above_bytes"]) / 2
    a = p2["peak_above_bytes"] - 2 * b
    return a + b * p2["full_layers"], b


def _runtime(rows):
    """The worker's resident bytes outside MLX before the step (RSS − MLX's resident
    bytes) at the 0.5B full-depth mesp point, or None."""
    for T in (1024, 2048):
        r = rows.get((Q05, T, "mesp", 24))
        if r and r.get("status") == "ok" and r.get("rss_before_bytes"):
            return r["rss_before_bytes"] - r["weights_bytes"]
    return None


def fit_lines(rows):
    """Least-squares peak-above-weights(T) = a + b·T over the 0.5B full-depth values
    (measured or line) at T ≥ 2048, and the longest T it allows within the 8 GB
    profiles: an extrapolation of the fit, not a measurement."""
    from mesp_mlx.memory.estimate import arch_from_config
    from mesp_mlx.memory.profiles import DEVICE_PROFILES
    from mesp_mlx.models.configs import config_for
    runtime = _runtime(rows)
    out = ["", "### Fit over T, and the longest T on an 8 GB device", "",
           "Fit of the 0.5B peak above weights over T (T 2048-8192, full depth), and the "
           "longest T it implies for the 8 GB profiles (SGD, fp32 weights + LoRA + the "
           "worker's resident bytes outside MLX, "
           + (f"{common.mb(runtime)} MB" if runtime else "not measured: 0")
           + "; an extrapolation of the fit, not a measurement):", "",
           "| checkpoints | fit (MB) | macbook-air-8gb | ipad-8gb |", "|---|---|---:|---:|"]
    a05 = arch_from_config(config_for(Q05))
    fixed = a05.weight_bytes + a05.lora_bytes + (runtime or 0)
    for method in ("mesp", "mesp@disk"):
        pts = []
        for T in (2048, 4096, 8192):
            r = rows.get((Q05, T, method, 24))
            v = r["peak_above_bytes"] if r and r.get("status") == "ok" else None
            if v is None:
                lt = line_through(rows, Q05, T, method)
                v = lt[0] if lt else None
            if v is not None:
                pts.append((T, v))
        if len(pts) < 2:
            continue
        n = len(pts)
        mt, mv = sum(t for t, _ in pts) / n, sum(v for _, v in pts) / n
        b = sum((t - mt) * (v - mv) for t, v in pts) / sum((t - mt) ** 2 for t, _ in pts)
        a = mv - b * mt
        cells, limit = [], config_for(Q05)["max_position_embeddings"]
        for prof in ("macbook-air-8gb", "ipad-8gb"):
            room = DEVICE_PROFILES[prof].budget_bytes - fixed - a
            t = int(room / b) // 256 * 256 if room > 0 else 0
            cells.append("none" if t == 0 else f"{t:,}" + (
                f" (the model stops at {limit:,})" if t > limit else ""))
        out.append(f"| {'on disk' if method.endswith('disk') else 'in memory'} | "
                   f"{a / MB:.1f} + {b * 1024 / MB:.3f}·T/1024 | {cells[0]} | {cells[1]} |")
    a3 = arch_from_config(config_for(Q3))
    out += ["", f"Qwen2.5-3B in fp32 fits neither profile at any T: its weights alone are "
            f"{a3.weight_bytes / 1e9:.1f} GB (4-bit: see `python -m mesp_mlx.memory "
            f"--model Qwen2.5-3B-4bit --device-profile ipad-8gb --find max-seq-length`, "
            f"an estimate)."]
    return out


def _cells():
    """(model, T, method, how) for every row of the table, in order."""
    cells = [(m, T, meth, "measured") for m, T, meth, _, _ in FULL]
    cells += [(m, T, meth, "line") for m, T in LINE_POINTS for meth in ("mesp", "mesp@disk")]
    return cells + [(m, T, meth, "OOM") for m, T, meth in NOT_RUN]


def section(all_rows) -> str:
    rows = points(all_rows)
    out = ["## Long context", "",
           "fp32, LoRA r 8 on all 7 projections, batch 1, random weights; peak above "
           "weights = MLX peak − resident weights. *measured*: the real model at full "
           "depth. *line*: measured at 2 and 4 of its real blocks, full depth from the "
           "straight line through them (per block: one checkpoint B·T·D·4 in memory, the "
           "LoRA gradients). s/step is the measured step (full depth only; a line row's "
           "time is not extrapolated). Baselines: autodiff and mlx-lm (with and without "
           "its `grad_checkpoint`) at full depth where they fit.", "",
           "| model | T | method | peak above weights MB | how | s/step | status |",
           "|---|---:|---|---:|---|---:|---|"]
    used = []
    for model, T, method, how in _cells():
        name = method.replace("mesp@disk", "mesp, checkpoints on disk").replace(
            "mlx-lm+ckpt", "mlx-lm, grad_checkpoint")
        if how == "measured":
            r = rows.get((model, T, method, spec_of(model, T, method, None, 0)["layers"]))
            used += [r] if r else []
            ok = r is not None and r.get("status") == "ok"
            out.append(f"| {model} | {T} | {name} | {common.mb(r['peak_above_bytes'])} | "
                       f"measured | {r['s_per_step']:.1f} | ok"
                       f"{' (first step)' if r.get('cold') else ''} |" if ok else
                       f"| {model} | {T} | {name} | | measured | | "
                       f"{common.status(r) if r else 'missing'} |")
        elif how == "line":
            lt = line_through(rows, model, T, method)
            used += [rows[model, T, method, L] for L in (2, 4) if (model, T, method, L) in rows]
            out.append(f"| {model} | {T} | {name} | {lt[0] / MB:.1f} | line "
                       f"(+{lt[1] / MB:.1f} per block) | | ok |" if lt else
                       f"| {model} | {T} | {name} | | line | | missing |")
        else:
            out.append(f"| {model} | {T} | {name} | | not run | | OOM: estimated "
                       "over the measuring machine's 24 GB |")
    out += fit_lines(rows)
    out += ["", common.footer(used, reproduce="python -m bench.long_context")]
    ab = ab_lines(all_rows)
    if ab:
        out += ab + ["", common.footer(ab_run(all_rows), reproduce="python -m "
                                       "bench.long_context --ab-tree <an older checkout>")]
    return "\n".join(out + [""])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["full", "lines"], default=None)
    p.add_argument("--again", action="store_true",
                   help="measure points that already have a row again")
    p.add_argument("--methods", nargs="*", default=None,
                   help="only these methods (e.g. mesp mesp@disk)")
    p.add_argument("--models", nargs="*", default=None,
                   help="only these models (e.g. Qwen2.5-0.5B)")
    p.add_argument("--ab-tree", type=Path, default=None,
                   help="an older checkout: time its mesp at T 1024 against this one's")
    p.add_argument("--ab-pairs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=5400)
    args = p.parse_args(argv)
    env = common.environment(common.command(__spec__.name, argv))
    if args.ab_tree is not None:
        run_ab(args.ab_tree.resolve(), args.ab_pairs, env, args.timeout)
    else:
        pts = (FULL if args.only != "lines" else []) + (LINES if args.only != "full" else [])
        pts = [pt for pt in pts if (args.methods is None or pt[2] in args.methods)
               and (args.models is None or pt[0] in args.models)]
        run(pts, env, args.timeout, args.again)
    print(section(common.load_rows(RESULTS)))
    common.wrote(RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
