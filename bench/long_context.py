"""Long-context benchmark (issue 12): mesp's peak at T 1024-8192, checkpoints in memory
and on disk, one fresh process per point (bench_point.py), rows in long_context.jsonl.

    python bench/long_context.py                      # the grid below, then the table
    python bench/long_context.py --only full          # only the full-depth points
    python bench/long_context.py --render-only

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
FULL = [(Q05, 1024, "mesp", None, 2), (Q05, 1024, "mesp@disk", None, 2),
        (Q05, 1024, "autodiff", None, 1),
        (Q05, 2048, "mesp", None, 1), (Q05, 2048, "mesp@disk", None, 1),
        (Q05, 2048, "autodiff", None, 0)]
LINES = [(m, T, meth, L, 0) for m, T in ((Q05, 2048), (Q05, 4096), (Q05, 8192),
                                          (Q15, 4096), (Q3, 4096))
         for meth in ("mesp", "mesp@disk") for L in (2, 4)]
# autodiff at T >= 4096 is not run: its estimate is over this machine's 24 GB
NOT_RUN = [(Q05, 4096, "autodiff"), (Q05, 8192, "autodiff"), (Q15, 4096, "autodiff"),
           (Q3, 4096, "autodiff")]


def spec_of(model, T, method, layers, steps):
    from mesp_mlx.arch import config_for
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


def run(points, timeout):
    done = load()
    for i, pt in enumerate(points, 1):
        spec = spec_of(*pt)
        if key(spec) in done and done[key(spec)].get("status") == "ok":
            continue
        t0 = time.time()
        row = memory_bench.run_point(spec, timeout)
        with JSON.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{i}/{len(points)}] {pt}: {row.get('status')} "
              f"{(row.get('peak_above_bytes') or 0) / MB:.1f} MB, "
              f"{row.get('s_per_step', 0):.1f} s/step ({time.time() - t0:.0f} s)",
              flush=True)


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
        name = method.replace("mesp@disk", "mesp, checkpoints on disk")
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
    out += ["", bench_report.environment_line(env), ""]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["full", "lines"], default=None)
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--timeout", type=float, default=5400)
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = p.parse_args(argv)
    if not args.render_only:
        pts = (FULL if args.only != "lines" else []) + (LINES if args.only != "full" else [])
        run(pts, args.timeout)
    env = bench_report.collect_env("float32")
    env["command"] = "python bench/long_context.py" + (" " + " ".join(argv or sys.argv[1:]))
    bench_report.write_section(args.out, render(load(), env),
                               "<!-- long_context:start -->", "<!-- long_context:end -->")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
