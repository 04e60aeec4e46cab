"""Preference tuning's step against SFT's, on the same engine, in one process.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python -m bench.preference

Qwen2.5-0.5B (fp32 random weights, the real config), LoRA r 8 on all 7 projections
(A uniform, B ≠ 0), one pair of T 256 per side, each side's first PROMPT positions
masked. Kinds, each one step:
  sft        mesp, one sequence (the chosen side)            the baseline
  sft-pair   mesp, both sides as one batch of 2 (the pair's tokens)
  dpo        preference_value_and_grad, reference log-probs computed in the step
  dpo-ref    the same with the reference given (what training's cache supplies
             after a pair's first visit)
  orpo       no reference
  *@disk     the first side's gradients wait on disk (park_grads="disk")
and dpo/orpo with --method autodiff (the reference method) for the peak ratio.
A warm-up round, then --rounds rounds of one step of every kind, so a shared
machine's drifts hit all kinds alike; time = the median of the wall time and of the
process CPU time (all threads: steadier than wall time when other jobs share the
cores), peak = the largest MLX peak of a step minus the active memory before the
steps (weights + LoRA).
Goals (mesp): peak ≤ 1.15 × sft's and ≤ 1/10 of autodiff's; time ≤ 2.3 × sft's.
Rows (one per kind, with the phase breakdown) go to bench/results/preference.jsonl.
"""

import argparse
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx

import mesp_mlx
from mesp_mlx.engine.lora_layers import lora_layers
from mesp_mlx.engine.preference import preference_step
from mesp_mlx.models.configs import build_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "preference.jsonl"
MB = 10**6
PROMPT = 32
B_STD = 0.01
GOALS = {"peak_vs_sft": 1.15, "peak_vs_autodiff": 0.1, "time_vs_sft": 2.3}


def environment(argv) -> dict:
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    pre = os.environ.get("LD_PRELOAD", "")
    cmd = (f"LD_PRELOAD={pre} " if pre else "") + shlex.join(
        ["python", "-m", "bench.preference", *argv])
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    return {"commit": git("rev-parse", "--short=12", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                              ":(exclude)bench/results")),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "host": f"{cpu} ({os.cpu_count()} logical CPUs)",
            "device": str(mx.default_device()), "mlx": version("mlx"),
            "mlx_lm": version("mlx-lm"), "command": cmd,
            "blas": "openblas" if "openblas" in maps else "bundled"}


def build(name, rank, seed=0):
    model = build_model(name, seed=seed)
    mesp_mlx.apply_lora(model, rank=rank)
    layers = lora_layers(model)
    keys = mx.random.split(mx.random.key(seed + 1), 2 * len(layers))
    for i, (_, m) in enumerate(layers):
        bound = 1 / math.sqrt(m.lora_a.shape[0])
        m.lora_a = mx.random.uniform(-bound, bound, m.lora_a.shape, key=keys[2 * i])
        m.lora_b = B_STD * mx.random.normal(m.lora_b.shape, key=keys[2 * i + 1])
    model.train()
    mx.eval(model.parameters())
    return model, len(layers)


def side(V, T, seed):
    ids = mx.random.randint(0, V, (1, T + 1), key=mx.random.key(seed)).astype(mx.int32)
    mask = mx.concatenate([mx.zeros((1, PROMPT)), mx.ones((1, T - PROMPT))], axis=1)
    return ids[:, :-1], ids[:, 1:], mask


