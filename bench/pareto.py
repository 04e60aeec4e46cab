"""Memory against time for mesp's activation budget (issue 13), one process per point.

    python bench/pareto.py                        # Qwen2.5-0.5B at T 256
    python bench/pareto.py --models 0.5B 3B --seq-lens 256 1024
    python bench/pareto.py --render-only

For each (model, T): autodiff, then mesp with EngineOptions(activation_budget =
f × autodiff's measured extra memory) for f in 0, 1/16, 1/4, 1/2, 1 (1/16: a plan
that keeps only some blocks, where 1/4 already keeps all), 2 GB at 0.5B T 256 (the
issue's absolute budget), budget 0 with one token chunk at 3B T 256 (what the
default's chunks cost in time and save in memory), then autodiff again (so every ratio
has an autodiff step on each side). Each point times `--steps` warm steps after a
warm-up; a row's time is its fastest step, and a ratio's spread is
fastest/fastest against slowest/slowest of the two autodiff points.
Rows go to pareto.jsonl, the table to RESULTS.md. MB = 2^20 bytes.
"""

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import bench_report  # noqa: E402
import flop_floor  # noqa: E402
import memory_bench  # noqa: E402
from mesp_mlx.models.configs import config_for  # noqa: E402

MB = 2**20
JSON = HERE / "pareto.jsonl"
FRACTIONS = (0.0, 1 / 16, 0.25, 0.5, 1.0)
EXTRA_BUDGETS = {("Qwen2.5-0.5B", 256): (2e9,)}   # the absolute budget
# budget 0 with one token chunk of all T: what the default's chunks cost in time and save
# in memory (3B T 256: 95-row chunks, three passes over each MLP weight instead of one)
ONE_CHUNK = {("Qwen2.5-3B", 256): 12 << 20}      # ≥ 4 · T · F bytes
DEFAULT_GOAL = {("Qwen2.5-0.5B", 256): 1.10, ("Qwen2.5-3B", 256): 1.25}   # issue 13
EARLIER = (HERE / "pareto_2026-12-02.jsonl",     # earlier idle runs, kept for their spread
           HERE / "pareto_before_wide_chunks.jsonl",  # 0212a87: before schedule.chunk_plan
           HERE / "pareto_2026-12-04_89c2f92.jsonl",  # blocks kept before chunks widened
           HERE / "pareto_2026-12-06_ce2ae83_xeon.jsonl",  # a slower Intel host, 3B only
           HERE / "pareto_2026-12-07_30d280a_3b.jsonl",   # 3B before the one-chunk point
           HERE / "pareto_2026-12-07_30d280a_05b.jsonl")  # 0.5B T 256, first of two here


def spec_of(model, T, method, budget, steps, tag, **options):
    s = dict(model=model, T=T, r=8, method=method, steps=steps, dtype="float32",
             scale=20.0, seed=0, tag=tag)
    if budget is not None:
        s["options"] = {"activation_budget": int(budget), **options}
    return s


def run_one(spec, timeout):
    t0 = time.time()
    row = dict(memory_bench.run_point(spec, timeout), commit=bench_report.git_commit())
    with JSON.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{spec['model']} T={spec['T']} {spec['tag']}: {row.get('status')} "
          f"{(row.get('peak_above_bytes') or 0) / MB:.1f} MB, "
          f"fastest {min(row.get('step_times_s') or [0]):.2f} s ({time.time() - t0:.0f} s)",
          flush=True)
    return row


def run(models, Ts, steps, timeout):
    for model in models:
        for T in Ts:
            a = run_one(spec_of(model, T, "autodiff", None, steps, "autodiff (before)"),
                        timeout)
            extra = a.get("peak_above_bytes") if a.get("status") == "ok" else None
            budgets = [(f"budget {f:g}× autodiff's extra", f * extra)
                       for f in FRACTIONS] if extra else []
            budgets += [(f"budget {b / 1e9:g} GB", b)
                        for b in EXTRA_BUDGETS.get((model, T), ())]
            for tag, b in budgets:
                run_one(spec_of(model, T, "mesp", b, steps, tag), timeout)
            if (model, T) in ONE_CHUNK:
                run_one(spec_of(model, T, "mesp", 0, steps, "budget 0, one token chunk",
                                token_chunk_bytes=ONE_CHUNK[model, T]), timeout)
            run_one(spec_of(model, T, "autodiff", None, steps, "autodiff (after)"),
                    timeout)


def load():
    rows = []
    if JSON.exists():
        rows = [json.loads(x) for x in JSON.read_text().splitlines() if x.strip()]
    return rows


