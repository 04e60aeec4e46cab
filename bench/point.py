"""Measure one benchmark point (model, T, r, method) in this process.

Run as `python -m bench.point SPEC_JSON` (memory_bench.run_point) in a fresh process
per point, so that peaks, allocator caches and mlx-lm's class-level `grad_checkpoint`
patch never leak between points. Prints one line `RESULT_PREFIX + json` on stdout.

Protocol: build the model (random weights) + LoRA (A, B random, B non-zero,
identical for every method), clear the cache, read the resident bytes; step 1
is a warm-up; reset the MLX peak (and the kernel's VmHWM) and time `steps`
warm steps. Every step ends with an `mx.eval` of loss and gradients.
mezo runs a real MeZO-SGD step (two forward passes + in-place update, no
gradients); its row also has the peak of one forward-only pass at θ
(`inference_peak_above_bytes`) and that pass's loss as `loss`, so it compares
with the other methods' L(θ) ((L+ + L−)/2 of the step is `mezo_loss`).
"""

import gc
import json
import math
import sys
import time
import traceback

RESULT_PREFIX = "MEMORY_BENCH_RESULT "
OURS = ("autodiff", "mebp", "mesp", "mezo")     # through mesp_mlx.value_and_grad
BASELINES = ("mlx-lm", "mlx-lm+ckpt")            # mlx-lm's own LoRA + trainer step
CACHE_VARIANTS = ("mesp@none", "mesp@block")   # mesp with another allocator-cache policy
VARIANTS = {"none": dict(clear_cache="none"), "block": dict(clear_cache="block"),
            "disk": dict(checkpoints="disk"),
            "stream": {},                        # method@variant -> EngineOptions fields
            "plan": {},                          # mesp@plan: spec["options"] has the budget
            "chunk": dict(token_chunk_bytes=1 << 40)}   # mesp@chunk: one token chunk
STREAMED = ("mesp@stream", "mebp@stream", "mezo@stream")   # weights streamed from disk
ALL_METHODS = OURS + BASELINES + CACHE_VARIANTS + ("mesp@disk", "mebp@disk") + STREAMED + \
    ("mesp@plan", "mesp@chunk")
B_STD = 0.01                                     # LoRA B ~ N(0, B_STD²): non-zero


def proc_status() -> dict:
    """VmRSS and VmHWM of this process in bytes (Linux; elsewhere VmHWM only)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, val = line.split(":")
                    out[key] = int(val.split()[0]) * 1024
    except OSError:                                  # macOS: ru_maxrss is in bytes
        import resource
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux); False where the OS can't."""
    from mesp_mlx.memory.footprint import reset_footprint_peak
    return reset_footprint_peak()


def blas_in_use() -> str:
    """Which BLAS library is mapped into this process."""
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        return "unknown"
    return "openblas" if "openblas" in maps else "bundled (reference BLAS)"


def unsupported_reason(method: str):
    """None if the method can run here, else a one-line reason."""
    if method in BASELINES:
        return None
    import mesp_mlx
    method = method.partition("@")[0]
    if method not in mesp_mlx.METHODS:
        return f"mesp_mlx.METHODS = {', '.join(mesp_mlx.METHODS)}"
    return None


def init_lora(model, seed: int):
    """Deterministic A (uniform ±1/√d_in) and non-zero B, same for all methods."""
    import mlx.core as mx

    layers = sorted((p, m) for p, m in model.named_modules()
                    if "lora_a" in m and "lora_b" in m)
    keys = mx.random.split(mx.random.key(seed), 2 * max(len(layers), 1))
    for i, (_, m) in enumerate(layers):
        d_in, r = m.lora_a.shape
        bound = 1 / math.sqrt(d_in)
        m.lora_a = mx.random.uniform(-bound, bound, m.lora_a.shape,
                                     key=keys[2 * i]).astype(m.lora_a.dtype)
        m.lora_b = (B_STD * mx.random.normal(m.lora_b.shape, key=keys[2 * i + 1])
                    ).astype(m.lora_b.dtype)
    return len(layers)


def _ours(model, spec, batch):
    import mlx.core as mx
    import mesp_mlx

    mesp_mlx.apply_lora(model, rank=spec["r"], scale=spec["scale"], dropout=0.0,
                        dtype=spec.get("lora_dtype"))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    if spec["method"].partition("@")[0] == "mezo":
        from mesp_mlx.engine import mezo

        def mezo_step():
            res = mezo.mezo_step(model, inputs, targets, lr=mezo.MEZO_LR, eps=mezo.MEZO_EPS)
            return mx.array(res.loss), []
        return mezo_step

    from mesp_mlx.engine.plan import EngineOptions

    method, _, policy = spec["method"].partition("@")     # e.g. "mesp@block"
    fields = dict(VARIANTS[policy]) if policy else {}
    fields.update(spec.get("options") or {})          # e.g. activation_budget (pareto)
    kw = {"options": EngineOptions(**fields)} if fields else {}
    phases = spec.setdefault("_phases", {})           # per-phase time and peak (mebp/mesp)
    if method in ("mebp", "mesp"):
        kw["stats"] = phases

    def step():
        loss, grads = mesp_mlx.value_and_grad(model, inputs, targets, method=method, **kw)
        mx.eval(loss, grads)
        return loss, grads
    return step


