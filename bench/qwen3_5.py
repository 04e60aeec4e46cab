"""Qwen3.5 (gated DeltaNet + gated attention): mesp's exact step against mlx-lm's LoRA step.

    python -m bench.qwen3_5                  # every point below, one fresh process each
    python -m bench.qwen3_5 --only 0.8B-256  # the points whose name starts so
    python -m bench.qwen3_5 --table          # the table of the rows already measured

Random weights of the real architectures (mesp_mlx/models/configs.py), fp32, LoRA r 8
(scale 20) on every linear of every block, B 1. Per point, in a fresh process: build,
LoRA with the same A and non-zero B draws for every method, one warm-up step (mesp:
at T 8, its one-time spec check), then `steps` measured steps (0: the first step at T
is the row). Peak = mx.get_peak_memory() during the measured steps minus the resident
weights and LoRA parameters; time = mean measured step.
Baselines, in mlx-lm's own terms: "mlx-lm" is linear_to_lora_layers + nn.value_and_grad
of the mean cross-entropy through the model in training mode (its DeltaNet recurrence
is a loop over T), compiled as mlx_lm.tuner.trainer compiles its step; "mlx-lm+ckpt"
adds mlx_lm.tuner.trainer.grad_checkpoint on the block class. mesp rows carry a
breakdown: block-input checkpoints, the DeltaNet recompute's kept states at T, the
phase times and peaks of the measured step.
Rows: bench/results/qwen3_5.jsonl (stamped by bench.common).
"""

import argparse
import json
import subprocess
import sys
import time

from bench import common

RESULTS = common.RESULTS / "qwen3_5.jsonl"
PREFIX = "QWEN3_5_RESULT "
B_STD = 0.01
# name: (model, T, method, measured steps)
POINTS = {
    "0.8B-256-mesp": ("Qwen3.5-0.8B", 256, "mesp", 2),
    "0.8B-256-mlx-lm": ("Qwen3.5-0.8B", 256, "mlx-lm", 1),
    "0.8B-256-mlx-lm+ckpt": ("Qwen3.5-0.8B", 256, "mlx-lm+ckpt", 1),
    "0.8B-4096-mesp": ("Qwen3.5-0.8B", 4096, "mesp", 0),
    "2B-256-mesp": ("Qwen3.5-2B", 256, "mesp", 1),
    "2B-256-mlx-lm+ckpt": ("Qwen3.5-2B", 256, "mlx-lm+ckpt", 1),
}


# ------------------------------------------------------------------ one point
def _lora_init(model, seed):
    """A uniform ±1/√d_in, B ~ N(0, B_STD²): the same draws for every method."""
    import math

    import mlx.core as mx
    layers = sorted((p, m) for p, m in model.named_modules() if "lora_a" in m)
    keys = mx.random.split(mx.random.key(seed), 2 * len(layers))
    for i, (_, m) in enumerate(layers):
        bound = 1 / math.sqrt(m.lora_a.shape[0])
        m.lora_a = mx.random.uniform(-bound, bound, m.lora_a.shape, key=keys[2 * i])
        m.lora_b = B_STD * mx.random.normal(m.lora_b.shape, key=keys[2 * i + 1])
    return len(layers)


def _mesp_step(model, inputs, targets, row):
    import mlx.core as mx
    import mesp_mlx

    mesp_mlx.apply_lora(model, rank=8, scale=20.0)
    stats = {}

    def step():
        stats.clear()
        loss, grads = mesp_mlx.value_and_grad(model, inputs, targets, method="mesp",
                                              stats=stats)
        mx.eval(loss, grads)
        return loss
    return step, stats


def _mlx_lm_step(model, inputs, targets, method):
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.trainer import grad_checkpoint
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 20.0,
                                                     "dropout": 0.0})
    if method == "mlx-lm+ckpt":
        grad_checkpoint(model.layers[0])

    def loss_fn(model):
        logits = model(inputs).astype(mx.float32)
        return nn.losses.cross_entropy(logits, targets).mean()
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def fn():
        return value_and_grad(model)

    def step():
        loss, grads = fn()
        mx.eval(state, loss, grads)
        return loss
    return step


def _breakdown(model, T, stats, weights) -> dict:
    """What mesp's peak is made of at T (bytes), and its phases."""
    from mesp_mlx.engine.deltanet import state_bytes
    from mesp_mlx.engine.plan import EngineOptions
    from mesp_mlx.engine.walk import model_spec
    spec = model_spec(model, "mesp", 8)
    delta = [b.delta for b in spec.blocks if b.delta is not None]
    out = {"checkpoint_bytes": stats.get("checkpoint_bytes"),
           "grad_bytes": stats.get("grad_bytes"),
           "delta_state_bytes": state_bytes(delta[0], EngineOptions(), 1, T) if delta else 0}
    out.update({k: v for k, v in stats.items() if k.endswith("_s")})
    out.update({k: v - weights for k, v in stats.items() if k.startswith("peak_after_")})
    return out