def kinds(model, chosen, rejected, reference):
    """{kind: (method, step() -> (result to drop, phase stats))}."""
    pair = tuple(mx.concatenate([a, b]) for a, b in zip(chosen, rejected))

    def sft(batch):
        def f():
            st = {}
            out = mesp_mlx.value_and_grad(model, *batch, method="mesp", stats=st)
            return out, st
        return f

    def pref(objective, method, ref=None, park=None):
        def f():
            st = {}
            out = preference_step(model, chosen, rejected, objective, 0.1, method, ref,
                                  stats=st if method != "autodiff" else None,
                                  park_grads=park)
            return out, st
        return f
    return {"sft": ("mesp", sft(chosen)), "sft-pair": ("mesp", sft(pair)),
            "dpo": ("mesp", pref("dpo", "mesp")),
            "dpo-ref": ("mesp", pref("dpo", "mesp", reference)),
            "orpo": ("mesp", pref("orpo", "mesp")),
            "dpo@disk": ("mesp", pref("dpo", "mesp", park="disk")),
            "dpo-ref@disk": ("mesp", pref("dpo", "mesp", reference, park="disk")),
            "orpo@disk": ("mesp", pref("orpo", "mesp", park="disk")),
            "dpo@autodiff": ("autodiff", pref("dpo", "autodiff")),
            "orpo@autodiff": ("autodiff", pref("orpo", "autodiff"))}


def measure(step, weights):
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    t0, c0 = time.perf_counter(), time.process_time()
    out, st = step()
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = mx.get_peak_memory() - weights
    del out
    gc.collect()
    st["cpu_s"], st["load_average"] = cpu, os.getloadavg()[0]
    return secs, peak, st


def above(st, weights):
    """Phase stats with every MLX peak given above the weights, in MB."""
    out = {}
    for k, v in st.items():
        if isinstance(v, dict):
            out[k] = above(v, weights)
        elif k.startswith("peak_after_"):
            out[k] = round((v - weights) / MB, 1)
        elif isinstance(v, float):
            out[k] = round(v, 2)
        elif isinstance(v, (int, str, bool)) or v is None:
            out[k] = v
    return out


def breakdown(r) -> str:
    """One step's phases (the last round's): seconds, and the MLX peak above the
    weights after each (MB)."""
    p = r["phases"]

    def sub(name):
        q = p.get(name, {})
        return ", ".join(f"{k[:-2]} {q[k]:.1f} s" for k in ("forward_s", "head_s",
                                                           "backward_s") if k in q)
    return (f"- breakdown {r['kind']}: reference {p['reference_s']:.1f} s "
            f"(peak {p['peak_after_reference']} MB); shorter side forward + head "
            f"{p['forward_short_s']:.1f} s ({p['peak_after_forward_short']} MB); longer "
            f"side gradient pass {p['gradient_long_s']:.1f} s ({sub('long')}; "
            f"{p['peak_after_gradient_long']} MB); shorter side gradient pass "
            f"{p['gradient_short_s']:.1f} s ({sub('short')}; "
            f"{p['peak_after_gradient_short']} MB)")


def report(rows):
    sft = next(r for r in rows if r["kind"] == "sft")
    lines = ["| kind | method | peak above weights (MB) | × sft | wall s/step | × sft | "
             "CPU s/step | × sft |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['method']} | {r['peak_above_bytes'] / MB:.1f} | "
                     f"{r['peak_above_bytes'] / sft['peak_above_bytes']:.2f} | "
                     f"{r['s_per_step']:.2f} | {r['s_per_step'] / sft['s_per_step']:.2f} | "
                     f"{r['cpu_s_per_step']:.2f} | "
                     f"{r['cpu_s_per_step'] / sft['cpu_s_per_step']:.2f} |")
    lines.append("")
    by = {r["kind"]: r for r in rows}
    for kind in ("dpo", "dpo-ref", "orpo", "dpo@disk", "dpo-ref@disk", "orpo@disk"):
        if kind not in by:
            continue
        r, auto = by[kind], by.get(kind.split("@")[0].split("-")[0] + "@autodiff")
        checks = [("peak ≤ 1.15 × sft", r["peak_above_bytes"] / sft["peak_above_bytes"],
                   GOALS["peak_vs_sft"]),
                  ("time ≤ 2.3 × sft (wall)", r["s_per_step"] / sft["s_per_step"],
                   GOALS["time_vs_sft"]),
                  ("time ≤ 2.3 × sft (CPU)", r["cpu_s_per_step"] / sft["cpu_s_per_step"],
                   GOALS["time_vs_sft"])]
        if auto:
            checks.append(("peak ≤ 1/10 autodiff", r["peak_above_bytes"] /
                           auto["peak_above_bytes"], GOALS["peak_vs_autodiff"]))
        for name, got, goal in checks:
            verdict = "met" if got <= goal else f"missed by {got / goal - 1:.1%}"
            lines.append(f"- goal {kind}: {name}: {got:.3f} (goal {goal}): {verdict}")
    for r in rows:
        if r["method"] == "mesp" and "forward_short_s" in r["phases"]:
            lines.append(breakdown(r))
    env = rows[0]
    lines.append(f"\n{env['host']}, MLX {env['mlx']}, mlx-lm {env['mlx_lm']}, BLAS "
                 f"{env['blas']}, commit {env['commit']}{' (dirty)' if env['dirty'] else ''}"
                 f", {env['date']}; {env['model']} fp32, r {env['r']}, T {env['T']} per "
                 f"side, {env['rounds']} rounds")
    return "\n".join(lines)


