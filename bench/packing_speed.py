"""Sequence packing: tokens per second and MLX peak with and without --pack.

    python -m bench.packing_speed

Two data sets on the demo model (`--model demo`, its bundled weights): the demo task
(`--data demo`, short prompt/completion pairs) and a length-skewed synthetic set
(lognormal lengths: most examples short, a few long). For each, one epoch of engine
steps (mesp value_and_grad, no optimizer update) over the same examples, unpacked (our
length-bucketed batches, the baseline) and packed into rows of --max-seq-length, the
same --batch-size (rows) for both. tokens/s = real (non-padding) input positions / wall
time of the epoch; peak = mx.get_peak_memory() over the epoch above the memory active
before it.
"""

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from bench import common

RESULTS = common.RESULTS / "packing_speed.jsonl"
SETS = {   # name: (description, batch size, max sequence length)
    "demo": ("Demo task (`--data demo --mask-prompt`), --max-seq-length 256, "
             "--batch-size 4", 4, 256),
    "skewed": ("Length-skewed synthetic set (600 examples, lognormal lengths, median 24, "
               "longest 512), --max-seq-length 512, --batch-size 4", 4, 512),
}


def skewed(n: int, vocab: int, longest: int, seed: int = 0):
    """A Dataset of n random-token examples, lengths lognormal (median ~24 tokens),
    clipped to [4, longest]."""
    from mesp_mlx.train.data import Dataset
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(np.log(24), 0.9, n).astype(int), 4, longest)
    toks = [rng.integers(0, vocab, int(k)).tolist() for k in lens]
    return Dataset("skewed", toks, [0] * n)


def demo_task(tokenizer, max_seq_length: int):
    from mesp_mlx.train import data
    return data.load_splits("demo", tokenizer, max_seq_length, mask_prompt=True)["train"]


def measure(model, ds, batch_size: int, pack: int, method: str = "mesp") -> dict:
    """One epoch of engine steps over ds (after one warm-up step)."""
    from mesp_mlx import engine
    from mesp_mlx.train import data
    make, groups = data._plan(ds, batch_size, pack)
    batches = [make(ds, g) for g in groups]

    def step(b):
        return engine.value_and_grad(model, b.inputs, b.targets, b.mask, method=method,
                                     segments=b.segments)
    mx.eval(step(batches[0]))                         # warm-up (and spec check)
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    tic, loss_sum, n_targets = time.perf_counter(), 0.0, 0
    for b in batches:
        loss, grads = step(b)
        mx.eval(loss, grads)
        loss_sum += loss.item() * b.n_targets
        n_targets += b.n_targets
    secs = time.perf_counter() - tic
    tokens = sum(b.n_tokens for b in batches)
    positions = sum(b.inputs.size for b in batches)
    return dict(pack=bool(pack), steps=len(batches), tokens=tokens,
                padding=1 - tokens / positions, seconds=secs, tok_s=tokens / secs,
                peak_bytes=mx.get_peak_memory() - base, loss=loss_sum / max(n_targets, 1),
                shape=max(b.inputs.shape[1] for b in batches))


def table(name: str, rows) -> list:
    plain = next(r for r in rows if not r["pack"])
    out = [f"**{name}**", "",
           "| batches | steps | longest T | padding | tokens/s | vs unpacked | "
           "MLX peak MB | mean loss |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {'packed' if r['pack'] else 'unpacked (bucketed)'} | {r['steps']} | "
                   f"{r['shape']} | {100 * r['padding']:.1f}% | {r['tok_s']:.0f} | "
                   f"{r['tok_s'] / plain['tok_s']:.2f}× | {common.mb(r['peak_bytes'])} | "
                   f"{r['loss']:.4f} |")
    return out + [""]


def section(rows) -> str:
    rows = common.newest(rows, lambda r: (r["set"], r["pack"]))
    out = ["## Sequence packing", "",
           "One epoch of mesp engine steps (value_and_grad, no optimizer update) on the "
           "demo model (D 128, 4 blocks, LoRA r 8 on all projections), unpacked vs `--pack` "
           "(whole examples in rows of --max-seq-length, block-diagonal attention, RoPE "
           "restarted per example), the same --batch-size in rows. Baseline: our unpacked "
           "batches, which are already bucketed by length (mlx-lm's sorted batches pad "
           "similarly); the mean loss over the epoch is the same examples' either way. MLX "
           "peak: `mx.get_peak_memory()` over the epoch above the memory active before it. "
           "Read the ratios: absolute tokens/s move with the load of a shared CPU.", ""]
    for name, (desc, _, _) in SETS.items():
        rs = [r for r in rows if r["set"] == name]
        if any(not r["pack"] for r in rs):
            out += table(desc, sorted(rs, key=lambda r: r["pack"]))
    out += [common.footer(rows, "float32 (demo model as stored)",
                          "python -m bench.packing_speed"), ""]
    return "\n".join(out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    from mesp_mlx import apply_lora
    from mesp_mlx.models import loading

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    env = common.environment(common.command(__spec__.name, argv))
    model, tokenizer, _ = loading.load_model("demo", log=lambda *a: None)
    mx.random.seed(0)
    apply_lora(model, rank=8)
    V = model.model.embed_tokens.weight.shape[0]
    data = {"demo": lambda T: demo_task(tokenizer, T), "skewed": lambda T: skewed(600, V, T)}
    for name, (_, bs, T) in SETS.items():
        ds = data[name](T)
        for pack in (0, T):
            r = dict(measure(model, ds, bs, pack), set=name, batch_size=bs,
                     max_seq_length=T, dtype="float32")
            common.append_row(args.results, r, env)
            print(name, r, flush=True)
    print(section(common.load_rows(args.results)))
    common.wrote(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