def measure(pt) -> dict:
    import gc

    import mlx.core as mx
    from mesp_mlx.models.configs import build_model

    model_name, T, method, steps = pt
    row = {"model": model_name, "T": T, "method": method, "steps": steps, "r": 8,
           "dtype": "float32", "blas": _blas()}
    model = build_model(model_name, dtype=mx.float32, seed=0)
    V = model.language_model.args.vocab_size
    ids = mx.random.randint(0, V, (1, T + 1), key=mx.random.key(2))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    stats = None
    if method == "mesp":
        step, stats = _mesp_step(model, inputs, targets, row)
    else:
        step = _mlx_lm_step(model, inputs, targets, method)
    row["lora_layers"] = _lora_init(model, 1)
    model.train()
    mx.eval(model.parameters(), ids)
    gc.collect()
    mx.clear_cache()
    weights = mx.get_active_memory()                  # weights + LoRA parameters
    row["weights_bytes"] = weights
    if method == "mesp":                              # warm-up: the one-time spec check
        import mesp_mlx
        mx.eval(*mesp_mlx.value_and_grad(model, inputs[:, :8], targets[:, :8]))
    if steps:                                         # warm-up at T
        t0 = time.perf_counter()
        step()
        row["first_step_s"] = time.perf_counter() - t0
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    times, loss, earlier = [], None, 0
    for i in range(max(steps, 1)):
        if i and i == steps - 1:                      # the breakdown is the last step's own
            earlier = mx.get_peak_memory()
            mx.reset_peak_memory()
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    row.update(peak_bytes=max(earlier, mx.get_peak_memory()), step_times_s=times,
               s_per_step=sum(times) / len(times), loss=loss.item())
    row["peak_above_bytes"] = row["peak_bytes"] - weights
    if stats is not None:
        row["breakdown"] = _breakdown(model, T, stats, weights)
    return row


def _blas() -> str:
    """The BLAS MLX uses: OpenBLAS when preloaded (numpy's own copy does not count)."""
    import os
    pre = os.environ.get("LD_PRELOAD", "")
    return f"openblas ({pre})" if "openblas" in pre else "bundled"


def point_main(name: str):
    try:
        row = {**measure(POINTS[name]), "status": "ok"}
    except BaseException as e:                        # the row says what failed
        msg = str(e).lower()
        status = "oom" if "allocate" in msg or "memory" in msg else "error"
        row = {"status": status, "error": f"{type(e).__name__}: {e}"}
    print(PREFIX + json.dumps(row), flush=True)


# ------------------------------------------------------------------ the grid
def run_point(name: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "bench.qwen3_5", "--point", name]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env=common.subprocess_env())
        lines = [l for l in p.stdout.splitlines() if l.startswith(PREFIX)]
        res = (json.loads(lines[-1][len(PREFIX):]) if lines else
               {"status": "killed" if p.returncode < 0 else "error",
                "error": f"exit {p.returncode}: " + " / ".join(
                    p.stderr.strip().splitlines()[-2:])})
    except subprocess.TimeoutExpired:
        res = {"status": "timeout", "error": f"no result within {timeout:.0f} s"}
    model, T, method, steps = POINTS[name]
    return {"point": name, "model": model, "T": T, "method": method, "steps": steps,
            **res, "wall_s": round(time.perf_counter() - t0, 1), "time": common.now()}


def render(rows) -> str:
    rows = common.newest(rows, lambda r: r["point"])
    base = {(r["model"], r["T"], r["method"]): r for r in rows if r.get("status") == "ok"}
    body = []
    for r in rows:
        ok = r.get("status") == "ok"
        ref = base.get((r["model"], r["T"], "mlx-lm"))
        ck = base.get((r["model"], r["T"], "mlx-lm+ckpt"))
        ratio = lambda a, b, k: (f"{a[k] / b[k]:.3f}" if a and b and a.get(k) and  # noqa
                                 b.get(k) else "")
        body.append([r["model"], r["T"], r["method"],
                     common.mb(r.get("peak_above_bytes")) if ok else common.status(r),
                     f"{r['s_per_step']:.1f}" if ok else "",
                     ratio(r, ref, "peak_above_bytes") if ok else "",
                     ratio(r, ref, "s_per_step") if ok else "",
                     ratio(r, ck, "s_per_step") if ok else ""])
    head = ["model", "T", "method", "peak above weights (MB)", "s/step",
            "peak / mlx-lm", "time / mlx-lm", "time / mlx-lm+ckpt"]
    return "\n".join(common.table(head, body, "lrlrrrrr") + ["", common.footer(rows)])


def section(rows) -> str:
    """The RESULTS.md section: each point's newest row against mlx-lm's in its run."""
    if not rows:
        return ""
    return ("## Qwen3.5: gated DeltaNet against mlx-lm's LoRA step\n\n"
            "Random weights of the real Qwen3.5 text configurations, fp32, LoRA r 8 on every "
            "block linear, B 1, one fresh process per point. Baselines: mlx-lm's LoRA step "
            "(its per-token DeltaNet recurrence under autodiff, compiled as its trainer "
            "does) and the same with `grad_checkpoint`. Reproduce: `python -m "
            "bench.qwen3_5`.\n\n" + render(rows) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help="points whose name starts with this (e.g. 0.8B-256)")
    p.add_argument("--point", help=argparse.SUPPRESS)       # one point, in this process
    p.add_argument("--table", action="store_true", help="render the rows; measure nothing")
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args(argv)
    if args.point:
        return point_main(args.point)
    if not args.table:
        env = common.environment(common.command("bench.qwen3_5", sys.argv[1:] if argv is
                                                None else argv))
        for name in POINTS:
            if args.only and not name.startswith(args.only):
                continue
            row = common.append_row(RESULTS, {**run_point(name, args.timeout),
                                              "dtype": "float32"}, env)
            print(f"{name}: {row.get('status')} {common.mb(row.get('peak_above_bytes'))} MB "
                  f"{row.get('s_per_step', 0):.1f} s/step", flush=True)
    print(render(common.load_rows(RESULTS)))
    common.wrote(RESULTS)


if __name__ == "__main__":
    main()