def render(rows, env):
    out = ["## Speed through a memory budget (issue 13)", "",
           "fp32, r 8 on all 7 projections, batch 1, random weights. mesp with "
           "`EngineOptions(activation_budget=B)`: blocks nearest the head keep their "
           "forward tensors and skip the recompute. Time = fastest warm step; ratio to "
           "the faster of the two autodiff points run before and after, with the range "
           "over both in brackets. MB = 2^20 bytes.", "",
           "| model | T | point | budget MB | blocks kept | peak above weights MB | "
           "fastest s/step | / autodiff | status |", "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    groups = {}
    for r in rows:                              # the last run of each (model, T, tag)
        groups.setdefault((r["model"], r["T"]), {})[r["tag"]] = r
    for (model, T), g in groups.items():
        ads = [g.get(k) for k in ("autodiff (before)", "autodiff (after)")]
        ads = [min(a["step_times_s"]) for a in ads if a and a.get("status") == "ok"]
        for tag, r in g.items():
            ok = r.get("status") == "ok"
            t = min(r["step_times_s"]) if ok else None
            ratio = ""
            if ok and ads:
                ratio = f"{t / min(ads):.2f} ({t / max(ads):.2f}–{t / min(ads):.2f})"
            budget = (r.get("options") or {}).get("activation_budget")
            kept = len((r.get("phases") or {}).get("kept_blocks", [])) if ok and \
                r["method"] == "mesp" else ""
            out.append(f"| {model} | {T} | {tag} | "
                       f"{'' if budget is None else f'{budget / MB:.0f}'} | {kept} | "
                       f"{r['peak_above_bytes'] / MB:.1f} | {t:.2f} | {ratio} | ok |"
                       if ok else f"| {model} | {T} | {tag} | | | | | | {r.get('status')} |")
    out += [""] + goal_lines(groups, "This run")
    for path in EARLIER:
        if path.exists():
            rows = _read(path)          # the date of its newest rows, which the lines use
            out += goal_lines(_groups(rows), f"Earlier idle run (`bench/{path.name}`, "
                              f"{max(r.get('time', '?') for r in rows)[:10]}, same command)")
    out += ["", bench_report.environment_line(env), ""]
    return "\n".join(out)


def _read(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _groups(rows):
    g = {}
    for r in rows:
        g.setdefault((r["model"], r["T"]), {})[r["tag"]] = r
    return g


def _phases(r):
    ph = r.get("phases") or {}
    return "/".join(f"{ph.get(k, 0):.2f}" for k in ("forward_s", "head_s", "backward_s"))


def goal_lines(groups, who):
    """Issue 13's goals, measured: met or missed by how much, with the phases."""
    out = []
    for (model, T), g in groups.items():
        ads = [min(a["step_times_s"]) for k in ("autodiff (before)", "autodiff (after)")
               if (a := g.get(k)) and a.get("status") == "ok"]
        ok = {k: r for k, r in g.items() if r.get("status") == "ok" and r["method"] == "mesp"}
        if not ads or not ok:
            continue
        ad = min(ads)

        def q(tag):
            return min(ok[tag]["step_times_s"]) / ad if tag in ok else None

        def qs(tag):        # against the faster autodiff point (and the slower one)
            return (f"{q(tag):.2f}× ({min(ok[tag]['step_times_s']) / max(ads):.2f}× against "
                    f"the slower autodiff point)")

        b0, b1 = "budget 0× autodiff's extra", "budget 1× autodiff's extra"
        full = max(ok.values(), key=lambda r: len(r["phases"].get("kept_blocks", [])))
        parts = []
        goal = DEFAULT_GOAL.get((model, T))
        if goal and q(b0) is not None:
            fl = flop_floor.floor(config_for(model), T)["ratio"]
            parts.append(f"default (budget 0) {qs(b0)} (goal ≤ {goal:.2f}×: "
                         + ("met" if q(b0) <= goal else "missed") + f"; its multiply-adds "
                         f"are {fl:.2f}× autodiff's, bench/flop_floor.py)")
        if q("budget 2 GB") is not None:
            r = ok["budget 2 GB"]
            parts.append(f"budget 2 GB {qs('budget 2 GB')} at "
                         f"{r['peak_above_bytes'] / MB:.0f} MB above weights (goal ≤ 1.00× "
                         f"and ≤ 2000 MB: " + ("met" if q("budget 2 GB") <= 1 and
                                               r["peak_above_bytes"] <= 2000 * MB
                                               else "missed") + ")")
        if q(b1) is not None:
            parts.append(f"budget = autodiff's extra {qs(b1)} (goal ≤ 1.00×: "
                         + ("met" if q(b1) <= 1 else "missed") + ")")
        least = [r for r in ok.values() if goal and min(r["step_times_s"]) / ad <= goal]
        if goal and least and q(b0) is not None and q(b0) > goal:
            r = min(least, key=lambda r: r["options"]["activation_budget"])
            parts.append(f"the smallest measured budget within {goal:.2f}×: "
                         f"{r['options']['activation_budget'] / MB:.0f} MB ({r['tag']}), "
                         f"{qs(r['tag'])} at {r['peak_above_bytes'] / MB:.0f} MB above weights")
        if b0 in ok:
            parts.append(f"phases forward/head/backward s: budget 0 {_phases(ok[b0])}, "
                         f"{len(full['phases']['kept_blocks'])} blocks kept "
                         f"{_phases(full)} (the difference in backward is the recompute)")
        if parts:
            out.append(f"- {who}, {model} T {T}: " + "; ".join(parts) + ".")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=["0.5B"])
    p.add_argument("--seq-lens", nargs="*", type=int, default=[256])
    p.add_argument("--steps", type=int, default=2, help="warm steps per point (>= 2)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = p.parse_args(argv)
    models = [memory_bench.SHORT.get(m, m) for m in args.models]
    if not args.render_only:
        run(models, args.seq_lens, max(2, args.steps), args.timeout)
    env = bench_report.collect_env("float32")
    env["command"] = "python bench/pareto.py " + " ".join(argv or sys.argv[1:])
    bench_report.write_section(args.out, render(load(), env), "<!-- pareto:start -->",
                               "<!-- pareto:end -->")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