def _mlx_lm(model, spec, batch):
    """mlx-lm's LoRA path, mirroring tuner.trainer.train's compiled step."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.trainer import default_loss, grad_checkpoint
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()                                   # as mlx_lm.lora does first
    linear_to_lora_layers(model, len(model.layers), {
        "rank": spec["r"], "scale": spec["scale"], "dropout": 0.0})   # every block linear
    if spec["method"] == "mlx-lm+ckpt":
        grad_checkpoint(model.layers[0])
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    lengths = mx.array([[0, batch.shape[1]]])        # every target counts
    state = [model.state, mx.random.state]

    def fn(batch, lengths):
        (lvalue, toks), grad = loss_value_and_grad(model, batch, lengths)
        return lvalue, toks, grad
    if spec.get("mlx_lm_compile", True):
        fn = partial(mx.compile, inputs=state, outputs=state)(fn)

    def step():
        lvalue, toks, grad = fn(batch, lengths)
        mx.eval(state, lvalue, toks, grad)
        return lvalue, grad
    return step


def _inference(model, batch, weights_bytes) -> dict:
    """MeZO's reference: one forward-only pass at θ (same blocks and loss head)."""
    import mlx.core as mx
    from mesp_mlx.engine import mezo

    inputs, targets = batch[:, :-1], batch[:, 1:]
    mask = mx.ones(inputs.shape)
    mx.eval(mask)
    mx.reset_peak_memory()
    loss = mezo.lm_loss_at(model, inputs, targets, mask, mezo.Perturbation(model, 0))(0.0)
    out = {"inference_peak_above_bytes": mx.get_peak_memory() - weights_bytes,
           "inference_loss": loss}
    mx.clear_cache()
    return out


def _model(spec, row):
    """The model: built with random weights, or loaded from spec["model_dir"] (resident,
    or lazily and streamed for a method@stream)."""
    import mlx.core as mx
    from mesp_mlx.models.configs import build_model

    if not spec.get("model_dir"):
        q = {"group_size": 64, "bits": spec["quantize"]} if spec.get("quantize") else None
        if q and spec.get("quantize_only"):        # only the modules whose path has one of
            only = tuple(spec["quantize_only"])      # these names (e.g. a lookup table)
            q["class_predicate"] = lambda path, m: (hasattr(m, "to_quantized")
                                                    and any(s in path for s in only))
        cheap = bool(q) and spec.get("direct_quantized", False)
        model = build_model(spec.get("config") or spec["model"],
                            dtype=getattr(mx, spec["dtype"]), seed=spec["seed"], quantize=q,
                            lazy=cheap)
        return _direct_quantized(model, spec["seed"]) if cheap else model
    from pathlib import Path

    from mlx_lm.utils import load_model
    from mesp_mlx.engine.stream import stream_weights
    streamed = spec["method"].endswith("@stream")
    model = load_model(Path(spec["model_dir"]), lazy=streamed)[0]
    if streamed:
        ws = stream_weights(model, spec["model_dir"])
        row.update(streamed_bytes=ws.streamed_bytes(), block_bytes=ws.block_bytes())
    return model


def _direct_quantized(model, seed: int):
    """Random quantized weights drawn as such: every quantized module's packed weight
    gets random bits, its scales s ~ 0.01 |N(0, 1)| and biases −8 s, so the fp32 draw
    they would be quantized from is never materialised (gemma-4-E2B's is 18.5 GB).
    Shapes, dtypes and the quantized compute are the model's; only values differ."""
    import mlx.core as mx

    key = mx.random.key(seed)
    for _, m in model.named_modules():
        if "scales" in m and "weight" in m:
            key, k1, k2 = mx.random.split(key, 3)
            m.weight = mx.random.randint(0, 2**31 - 1, m.weight.shape, key=k1
                                         ).astype(mx.uint32)
            m.scales = (0.01 * mx.abs(mx.random.normal(m.scales.shape, key=k2))
                        ).astype(m.scales.dtype)
            m.biases = (-8 * m.scales).astype(m.biases.dtype)
            mx.eval(m.weight, m.scales, m.biases)
    mx.eval(model.parameters())
    return model


