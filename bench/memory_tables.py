"""The markdown of memory_bench's sections: one table per sweep, the linear fit of the
peak over T, the mesp peak breakdown, MeZO against inference, and the footer."""

from bench.common import MB, footer, mb, status, table

HEAD = ["peak above weights MB", "absolute peak MB", "process peak RSS MB",
        "cache after MB", "s/step", "time / autodiff", "status"]
TARGET = dict(T=256, peak_mb=100.0, ratio=1.3)      # mesp at Qwen2.5-0.5B T 256


def _ratio(row, ref):
    if row.get("status") != "ok" or not ref or ref.get("status") != "ok":
        return ""
    return f"{row['s_per_step'] / ref['s_per_step']:.2f}"


def _cells(row, ref):
    ok = row.get("status") == "ok"
    return [mb(row.get("peak_above_bytes")) if ok else "",
            mb(row.get("peak_bytes")) if ok else "",
            mb(row.get("rss_peak_bytes")) if ok else "",
            mb(row.get("cache_bytes")) if ok else "",
            f"{row['s_per_step']:.2f}" if ok else "",
            _ratio(row, ref), status(row)]


def _weights_note(rows):
    w = {}
    for r in rows:
        if r.get("status") == "ok":
            w.setdefault(r["model"], []).append(r["weights_bytes"])
    return "; ".join(f"{m} {mb(min(b))}" + ("" if mb(min(b)) == mb(max(b))
                     else f"–{mb(max(b))}") + " MB" for m, b in w.items()) or "n/a"


def slope_lines(rows):
    """Per method: linear fit of peak above weights over T (needs ≥ 2 T)."""
    import numpy as np

    out, ck = [], None
    for method in dict.fromkeys(r["method"] for r in rows):
        ok = sorted((r["T"], r["peak_above_bytes"] / MB, r) for r in rows
                    if r["method"] == method and r.get("status") == "ok")
        if len({t for t, _, _ in ok}) < 2:
            continue
        T = np.array([t for t, _, _ in ok], float)
        y = np.array([p for _, p, _ in ok])
        k, c = np.polyfit(T, y, 1)
        r2 = 1 - ((y - (k * T + c)) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)
        out.append([method, f"{1000 * k:.1f}", f"{c:.1f}", f"{r2:.4f}",
                    f"{int(T.min())}–{int(T.max())}"])
        ck = ck or ok[0][2]
    if not out:
        return []
    per_tok = ck["n_layers"] * ck["hidden"] * ck["itemsize"]
    head = ["method", "slope MB per 1k tokens", "intercept MB", "R²", "T range"]
    return (["", "Linear fit of peak above weights over T:", ""] + table(head, out, "lrrrl")
            + ["", f"Block checkpoints per token: n_layers × D × itemsize = "
                   f"{ck['n_layers']} × {ck['hidden']} × {ck['itemsize']} B = "
                   f"{per_tok / 1e3:.1f} kB, i.e. {1000 * per_tok / MB:.1f} MB per 1k "
                   "tokens (the floor for any per-block checkpointing method)."])


def target_lines(rows, T=TARGET["T"], peak_mb=TARGET["peak_mb"], ratio=TARGET["ratio"]):
    """mesp's targets at T 256: peak above weights and time against autodiff."""
    at = {r["method"]: r for r in rows if r["T"] == T and r.get("status") == "ok"}
    if "mesp" not in at:
        return []
    m = at["mesp"]
    peak = m["peak_above_bytes"] / MB
    out = [f"mesp peak above weights at T {T}: {peak:.1f} MB (target ≤ {peak_mb:.0f} MB: "
           + ("met" if peak <= peak_mb else f"missed by {peak - peak_mb:.1f} MB") + ")"]
    if "autodiff" in at:
        q = m["s_per_step"] / at["autodiff"]["s_per_step"]
        out.append(f"time {q:.2f}× autodiff (target ≤ {ratio}×: "
                   + ("met" if q <= ratio else f"missed, {q / ratio:.2f}× the target") + ")")
    return ["", "Targets: " + "; ".join(out) + "."]


def breakdown_lines(rows):
    """Where mesp's peak comes from: stored checkpoints, LoRA grads, phase peaks."""
    body = []
    for r in rows:
        ph = r.get("phases")
        if r.get("method") != "mesp" or r.get("status") != "ok" or not ph:
            continue
        body.append([r["model"], r["T"], r["r"], mb(ph.get("checkpoint_bytes")),
                     mb(ph.get("grad_bytes")), mb(ph.get("peak_after_forward")),
                     mb(ph.get("peak_after_head")), mb(ph.get("peak_after_backward")),
                     f"{ph.get('forward_s', 0):.1f} / {ph.get('head_s', 0):.1f} / "
                     f"{ph.get('backward_s', 0):.1f}"])
    if not body:
        return []
    head = ["model", "T", "r", "checkpoints MB", "LoRA grads MB", "peak after forward MB",
            "after loss head MB", "after backward MB", "s forward / head / backward"]
    return (["", "mesp peak breakdown (measured step; peaks above weights, cumulative: the "
                 "phase whose column first reaches the final peak sets it; the block "
                 "working set is the backward peak minus checkpoints and grads):", ""]
            + table(head, body, "lrrrrrrrr"))


