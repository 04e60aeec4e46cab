"""LFM2 and Gemma 4 against mlx-lm's LoRA step, one fresh process per point.

    python -m bench.families_new                    # every point below, rows appended
    python -m bench.families_new --resume           # only the points not yet measured
    python -m bench.families_new --models LFM2-1.2B --methods mesp autodiff --seq-lens 256

LFM2-1.2B runs in fp32. gemma-4-E2B's fp32 weights are 18.5 GB, 9.4 GB of them the
per-layer embedding table (262,144 × 35 × 256), which the model only reads rows of (a
lookup, never a matmul): that table alone is 4-bit (group 64), drawn directly as random
quantized values (bench/point.py), and every other weight, the tied embedding and head
included, is fp32 (9.1 GB), as are the activations and the LoRA. (With every weight
4-bit, mlx-lm's step runs mx.quantized_matmul, whose CPU kernel is too slow to measure
here: over 15 minutes without finishing one step.) T 256: mesp, our autodiff, mlx-lm,
mlx-lm + grad_checkpoint; T 2048: mesp and mlx-lm + grad_checkpoint (plain mlx-lm's
graph at T 2048 does not fit), first step only. gemma-4-E2B at T 2048 runs mesp alone:
mlx-lm + grad_checkpoint's peak grew 8.6× from T 256 to 2048 on LFM2-1.2B, which from
gemma-4-E2B's 1,562 MB at T 256 is about 13 GB beside 10.6 GB of weights, more than
this 24 GB machine has (an estimate; the run is not attempted).
Goals, printed per model at T 256: mesp's peak above the weights ≤ 1/12 of mlx-lm's,
mesp's step ≤ 1.3× our autodiff's. `mesp@plan` is mesp with the activation budget that
the memory goal leaves (mlx-lm's peak / 12 − the minimal schedule's peak, both measured
first): what that memory buys in time (wider token chunks, kept blocks; engine/plan.py).
Rows: bench/results/families_new.jsonl.
"""

import argparse
import sys
import time

from bench import common, memory_bench

RESULTS = common.RESULTS / "families_new.jsonl"
# model -> (weight bits, the modules quantized): None is fp32 throughout
MODELS = {"LFM2-1.2B": None, "gemma-4-E2B": (4, ("embed_tokens_per_layer",))}
SHORT_T, LONG_T = 256, 2048
SHORT_METHODS = ("mesp", "autodiff", "mlx-lm", "mlx-lm+ckpt", "mesp@plan", "mesp@chunk")
LONG_METHODS = {"LFM2-1.2B": ("mesp", "mlx-lm+ckpt"), "gemma-4-E2B": ("mesp",)}
TITLE = "New families: LFM2 and Gemma 4"
GOAL_PEAK, GOAL_TIME = 1 / 12, 1.3
SETTING = ("Random weights of the real configurations, fp32 activations and LoRA (r 8 on every "
           "block linear, scale 20, B ≠ 0), one fresh process per row. LFM2-1.2B: fp32 "
           "weights. gemma-4-E2B: fp32 weights except its per-layer embedding table (2.35 B "
           "values, only ever looked up), which is 4-bit g64 so that the model and mlx-lm's "
           "graph fit 24 GB. At T 2048 gemma-4-E2B runs mesp alone: mlx-lm + "
           "grad_checkpoint's peak grew 8.6× from T 256 to 2048 on LFM2-1.2B, about 13 GB "
           "from gemma-4-E2B's 1,562 MB (an estimate; not attempted beside 10.6 GB of "
           "weights on this machine). `mesp@plan`: mesp with the activation budget the "
           "memory goal leaves (mlx-lm's peak / 12 − mesp's minimal peak); `mesp@chunk`: "
           "mesp with every block in one token chunk (EngineOptions.token_chunk_bytes), what "
           "the plan would buy if its per-row bound (WIDE_ROW_BYTES) were not 3× the "
           "measured cost on these models.")


def sweeps():
    out = []
    for m in MODELS:
        out.append(memory_bench._sweep("family", f"{m} (T {SHORT_T}, r 8, batch 1)", [m],
                                       [SHORT_T], [8], SHORT_METHODS))
        out.append(memory_bench._sweep("family", f"{m} (T {LONG_T}, r 8, batch 1, first "
                                       "step)", [m], [LONG_T], [8], LONG_METHODS[m]))
    return out


