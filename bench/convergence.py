"""Loss vs step and vs wall-clock: autodiff, mebp, mesp (exact) and mezo (estimate).

    python -m bench.convergence                     # demo model + task, 100 steps
    python -m bench.convergence --model DIR --data DIR --iters 100

Every method starts from the same LoRA init and sees the same batches (same seed)
through mesp_mlx.train.loop.train. The exact methods share one optimizer and learning
rate (SGD by default, as MeZO-SGD, so the update rules compare), so their curves
coincide until the training itself amplifies fp32 rounding: `autodiff@ulp`, autodiff
from LoRA A moved by about one ulp, is the control for when that happens on the model
at hand. The check: mesp's loss stays within --tolerance of autodiff's at least as long
as the control's does. (Adam's first step divides each gradient element by its own
size, so elements that are rounding noise move by a full learning rate: under Adam the
exact methods part from the first step.) One row per method goes to --results; the
plot (needs matplotlib) to --png.
"""

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx

from bench import common
from mesp_mlx.engine.lora_layers import apply_lora, lora_layers
from mesp_mlx.models.loading import load_model
from mesp_mlx.train import data, loop as trainer
from mesp_mlx.train.config import TrainConfig

RESULTS = common.RESULTS / "convergence.jsonl"
PNG = common.RESULTS / "convergence.png"
SETTINGS = ("model", "data", "rank", "scale", "batch_size", "iters", "max_seq_length",
            "seed", "val_every", "val_batches", "tolerance")
METHODS = ("autodiff", "mebp", "mesp", "mezo", "autodiff@ulp")
ULP = 1e-7           # autodiff@ulp: LoRA A moved by this much (relative), about one fp32 ulp
EXACT = ("autodiff", "mebp", "mesp")
SMOOTH = 10          # steps in the moving average used for "steps to reach"


def method_config(method, args) -> TrainConfig:
    mezo = method == "mezo"
    return TrainConfig(
        train=True, method=method, iters=args.iters, batch_size=args.batch_size,
        max_seq_length=args.max_seq_length, rank=args.rank, scale=args.scale,
        seed=args.seed, mask_prompt=True, adapter_path="",
        optimizer="sgd" if mezo else args.optimizer,
        learning_rate=args.lr_mezo if mezo else args.lr,
        mezo_eps=args.mezo_eps, steps_per_report=args.iters,
        steps_per_eval=args.val_every, val_batches=args.val_batches)


def run_method(method, args, splits, say=print) -> dict:
    """One training run. autodiff@ulp: autodiff from LoRA A moved by about one ulp, the
    control for how far this model's training carries a rounding-sized difference."""
    model, _, _ = load_model(args.model, log=lambda *_: None)
    ulp = method == "autodiff@ulp"
    cfg = method_config("autodiff" if ulp else method, args)
    mx.random.seed(cfg.seed)                                  # same LoRA init for all
    apply_lora(model, cfg.rank, cfg.scale, cfg.dropout)
    for _, m in lora_layers(model) if ulp else ():
        m.lora_a = m.lora_a * (1 + ULP * mx.random.normal(m.lora_a.shape,
                                                          key=mx.random.key(5)))
    t0 = time.perf_counter()
    res = trainer.train(model, splits["train"], splits["valid"], cfg, log=lambda *_: None,
                        progress=False)
    wall = time.perf_counter() - t0
    say(f"{method}: {len(res.step_losses)} steps in {wall:.1f}s, loss "
        f"{res.step_losses[0]:.3f} -> {res.step_losses[-1]:.3f}, val "
        f"{res.val_losses[-1][1] if res.val_losses else float('nan'):.3f}")
    return {"method": method, "optimizer": cfg.optimizer, "lr": cfg.learning_rate,
            "eps": cfg.mezo_eps if method == "mezo" else None,
            "losses": res.step_losses, "seconds": res.step_seconds,
            "val": res.val_losses, "wall_s": wall}


def moving(xs, n=SMOOTH):
    return [sum(xs[max(0, i - n + 1):i + 1]) / (i + 1 - max(0, i - n + 1))
            for i in range(len(xs))]


def first_step_below(xs, level):
    return next((i + 1 for i, x in enumerate(moving(xs)) if x <= level), None)


def max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def plot(runs, path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"autodiff": "-", "mebp": "--", "mesp": ":", "mezo": "-"}
    for r in runs:
        steps = range(1, len(r["losses"]) + 1)
        clock, t = [], 0.0
        for s in r["seconds"]:
            t += s
            clock.append(t)
        label = f"{r['method']} ({r['optimizer']}, lr {r['lr']:g})"
        ax1.plot(steps, r["losses"], styles.get(r["method"], "-"), label=label, lw=1.2)
        ax2.plot(clock, r["losses"], styles.get(r["method"], "-"), label=label, lw=1.2)
        if r["val"]:
            ax1.plot([i for i, _ in r["val"]], [v for _, v in r["val"]], "o", ms=3,
                     color=ax1.lines[-1].get_color())
    ax1.set(xlabel="step", ylabel="train loss (dots: validation)", title="loss vs step")
    ax2.set(xlabel="training wall-clock (s)", ylabel="train loss", title="loss vs time")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def diffs_of(runs) -> dict:
    """max per-step |loss − loss_autodiff| of each method but autodiff."""
    ref = {r["method"]: r for r in runs}
    return {m: max_diff(ref[m]["losses"], ref["autodiff"]["losses"])
            for m in ref if m != "autodiff" and "autodiff" in ref}


def parting_step(run, runs, tolerance):
    """The first step whose loss differs from autodiff's by more than `tolerance`
    (None: never; 0 for autodiff itself)."""
    ref = next((r for r in runs if r["method"] == "autodiff"), None)
    if ref is None or run["method"] == "autodiff":
        return 0
    return next((i for i, (x, y) in enumerate(zip(run["losses"], ref["losses"]))
                 if abs(x - y) > tolerance), None)


