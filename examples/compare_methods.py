"""Compare the gradient methods on your model and hardware: peak memory,
seconds per step, and agreement of losses and gradients with plain autodiff.

    python examples/compare_methods.py --model Qwen2.5-0.5B-Instruct-4bit
    python examples/compare_methods.py --model ~/models/Qwen2.5-1.5B-Instruct --seq-length 512
    python examples/compare_methods.py --model demo --steps 3        # offline, seconds

Every method starts from the same LoRA initialisation and trains on the same
batches (windows of the bundled text corpus, or --text) with plain SGD, in one
process: the MLX peak is reset before every step, and the allocator cache is
cleared between methods. Prints a markdown table and an environment footer.
"""

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

import mesp_mlx
from mesp_mlx import demo
from mesp_mlx.train.adapters import adapter_weights
from mesp_mlx.errors import UserError
from mesp_mlx.memory import device_facts
from mesp_mlx.engine.mezo import mezo_step

MB = 2**20
METHODS = ("autodiff", "mebp", "mesp", "mezo")
EXACT = ("autodiff", "mebp", "mesp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Qwen2.5-0.5B-Instruct-4bit",
                   help="short name, Hugging Face repo id, local directory or 'demo'")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--steps", type=int, default=5, help="training steps per method")
    p.add_argument("--seq-length", type=int, default=256, help="tokens per sequence T")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--lr", type=float, default=1e-4, help="SGD learning rate (all methods)")
    p.add_argument("--mezo-eps", type=float, default=1e-2)
    p.add_argument("--text", help="jsonl with {'text'} records or a plain text file "
                   "(default: the bundled demo corpus)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        p.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    for name in ("steps", "seq_length", "batch_size", "rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# ---------------------------------------------------------------- data

def read_texts(path) -> list:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--text {path}: no such file")
    lines = path.read_text().splitlines()
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line)["text"] for line in lines if line.strip()]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"--text {path}: expected one {{\"text\": ...}} per line ({e})")
    return ["\n".join(lines)]


def make_batches(tokenizer, texts, steps, B, T):
    """steps batches of B windows of T+1 tokens cut from the concatenated texts
    (cycled if the texts are shorter than needed)."""
    ids = []
    for text in texts:
        ids += tokenizer.encode(text) + [tokenizer.eos_token_id]
    if len(ids) < T + 1:
        raise UserError(f"the text has only {len(ids)} tokens; need at least "
                        f"--seq-length + 1 = {T + 1}")
    need = steps * B * (T + 1)
    ids = np.resize(np.array(ids, np.int32), need).reshape(steps, B, T + 1)
    return [(mx.array(w[:, :-1]), mx.array(w[:, 1:])) for w in ids]


# ---------------------------------------------------------------- measuring

def flat_grads(grads) -> dict:
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(grads)}


def agreement(g: dict, ref: dict):
    """(worst-tensor cosine, max |g - ref| / max |ref|) over the LoRA tensors."""
    cos, rel = 1.0, 0.0
    for k, r in ref.items():
        a, b = g[k].ravel().astype(np.float64), r.ravel().astype(np.float64)
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        if nb > 0:
            cos = min(cos, float(a @ b / max(na * nb, 1e-300)))
            rel = max(rel, float(np.abs(a - b).max() / np.abs(b).max()))
    return cos, rel


def set_lora(model, weights: dict):
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())


def run_method(model, init, probe, method, batches, args):
    """One gradient at the `probe` LoRA weights (agreement check and warm-up),
    then len(batches) SGD steps from `init`."""
    set_lora(model, probe)
    mx.clear_cache()
    mx.random.seed(args.seed)
    x0, y0 = batches[0]
    _, grads = mesp_mlx.value_and_grad(model, x0, y0, method=method)
    grad = flat_grads(grads)
    del grads
    set_lora(model, init)
    mx.clear_cache()
    opt = optim.SGD(learning_rate=args.lr)
    losses, peaks, above, secs = [], [], [], []
    for x, y in batches:
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        tic = time.perf_counter()
        if method == "mezo":
            loss = mezo_step(model, x, y, lr=args.lr, eps=args.mezo_eps).loss
        else:
            loss, grads = mesp_mlx.value_and_grad(model, x, y, method=method)
            opt.update(model, grads)
            mx.eval(model.parameters())
            loss = loss.item()
            del grads
        secs.append(time.perf_counter() - tic)
        peaks.append(mx.get_peak_memory())
        above.append(peaks[-1] - base)
        losses.append(float(loss))
    return dict(status="ok", grad=grad, losses=losses, peak=max(peaks),
                above=max(above), s_per_step=float(np.mean(secs)))