def _measure(spec) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mesp_mlx.engine.families import language_model
    from mesp_mlx.memory.footprint import idle_footprint
    from mesp_mlx.ops.frozen import quantized_path

    row = {"blas": blas_in_use(), "quantized_path": quantized_path(),
           "idle_rss_bytes": idle_footprint()}
    dtype = getattr(mx, spec["dtype"])
    t0 = time.perf_counter()
    model = _model(spec, row)
    args = language_model(model).args               # a VLM wrapper's: its text model's
    row.update(n_layers=args.num_hidden_layers, hidden=args.hidden_size,
               vocab=args.vocab_size, itemsize=dtype.size)
    batch = mx.random.randint(0, args.vocab_size, (1, spec["T"] + 1),
                              key=mx.random.key(spec["seed"] + 2)).astype(mx.int32)
    make = _mlx_lm if spec["method"] in BASELINES else _ours
    step = make(model, spec, batch)
    row["lora_layers"] = init_lora(model, spec["seed"] + 1)
    model.train()
    mx.eval(model.parameters(), batch)
    row["lora_params"] = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    gc.collect()
    mx.clear_cache()                                 # build leftovers are not the method's
    row["build_s"] = time.perf_counter() - t0
    row["weights_bytes"] = mx.get_active_memory()        # resident: weights (or not) + LoRA
    row["param_bytes"] = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    row["lora_bytes"] = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    row["rss_before_bytes"] = proc_status().get("VmRSS")
    if spec["method"].partition("@")[0] == "mezo":
        row.update(_inference(model, batch, row["weights_bytes"]))

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    loss, grads = step()
    row["first_step_s"] = time.perf_counter() - t0
    row["first_peak_bytes"] = mx.get_peak_memory()
    row["loss"] = loss.item()
    if "inference_loss" in row:                      # mezo: compare L(θ), keep (L+ + L−)/2
        row["mezo_loss"], row["loss"] = row["loss"], row.pop("inference_loss")
    del loss, grads
    gc.collect()
    if spec["steps"] == 0:                 # long points: the first (cold) step is the row
        return _cold_row(row, spec)

    row["rss_before_step_bytes"] = proc_status().get("VmRSS")
    row["rss_peak_is_step_only"] = reset_rss_peak()
    mx.reset_peak_memory()
    times, earlier_peak = [], 0
    for i in range(spec["steps"]):
        if i and i == spec["steps"] - 1:      # the phase breakdown is the last step's own
            earlier_peak = mx.get_peak_memory()
            mx.reset_peak_memory()
        t0 = time.perf_counter()
        loss, grads = step()
        times.append(time.perf_counter() - t0)
        if len(times) < spec["steps"]:
            del loss, grads
    row["peak_bytes"] = max(earlier_peak, mx.get_peak_memory())
    row["active_after_bytes"] = mx.get_active_memory()
    row["cache_bytes"] = mx.get_cache_memory()
    row["rss_peak_bytes"] = proc_status().get("VmHWM")
    row["step_times_s"] = times
    row["s_per_step"] = sum(times) / len(times)
    row["peak_above_bytes"] = row["peak_bytes"] - row["weights_bytes"]
    if spec.get("_phases"):                           # the measured step's breakdown
        row["phases"] = {k: (v - row["weights_bytes"] if k.startswith("peak_after_") else v)
                         for k, v in spec.pop("_phases").items()}
    return row


def _cold_row(row, spec) -> dict:
    """steps = 0: the first step (it includes the one-time spec check) is measured."""
    row.update(cold=True, peak_bytes=row["first_peak_bytes"],
               rss_peak_bytes=proc_status().get("VmHWM"),
               step_times_s=[row["first_step_s"]], s_per_step=row["first_step_s"],
               peak_above_bytes=row["first_peak_bytes"] - row["weights_bytes"])
    if spec.get("_phases"):
        row["phases"] = {k: (v - row["weights_bytes"] if k.startswith("peak_after_") else v)
                         for k, v in spec.pop("_phases").items()}
    return row


def _classify(exc: BaseException) -> str:
    msg = str(exc).lower()
    if isinstance(exc, MemoryError) or "allocate" in msg or "out of memory" in msg:
        return "oom"
    if isinstance(exc, (NotImplementedError, ModuleNotFoundError)):
        return "unsupported"
    return "error"


def run(spec: dict) -> dict:
    """Measure one point; never raises (failures become a status)."""
    try:
        reason = unsupported_reason(spec["method"])
        if reason:
            return {"status": "unsupported", "error": reason}
        row = _measure(spec)
        row["status"] = "ok"
        return row
    except BaseException as exc:                     # keep the row, whatever failed
        traceback.print_exc(file=sys.stderr)
        return {"status": _classify(exc), "error": f"{type(exc).__name__}: {exc}"}


def main(spec_json: str):
    spec = json.loads(spec_json)
    print(RESULT_PREFIX + json.dumps(run(spec)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