def mezo_lines(rows):
    """MeZO's peak against one forward-only pass (inference) at the same point."""
    out = []
    for r in rows:
        if r.get("method") != "mezo" or r.get("status") != "ok" or \
                "inference_peak_above_bytes" not in r:
            continue
        lora = r["lora_params"] * r["itemsize"]
        d = r["peak_above_bytes"] - r["inference_peak_above_bytes"]
        out.append(f"{r['model']} T {r['T']} r {r['r']}: mezo {mb(r['peak_above_bytes'])} MB "
                   f"vs inference {mb(r['inference_peak_above_bytes'])} MB "
                   f"(+{mb(d)} MB; all LoRA parameters: {mb(lora)} MB)")
    if not out:
        return []
    return ["", "MeZO = one real MeZO-SGD step (two forward passes, in-place update, "
                "lr 1e-4, ε 1e-2), against one forward-only pass at θ with the same "
                "blocks and chunked loss head; peaks above weights (which include the "
                "LoRA parameters): " + "; ".join(out) + "."]


def _loss_check(rows):
    """Same weights and tokens for every method: losses must agree."""
    groups = {}
    for r in rows:
        if r.get("status") == "ok":
            groups.setdefault((r["model"], r["T"], r["r"]), []).append(r["loss"])
    if all(len(v) < 2 for v in groups.values()):
        return []
    worst = max((max(v) - min(v)) / max(abs(min(v)), 1e-12) for v in groups.values())
    verdict = "agree" if worst < 1e-3 else "DISAGREE"
    return ["", f"Sanity: at each point all methods see identical weights and "
                f"tokens; their losses {verdict} (max relative spread {worst:.1e})."]


def sweep_section(sweep, rows):
    """One markdown table (+ fit, targets, breakdown) for a sweep's rows."""
    lines = [f"### {sweep['title']}", "",
             f"Resident weights (incl. LoRA): {_weights_note(rows)}.", ""]
    ref = {(r["model"], r["T"], r["r"]): r for r in rows if r["method"] == "autodiff"}
    lead = sweep["kind"] in ("size", "family")
    body = [([r["model"]] if lead else []) + [r["method"], r["T"], r["r"]]
            + _cells(r, ref.get((r["model"], r["T"], r["r"]))) for r in rows]
    head = (["model"] if lead else []) + ["method", "T", "r"] + HEAD
    lines += table(head, body, ("l" if lead else "") + "lrr" + "rrrrrr")
    if sweep["kind"] == "seq":
        lines += slope_lines(rows)
        if {r["model"] for r in rows} == {"Qwen2.5-0.5B"}:
            lines += target_lines(rows)
    lines += breakdown_lines(rows)
    return lines + mezo_lines(rows) + _loss_check(rows) + [""]


def protocol(rows) -> str:
    """How the rows were measured, and the baselines they are compared with."""
    comp = {r.get("mlx_lm_compile", True) for r in rows
            if r.get("method", "").startswith("mlx-lm") and r.get("status") == "ok"}
    how = ("in the compiled step (`mx.compile`) of" if comp <= {True} else
           "without the `mx.compile` of" if comp == {False} else
           "(some rows with, some without the `mx.compile` of)")
    return (
        "Protocol: one fresh process per row; random weights, batch 1, LoRA scale 20 on every "
        "linear of every block (a Qwen or Llama block's 7 projections), B non-zero; step 1 "
        "is a warm-up, the numbers are from "
        "the following warm step(s). Peak above weights = `mx.get_peak_memory()` (reset "
        "before the measured step) − `mx.get_active_memory()` after build + LoRA. Process "
        "peak RSS = VmHWM reset just before the measured step (`/proc/self/clear_refs`), so "
        "it excludes the build. Baselines: our `autodiff` (MLX autodiff of the whole model) "
        "at the same point, for `time / autodiff`; mlx-lm's own LoRA step: `mlx-lm` = its "
        "`linear_to_lora_layers` + `nn.value_and_grad(model, default_loss)` " + how + " "
        "`mlx_lm.tuner.trainer.train`, evaluated with `mx.eval(state, loss, toks, grads)`; "
        "`mlx-lm+ckpt` adds its `grad_checkpoint`.")


def section(title, sweeps, rows_for, reproduce) -> str:
    """A whole memory_bench section: `rows_for(sweep)` gives each sweep's rows."""
    lines, measured = [f"## {title}", ""], {}
    for sweep in sweeps:
        rows = rows_for(sweep)
        measured.update({id(r): r for r in rows if r.get("status") != "missing"})
        lines += sweep_section(sweep, rows)
    rows = list(measured.values())
    lines += [protocol(rows), "", footer(rows, reproduce=reproduce), ""]
    return "\n".join(lines)