def goal_lines(rows):
    """mesp against mlx-lm (peak above weights) and our autodiff (time) at T 256."""
    last = {memory_bench.key_of(r): r for r in rows if r.get("status") == "ok"}
    out = []
    for m in MODELS:
        get = lambda meth: last.get((m, "float32", SHORT_T, 8, meth))    # noqa: E731
        lora, auto = get("mlx-lm"), get("autodiff")
        for meth in ("mesp", "mesp@plan", "mesp@chunk"):
            mesp = get(meth)
            if not (mesp and lora and auto):
                continue
            peak = mesp["peak_above_bytes"] / lora["peak_above_bytes"]
            t = mesp["s_per_step"] / auto["s_per_step"]
            out.append(f"- {m}, T {SHORT_T}, {meth}: peak above weights = {peak:.3f} × "
                       f"mlx-lm's (goal ≤ {GOAL_PEAK:.3f}: "
                       f"{'met' if peak <= GOAL_PEAK else 'missed'}); step = {t:.2f} × our "
                       f"autodiff's (goal ≤ {GOAL_TIME}: {'met' if t <= GOAL_TIME else 'missed'})")
    return out


def plan_budget(model, rows):
    """The activation budget the memory goal leaves: mlx-lm's peak / 12 − the minimal
    schedule's peak (None until both are measured)."""
    last = {memory_bench.key_of(r): r for r in rows if r.get("status") == "ok"}
    lora, mesp = (last.get((model, "float32", SHORT_T, 8, m)) for m in ("mlx-lm", "mesp"))
    if not (lora and mesp):
        return None
    return max(0, int(lora["peak_above_bytes"] * GOAL_PEAK - mesp["peak_above_bytes"]))


def section(rows) -> str:
    """The RESULTS.md section: the tables, then the goals against their baselines."""
    goals = goal_lines(rows)
    text = memory_bench.render(TITLE, sweeps(), rows,
                               reproduce="python -m bench.families_new").rstrip("\n")
    title, _, rest = text.partition("\n")
    text = title + "\n\n" + SETTING + "\n" + rest
    if not goals:
        return text + "\n"
    head, sep, foot = text.rpartition("\nProtocol: ")
    return head + "\n\nGoals (baselines: mlx-lm's LoRA step for memory, our autodiff for " \
        "time):\n\n" + "\n".join(goals) + "\n" + sep + foot + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resume", action="store_true", help="skip points already measured")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per point")
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--methods", nargs="*", default=None,
                   help="only these methods (default: every method of each sweep)")
    p.add_argument("--seq-lens", nargs="*", type=int, default=[SHORT_T, LONG_T])
    args = p.parse_args(argv)
    env = common.environment(common.command(__spec__.name, argv))
    done = {memory_bench.key_of(r) for r in common.load_rows(RESULTS)} if args.resume \
        else set()
    t_start = time.perf_counter()
    for sweep in sweeps():
        for pt in sweep["points"]:
            if memory_bench.key_of(pt, "float32") in done or pt["model"] not in args.models \
                    or (args.methods and pt["method"] not in args.methods) \
                    or pt["T"] not in args.seq_lens:
                continue
            bits, only = MODELS[pt["model"]] or (None, None)
            spec = dict(pt, dtype="float32", scale=20.0, seed=0, mlx_lm_compile=True,
                        quantize=bits, quantize_only=only, direct_quantized=True,
                        steps=2 if pt["T"] == SHORT_T else 0)
            if pt["method"] == "mesp@plan":
                budget = plan_budget(pt["model"], common.load_rows(RESULTS))
                if budget is None:
                    print(f"{pt['model']} mesp@plan: mlx-lm and mesp rows first; skipped")
                    continue
                spec["options"] = {"activation_budget": budget}
            row = common.append_row(RESULTS, dict(memory_bench.run_point(spec, args.timeout),
                                                  quantize=spec["quantize"],
                                                  quantize_only=only,
                                                  options=spec.get("options")), env)
            what = (f"{common.mb(row['peak_above_bytes'])} MB above weights, "
                    f"{row['s_per_step']:.1f} s/step" if row["status"] == "ok"
                    else row.get("error", ""))
            print(f"[{time.perf_counter() - t_start:.0f}s] {pt['model']} T {pt['T']} "
                  f"{pt['method']}: {row['status']} {what}", flush=True)
    print(section(common.load_rows(RESULTS)))
    common.wrote(RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