def section(rows) -> str:
    runs = common.newest(rows, lambda r: r["method"])
    if not runs:
        return "## Convergence\n\nNo rows yet: `python -m bench.convergence`.\n"
    s, ref, diffs = runs[0], {r["method"]: r for r in runs}, diffs_of(runs)
    out = ["## Convergence", "",
           f"Model `{s['model']}`, data `{s['data']}` (prompt/completion, loss on "
           f"completions), LoRA r {s['rank']} scale {s['scale']:g}, batch {s['batch_size']}, "
           f"{s['iters']} steps, seed {s['seed']}; identical init and batches for every "
           "method. Train loss per step as each method reports it (mezo: (L(θ+εz) + "
           "L(θ−εz))/2); validation on "
           + ("all" if s["val_batches"] == -1 else str(s["val_batches"]))
           + f" validation batches every {s['val_every']} steps. Baseline: autodiff "
           "(`max |Δloss| vs autodiff per step`).", "",
           "| method | update | lr | loss step 1 | train loss, last 10 steps | val loss "
           "start → end | s/step | train wall s | max \\|Δloss\\| vs autodiff per step |",
           "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in runs:
        last = r["losses"][-SMOOTH:]
        upd = "MeZO-SGD, ε " + format(r["eps"], "g") if r["method"] == "mezo" else r["optimizer"]
        val = (f"{r['val'][0][1]:.3f} → {r['val'][-1][1]:.3f}" if r["val"] else "")
        d = diffs.get(r["method"])
        out.append(f"| {r['method']} | {upd} | {r['lr']:g} | {r['losses'][0]:.4f} | "
                   f"{sum(last) / len(last):.4f} | {val} | "
                   f"{sum(r['seconds']) / len(r['seconds']):.4f} | "
                   f"{sum(r['seconds']):.1f} | " + ("" if d is None else f"{d:.1e}") + " |")
    out.append("")
    for m in ("mesp", "autodiff@ulp"):
        if m not in diffs:
            continue
        a, b = ref[m]["losses"], ref["autodiff"]["losses"]
        apart = next((i for i, (x, y) in enumerate(zip(a, b)) if abs(x - y) > s["tolerance"]),
                     None)
        what = ("mesp vs autodiff" if m == "mesp" else
                f"autodiff vs autodiff from LoRA A moved by {ULP:g} (the control)")
        out.append(f"- {what}: max per-step loss difference {diffs[m]:.2e} over "
                   f"{s['iters']} steps; " + ("within" if apart is None else
                   f"within {s['tolerance']:g} until step {apart}, beyond it after") + ".")
    if "mezo" in ref:
        level = moving(ref["mezo"]["losses"])[-1]
        reach = [f"{m} after {first_step_below(ref[m]['losses'], level)} steps"
                 for m in EXACT if m in ref and first_step_below(ref[m]["losses"], level)]
        if reach:
            out.append(f"MeZO's final {SMOOTH}-step mean train loss ({level:.3f} after "
                       f"{s['iters']} steps) is reached by " + ", ".join(reach) + ".")
    if PNG.exists():
        out += ["", f"![loss vs step and wall-clock]({PNG.relative_to(common.BENCH)})"]
    out += ["", common.footer(runs, reproduce="python -m bench.convergence"), ""]
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the demo model)")
    p.add_argument("--data", default=None, help="data directory (default: the demo task)")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"],
                   help="optimizer of the exact methods")
    p.add_argument("--lr", type=float, default=1e-4, help="exact methods' learning rate")
    p.add_argument("--lr-mezo", type=float, default=1e-4)
    p.add_argument("--mezo-eps", type=float, default=1e-2)
    p.add_argument("--val-every", type=int, default=20)
    p.add_argument("--val-batches", type=int, default=-1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1e-5,
                   help="max per-step |loss_mesp − loss_autodiff| (fp32)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--png", type=Path, default=PNG)
    args = p.parse_args(argv)
    if args.iters < 1 or args.batch_size < 1:
        p.error("--iters and --batch-size must be >= 1")
    from mesp_mlx import demo
    try:
        args.model_label = args.model or "mesp_mlx.demo.model_path()"
        args.data_label = args.data or 'mesp_mlx.demo.data_path("task")'
        args.model = args.model or demo.model_path()
        args.data = args.data or demo.data_path("task")
    except FileNotFoundError as e:
        p.error(str(e))
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    env = common.environment(common.command(__spec__.name, argv))
    _, tok, _ = load_model(args.model, log=lambda *_: None)
    splits = data.load_splits(args.data, tok, args.max_seq_length, mask_prompt=True,
                              need=("train", "valid"))
    settings = {k: getattr(args, k) for k in SETTINGS}
    settings.update(model=args.model_label, data=args.data_label, dtype="float32")
    runs = [common.append_row(args.results, dict(settings, **run_method(m, args, splits)), env)
            for m in args.methods]
    png = plot(runs, args.png)
    print(section(runs))
    print(f"plot: {args.png}" if png else "no plot (needs matplotlib)")
    common.wrote(args.results)
    parts = {r["method"]: parting_step(r, runs, args.tolerance) for r in runs}
    if "mesp" in parts and parts["mesp"] is not None and (
            parts.get("autodiff@ulp", 0) is None or parts["mesp"] < parts.get("autodiff@ulp", 0)):
        print(f"FAILED: mesp and autodiff part beyond {args.tolerance:g} at step "
              f"{parts['mesp']}, before a one-ulp change of autodiff's start does "
              f"({parts.get('autodiff@ulp', 'not run')})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