def section(rows) -> str:
    """The RESULTS.md section: the newest run's table, goals and breakdowns."""
    if not rows:
        return ""
    last = (rows[-1]["commit"], rows[-1]["date"])
    run = [r for r in rows if (r["commit"], r["date"]) == last]
    body, _, env = report(run).rpartition("\n")
    return ("## Preference tuning: DPO and ORPO against SFT\n\n"
            "One step of each kind on the same engine (`mesp` unless marked), Qwen2.5-0.5B "
            "fp32 random weights, r 8 on all 7 projections, one pair of T 256 per side; "
            "peak = MLX peak above the weights and LoRA; time = median over rounds "
            "(wall, and process CPU time). Baseline: SFT's step on one side. Reproduce: "
            "`python -m bench.preference`.\n\n" + body + "\n\n**Environment.** " + env + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Qwen2.5-0.5B")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", default=None, help="subset of the kinds")
    ap.add_argument("--out", default=str(RESULTS), help="JSON lines file ('' : none)")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    env = environment(argv)
    model, n_layers = build(args.model, args.rank)
    V = model.args.vocab_size
    chosen, rejected = side(V, args.seq_len, 2), side(V, args.seq_len, 3)
    from mesp_mlx.engine.preference import adapters_off
    from mesp_mlx.engine.walk import row_logprobs
    with adapters_off(model):
        reference = tuple(row_logprobs(model, *s) for s in (chosen, rejected))
    mx.eval(chosen, rejected, reference)
    gc.collect()
    mx.clear_cache()
    weights = mx.get_active_memory()
    todo = kinds(model, chosen, rejected, reference)
    todo = {k: v for k, v in todo.items() if args.kinds is None or k in args.kinds}
    got = {k: [] for k in todo}
    for rnd in range(args.rounds + 1):                 # round 0: warm-up
        for kind, (method, step) in todo.items():
            if rnd == 0 and method == "autodiff":
                continue                               # the slow reference: no warm-up
            secs, peak, st = measure(step, weights)
            print(f"round {rnd} {kind}: {secs:.2f} s (CPU {st['cpu_s']:.2f} s), peak "
                  f"{peak / MB:.1f} MB", flush=True)
            if rnd:
                got[kind].append((secs, peak, st))
    rows = []
    for kind, runs in got.items():
        if not runs:
            continue
        rows.append({**env, "kind": kind, "method": todo[kind][0], "model": args.model,
                     "dtype": "float32", "T": args.seq_len, "B": 1, "r": args.rank,
                     "lora_layers": n_layers, "prompt": PROMPT, "rounds": len(runs),
                     "weights_bytes": weights,
                     "peak_above_bytes": max(p for _, p, _ in runs),
                     "step_times_s": [round(s, 3) for s, _, _ in runs],
                     "s_per_step": statistics.median(s for s, _, _ in runs),
                     "cpu_s_per_step": statistics.median(st["cpu_s"] for *_, st in runs),
                     "cpu_times_s": [round(st["cpu_s"], 3) for *_, st in runs],
                     "load_averages": [round(st["load_average"], 2) for *_, st in runs],
                     "phases": above(runs[-1][2], weights)})
    text = report(rows)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
