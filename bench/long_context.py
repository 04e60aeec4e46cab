"""Long-context benchmark (issue 12): mesp's peak at T 1024-8192, checkpoints in memory
and on disk, one fresh process per point (bench_point.py), rows in long_context.jsonl.

    python bench/long_context.py                      # the grid below, then the table
    python bench/long_context.py --only full          # only the full-depth points
    python bench/long_context.py --render-only
    python bench/long_context.py --only full --again --methods mesp mesp@disk   # remeasure
    python bench/long_context.py --only lines --again --models Qwen2.5-0.5B

A full-depth step of Qwen2.5-0.5B at T 8192 takes about an hour on this 2-core CPU,
so the long points are measured at 2 and 4 of the model's real blocks (real widths,
heads, vocabulary) and the full depth is the straight line through them: the
checkpoints and the LoRA gradients grow by one block's worth per block, the
per-block working set does not. The rows measured at full depth (T 1024, 2048)
check that line against a real full-depth peak. MB = 2^20 bytes.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import bench_report  # noqa: E402
import memory_bench  # noqa: E402

MB = 2**20
JSON = HERE / "long_context.jsonl"
Q05, Q15, Q3 = "Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-3B"
# (model, T, method, layers or None = all, steps; 0 = the first step alone)
FULL = [(Q05, 1024, "mesp", None, 1), (Q05, 1024, "mesp@disk", None, 1),
        (Q05, 1024, "autodiff", None, 1),
        (Q05, 2048, "mesp", None, 0), (Q05, 2048, "mesp@disk", None, 0),
        (Q05, 2048, "autodiff", None, 0),
        (Q05, 1024, "mlx-lm", None, 1), (Q05, 1024, "mlx-lm+ckpt", None, 1),
        (Q05, 2048, "mlx-lm", None, 0), (Q05, 2048, "mlx-lm+ckpt", None, 0)]
LINES = [(m, T, meth, L, 0) for m, T in ((Q05, 2048), (Q05, 4096), (Q05, 8192),
                                          (Q15, 4096), (Q3, 4096))
         for meth in ("mesp", "mesp@disk") for L in (2, 4)]
# autodiff at T >= 4096 is not run: its estimate is over this machine's 24 GB
NOT_RUN = [(m, T, meth) for m, T in ((Q05, 4096), (Q05, 8192), (Q15, 4096), (Q3, 4096))
           for meth in ("autodiff", "mlx-lm")]


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


def load():
    rows = {}
    if JSON.exists():
        for line in JSON.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[key(r)] = r
    return rows


def run(points, timeout, again=False):
    """Measure the points without an ok row (every point with `again`: the newest row
    of a point is the one rendered, the older ones stay in the file)."""
    done = load()
    for i, pt in enumerate(points, 1):
        spec = spec_of(*pt)
        if not again and key(spec) in done and done[key(spec)].get("status") == "ok":
            continue
        t0 = time.time()
        row = dict(memory_bench.run_point(spec, timeout), commit=bench_report.git_commit())
        with JSON.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{i}/{len(points)}] {pt}: {row.get('status')} "
              f"{(row.get('peak_above_bytes') or 0) / MB:.1f} MB, "
              f"{row.get('s_per_step', 0):.1f} s/step ({time.time() - t0:.0f} s)",
              flush=True)


def run_ab(tree, pairs, timeout):
    """Time at T 1024: this tree's mesp against an older checkout's (`tree`),
    alternating old, new, old, new, … in this one run; rows tagged ab=old/new."""
    import subprocess
    for k in range(pairs):
        for which in ("old", "new"):
            spec = spec_of(Q05, 1024, "mesp", None, 2)
            cmd = [sys.executable, str(Path(tree if which == "old" else HERE.parent) /
                                       "bench" / "memory_bench.py"), "--worker",
                   json.dumps(spec)]
            env = dict(os.environ, PYTHONPATH=str(tree if which == "old" else HERE.parent))
            t0 = time.time()
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            line = [x for x in p.stdout.splitlines() if x.startswith("MEMORY_BENCH_RESULT ")]
            row = json.loads(line[-1].split(" ", 1)[1]) if line else \
                {"status": "error", "error": p.stderr[-300:]}
            spec.pop("config")
            row = {**spec, **row, "ab": which, "ab_pair": k, "tree": str(tree),
                   "tree_commit": subprocess.run(
                       ["git", "-C", str(tree if which == "old" else HERE.parent),
                        "rev-parse", "--short=12", "HEAD"], capture_output=True,
                       text=True).stdout.strip()}
            with (HERE / "long_context_ab.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"A/B {which} #{k}: {row.get('status')} steps {row.get('step_times_s')} "
                  f"({time.time() - t0:.0f} s)", flush=True)


def ab_lines():
    path = HERE / "long_context_ab.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    best = {w: [min(r["step_times_s"]) for r in rows if r.get("ab") == w and
                r.get("status") == "ok"] for w in ("old", "new")}
    peak = {w: [r["peak_above_bytes"] for r in rows if r.get("ab") == w and
                r.get("status") == "ok"] for w in ("old", "new")}
    if not best["old"] or not best["new"]:
        return []
    lo, hi = min(best["new"]) / max(best["old"]), max(best["new"]) / min(best["old"])
    pair = {(r["ab_pair"], r["ab"]): min(r["step_times_s"]) for r in rows
            if r.get("status") == "ok" and "ab_pair" in r}
    per_pair = [pair[k, "new"] / pair[k, "old"] for k in sorted({k for k, _ in pair})
                if (k, "new") in pair and (k, "old") in pair]
    return ["", f"Time at T 1024 (Qwen2.5-0.5B, full depth), this commit's mesp against "
            f"the mesp of commit {rows[0].get('tree_commit') or rows[0]['tree']} (before "
            f"the token-chunked block), "
            f"alternated in one run ({len(best['new'])} pairs, fastest of 2 warm steps "
            f"each): new {min(best['new']):.1f} s, before {min(best['old']):.1f} s, "
            f"ratio {min(best['new']) / min(best['old']):.3f} (per pair: "
            f"{', '.join(f'{q:.3f}' for q in per_pair)}; extremes {lo:.2f}–{hi:.2f}); "
            f"peak above weights {max(peak['new']) / MB:.1f} MB vs "
            f"{max(peak['old']) / MB:.1f} MB."]


def fit_lines(rows, env):
    """Least-squares peak-above-weights(T) = a + b·T over the 0.5B full-depth values
    (measured or line) at T ≥ 2048, and the longest T the 8 GB profiles allow (SGD:
    no optimizer state; + fp32 weights, LoRA and the idle-MLX runtime): an
    extrapolation of the fit, not a measurement."""
    from mesp_mlx.models.configs import config_for
    from mesp_mlx.memory.estimate import arch_from_config
    from mesp_mlx.memory.footprint import runtime_bytes
    from mesp_mlx.memory.profiles import DEVICE_PROFILES
    out = ["", "Fit of the 0.5B peak above weights over T (T 2048-8192, full depth), and "
           "the longest T it implies for the 8 GB profiles (SGD, fp32 weights + LoRA + "
           "the measured runtime of this process outside MLX; an extrapolation of the "
           "fit, not a measurement):", "",
           "| checkpoints | fit (MB) | macbook-air-8gb | ipad-8gb |", "|---|---|---:|---:|"]
    a05 = arch_from_config(config_for(Q05))
    fixed = a05.weight_bytes + a05.lora_bytes + runtime_bytes()
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


def line_through(rows, model, T, method):
    """Peak above weights at full depth from the 2- and 4-block points (a, b: a + b·L)."""
    p2, p4 = (rows.get((model, T, method, L)) for L in (2, 4))
    if not (p2 and p4 and p2.get("status") == p4.get("status") == "ok"):
        return None
    b = (p4["peak_above_bytes"] - p2["peak_above_bytes"]) / 2
    a = p2["peak_above_bytes"] - 2 * b
    return a + b * p2["full_layers"], b


def render(rows, env):
    out = ["## Long context (issue 12)", "",
           "fp32, LoRA r 8 on all 7 projections, batch 1, random weights; peak above "
           "weights = MLX peak − resident weights (MB = 2^20 bytes). *measured*: the real "
           "model at full depth. *line*: measured at 2 and 4 of its real blocks, full "
           "depth from the straight line through them (per block: one checkpoint "
           "B·T·D·4 in memory, the LoRA gradients). s/step is the measured step "
           "(full depth only; a line row's time is not extrapolated).", "",
           "| model | T | method | peak above weights MB | how | s/step | status |",
           "|---|---:|---|---:|---|---:|---|"]
    cells = []
    for model, T, method, L, _ in FULL:
        r = rows.get((model, T, method, spec_of(model, T, method, L, 0)["layers"]))
        cells.append((model, T, method, r, "measured"))
    for model, T in [(Q05, 2048), (Q05, 4096), (Q05, 8192), (Q15, 4096), (Q3, 4096)]:
        for method in ("mesp", "mesp@disk"):
            lt = line_through(rows, model, T, method)
            cells.append((model, T, method, lt, "line"))
    for model, T, method in NOT_RUN:
        cells.append((model, T, method, None, "OOM"))
    for model, T, method, r, how in cells:
        name = method.replace("mesp@disk", "mesp, checkpoints on disk").replace(
            "mlx-lm+ckpt", "mlx-lm, grad_checkpoint")
        if how == "measured":
            ok = r is not None and r.get("status") == "ok"
            out.append(f"| {model} | {T} | {name} | "
                       f"{r['peak_above_bytes'] / MB:.1f} | measured | "
                       f"{r['s_per_step']:.1f} | {r['status']}"
                       f"{' (first step)' if r.get('cold') else ''} |" if ok else
                       f"| {model} | {T} | {name} | | measured | | "
                       f"{(r or {}).get('status', 'missing')} |")
        elif how == "line":
            out.append(f"| {model} | {T} | {name} | {r[0] / MB:.1f} | line "
                       f"(+{r[1] / MB:.1f} per block) | | ok |" if r else
                       f"| {model} | {T} | {name} | | line | | missing |")
        else:
            out.append(f"| {model} | {T} | {name} | | not run | | OOM: estimated "
                       "over this machine's 24 GB |")
    out += ab_lines()
    out += fit_lines(rows, env)
    out += ["", bench_report.environment_line(env), ""]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["full", "lines"], default=None)
    p.add_argument("--render-only", action="store_true")
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
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = p.parse_args(argv)
    if args.ab_tree is not None:
        run_ab(args.ab_tree.resolve(), args.ab_pairs, args.timeout)
    elif not args.render_only:
        pts = (FULL if args.only != "lines" else []) + (LINES if args.only != "full" else [])
        pts = [pt for pt in pts if (args.methods is None or pt[2] in args.methods)
               and (args.models is None or pt[0] in args.models)]
        run(pts, args.timeout, args.again)
    env = bench_report.collect_env("float32")
    env["command"] = ("python bench/long_context.py --only full; python bench/long_context.py "
                      "--only lines; python bench/long_context.py --ab-tree <a checkout of "
                      "the older commit> (the time comparison); this render: python "
                      "bench/long_context.py " + " ".join(argv or sys.argv[1:]))
    bench_report.write_section(args.out, render(load(), env),
                               "<!-- long_context:start -->", "<!-- long_context:end -->")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
