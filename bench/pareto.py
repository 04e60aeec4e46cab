"""Memory against time for mesp's activation budget, one fresh process per point.

    python -m bench.pareto                        # Qwen2.5-0.5B at T 256
    python -m bench.pareto --models 0.5B 3B --seq-lens 256 1024

For each (model, T): autodiff, then mesp with EngineOptions(activation_budget =
f × autodiff's measured extra memory) for f in 0, 1/16, 1/4, 1/2, 1 (1/16: a plan
that keeps only some blocks, where 1/4 already keeps all), 2 GB at 0.5B T 256 (an
absolute budget), budget 0 with one token chunk at 3B T 256 (what the default's chunks
cost in time and save in memory), then autodiff again (so every ratio has an autodiff
step on each side). Each point times `--steps` warm steps after a warm-up; a row's time
is its fastest step, and a ratio's spread is fastest/fastest against slowest/slowest of
the two autodiff points.
"""

import argparse
import sys
import time

from bench import common, flop_floor
from bench.memory_bench import SHORT, run_point

RESULTS = common.RESULTS / "pareto.jsonl"
MB = common.MB
FRACTIONS = (0.0, 1 / 16, 0.25, 0.5, 1.0)
EXTRA_BUDGETS = {("Qwen2.5-0.5B", 256): (2e9,)}   # an absolute budget, bytes
# budget 0 with one token chunk of all T: what the default's chunks cost in time and save
# in memory (3B T 256: three passes over each MLP weight instead of one)
ONE_CHUNK = {("Qwen2.5-3B", 256): 12_000_000}  # bytes, ≥ 4 · T · F
DEFAULT_GOAL = {("Qwen2.5-0.5B", 256): 1.10, ("Qwen2.5-3B", 256): 1.25}  # × autodiff
AUTODIFF = ("autodiff (before)", "autodiff (after)")


def spec_of(model, T, method, budget, steps, tag, **options):
    s = dict(model=model, T=T, r=8, method=method, steps=steps, dtype="float32",
             scale=20.0, seed=0, tag=tag)
    if budget is not None:
        s["options"] = {"activation_budget": int(budget), **options}
    return s


def run_one(spec, env, timeout, results):
    t0 = time.time()
    row = common.append_row(results, run_point(spec, timeout), env)
    print(f"{spec['model']} T={spec['T']} {spec['tag']}: {row.get('status')} "
          f"{common.mb(row.get('peak_above_bytes') or 0)} MB, "
          f"fastest {min(row.get('step_times_s') or [0]):.2f} s ({time.time() - t0:.0f} s)",
          flush=True)
    return row


def run(models, Ts, steps, env, timeout, results=RESULTS):
    for model in models:
        for T in Ts:
            def one(*a, **kw):
                return run_one(spec_of(model, T, *a, **kw), env, timeout, results)
            a = one("autodiff", None, steps, AUTODIFF[0])
            extra = a.get("peak_above_bytes") if a.get("status") == "ok" else None
            budgets = [(f"budget {f:g}× autodiff's extra", f * extra)
                       for f in FRACTIONS] if extra else []
            budgets += [(f"budget {b / 1e9:g} GB", b)
                        for b in EXTRA_BUDGETS.get((model, T), ())]
            for tag, b in budgets:
                one("mesp", b, steps, tag)
            if (model, T) in ONE_CHUNK:
                one("mesp", 0, steps, "budget 0, one token chunk",
                    token_chunk_bytes=ONE_CHUNK[model, T])
            one("autodiff", None, steps, AUTODIFF[1])


def groups(rows):
    """{(model, T): {tag: the newest row}}, in the order the points first appear."""
    g = {}
    for r in rows:
        g.setdefault((r["model"], r["T"]), {})[r["tag"]] = r
    return g


def _row(model, T, tag, r, ads):
    if r.get("status") != "ok":
        return f"| {model} | {T} | {tag} | | | | | | {common.status(r)} |"
    t = min(r["step_times_s"])
    ratio = f"{t / min(ads):.2f} ({t / max(ads):.2f}–{t / min(ads):.2f})" if ads else ""
    budget = (r.get("options") or {}).get("activation_budget")
    kept = len((r.get("phases") or {}).get("kept_blocks", [])) \
        if r["method"] == "mesp" else ""
    return (f"| {model} | {T} | {tag} | {'' if budget is None else f'{budget / MB:.0f}'} | "
            f"{kept} | {common.mb(r['peak_above_bytes'])} | {t:.2f} | {ratio} | ok |")


def section(rows) -> str:
    g = groups(rows)
    out = ["## Speed through a memory budget", "",
           "fp32, r 8 on all 7 projections, batch 1, random weights. mesp with "
           "`EngineOptions(activation_budget=B)`: blocks nearest the head keep their "
           "forward tensors and skip the recompute. Time = fastest warm step. Baseline: "
           "autodiff, run before and after the mesp points; the ratio is to the faster "
           "of the two, with the range over both in brackets.", "",
           "| model | T | point | budget MB | blocks kept | peak above weights MB | "
           "fastest s/step | / autodiff | status |",
           "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for (model, T), gr in g.items():
        ads = [min(a["step_times_s"]) for k in AUTODIFF
               if (a := gr.get(k)) and a.get("status") == "ok"]
        out += [_row(model, T, tag, r, ads) for tag, r in gr.items()]
    goals = goal_lines(g)
    if goals:
        out += ["", "### Goals", ""] + goals
    shown = [r for gr in g.values() for r in gr.values()]
    out += ["", common.footer(shown, reproduce="python -m bench.pareto --models 0.5B 3B "
                                               "--seq-lens 256 1024"), ""]
    return "\n".join(out)


def _phases(r):
    ph = r.get("phases") or {}
    return "/".join(f"{ph.get(k, 0):.2f}" for k in ("forward_s", "head_s", "backward_s"))


def goal_lines(g):
    """The goals, measured: met or missed by how much, with the phases."""
    from mesp_mlx.models.configs import config_for
    out = []
    for (model, T), gr in g.items():
        ads = [min(a["step_times_s"]) for k in AUTODIFF
               if (a := gr.get(k)) and a.get("status") == "ok"]
        ok = {k: r for k, r in gr.items() if r.get("status") == "ok" and r["method"] == "mesp"}
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
                         f"are {fl:.2f}× autodiff's, `python -m bench.flop_floor`)")
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
            out.append(f"- {model} T {T}: " + "; ".join(parts) + ".")
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=["0.5B"])
    p.add_argument("--seq-lens", nargs="*", type=int, default=[256])
    p.add_argument("--steps", type=int, default=2, help="warm steps per point (>= 2)")
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args(argv)
    env = common.environment(common.command(__spec__.name, argv))
    run([SHORT.get(m, m) for m in args.models], args.seq_lens, max(2, args.steps), env,
        args.timeout)
    print(section(common.load_rows(RESULTS)))
    common.wrote(RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