# ---------------------------------------------------------------- report

def table(rows: dict, ref: str) -> str:
    head = ("| method | peak MB | peak above resident MB | s/step | first loss | last loss "
            f"| max abs loss diff vs {ref} | gradient vs {ref}: worst-tensor cosine, max "
            "rel. error | status |")
    out = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    base = rows.get(ref, {})
    for m, r in rows.items():
        if r["status"] != "ok":
            out.append(f"| {m} | | | | | | | | {r['status']} |")
            continue
        diff = cos = ""
        if base.get("status") == "ok":
            cos = "{:.6f}, {:.1e}".format(*agreement(r["grad"], base["grad"]))
            diff = (f"{max(abs(a - b) for a, b in zip(r['losses'], base['losses'])):.2e}"
                    if m in EXACT else "n/a (estimate)")
        out.append(f"| {m} | {r['peak'] / MB:.1f} | {r['above'] / MB:.1f} | "
                   f"{r['s_per_step']:.3f} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} "
                   f"| {diff} | {cos} | ok |")
    return "\n".join(out)


def footer(args, resolved, weights_mb, n_lora) -> str:
    import mlx_lm
    dev = device_facts()
    mem = dev.get("memory_size")
    return (f"**Environment.** Model `{resolved}` (resident weights {weights_mb:.1f} MB), "
            f"LoRA r={args.rank} scale={args.scale} ({n_lora / 1e6:.2f} M parameters), "
            f"B={args.batch_size}, T={args.seq_length}, {args.steps} SGD steps at lr "
            f"{args.lr} per method (MeZO eps {args.mezo_eps}); device "
            f"`{dev.get('device_name') or mx.default_device()}`"
            f"{f' ({mem / 2**30:.0f} GiB)' if mem else ''}, {platform.platform()}, "
            f"Python {platform.python_version()}, MLX {mx.__version__}, mlx-lm "
            f"{mlx_lm.__version__}, mesp_mlx {mesp_mlx.__version__}; "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. MB = 2^20 bytes; peaks "
            "are MLX's allocator peak (the process footprint adds the runtime); "
            "'above resident' subtracts the memory active before the step (weights, "
            "LoRA); MeZO's loss is (L(θ+εz) + L(θ−εz))/2; s/step "
            "excludes the warm-up gradient, taken at LoRA weights with B ~ 0.01·N(0, 1) (at "
            "init B = 0 and every dA is 0), which the cosine column compares. Command: "
            f"`python {' '.join(sys.argv)}`")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        model, tokenizer, resolved = mesp_mlx.load_model(args.model, log=lambda s: None)
        if args.text:
            texts = read_texts(args.text)
        else:
            texts = read_texts(Path(demo.data_path("corpus")) / "train.jsonl")
        batches = make_batches(tokenizer, texts, args.steps, args.batch_size,
                               args.seq_length)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model.freeze()
    weights_mb = mx.get_active_memory() / MB
    mx.random.seed(args.seed)
    mesp_mlx.apply_lora(model, rank=args.rank, scale=args.scale)
    init = {k: mx.array(v) for k, v in adapter_weights(model).items()}
    # B = 0 at init makes every dA zero: check gradients where B is not
    probe = {k: 0.01 * mx.random.normal(v.shape).astype(v.dtype) if k.endswith("lora_b")
             else v for k, v in init.items()}
    mx.eval(init, probe)
    n_lora = sum(v.size for v in init.values())
    print(f"{resolved}: {len(batches)} batches of {args.batch_size} x {args.seq_length} "
          f"tokens, methods {', '.join(args.methods)}", file=sys.stderr)
    rows = {}
    for m in args.methods:
        print(f"  {m} ...", file=sys.stderr, flush=True)
        try:
            rows[m] = run_method(model, init, probe, m, batches, args)
        except (RuntimeError, ValueError, MemoryError) as e:   # e.g. out of memory: keep the row
            rows[m] = {"status": f"failed: {str(e).splitlines()[0][:80]}"}
    ref = "autodiff" if "autodiff" in rows else next(iter(rows))
    print(table(rows, ref))
    print()
    print(footer(args, resolved, weights_mb, n_lora))
    return 0


if __name__ == "__main__":
    sys.exit(main())
