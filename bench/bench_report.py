"""Markdown tables, linear-fit slopes and the environment footer for memory_bench.

The section is written between START/END markers so that RESULTS.md can hold
other sections (gradient cosine, convergence) written by other scripts.
MB = 2^20 bytes throughout.
"""

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

START = "<!-- memory_bench:start -->"
END = "<!-- memory_bench:end -->"
MB = 2**20


def _mb(x):
    return "" if x is None else f"{x / MB:.1f}"


def _status(row):
    s = row.get("status", "missing")
    if s == "ok":
        return "ok"
    err = (row.get("error") or "").replace("|", "/").replace("\n", " ")
    return f"{s}: {err[:70]}" if err else s


def _ratio(row, ref):
    if row.get("status") != "ok" or not ref or ref.get("status") != "ok":
        return ""
    return f"{row['s_per_step'] / ref['s_per_step']:.2f}"


def _cells(row, ref):
    ok = row.get("status") == "ok"
    return [_mb(row.get("peak_above_bytes")) if ok else "",
            _mb(row.get("peak_bytes")) if ok else "",
            _mb(row.get("rss_peak_bytes")) if ok else "",
            _mb(row.get("cache_bytes")) if ok else "",
            f"{row['s_per_step']:.2f}" if ok else "",
            _ratio(row, ref), _status(row)]


HEAD = ["peak above weights MB", "absolute peak MB", "process peak RSS MB",
        "cache after MB", "s/step", "time / autodiff", "status"]


def _table(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return out


def _weights_note(rows):
    w = {}
    for r in rows:
        if r.get("status") == "ok":
            w.setdefault(r["model"], []).append(r["weights_bytes"])
    return "; ".join(f"{m} {_mb(min(b))}" + ("" if _mb(min(b)) == _mb(max(b))
                     else f"–{_mb(max(b))}") + " MB" for m, b in w.items()) or "n/a"


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
    return (["", "Linear fit of peak above weights over T:", ""] + _table(head, out)
            + ["", f"Block checkpoints per token: n_layers × D × itemsize = "
                   f"{ck['n_layers']} × {ck['hidden']} × {ck['itemsize']} B = "
                   f"{per_tok / 1024:.1f} KB, i.e. {1000 * per_tok / MB:.1f} MB per 1k "
                   "tokens (the floor for any per-block checkpointing method)."])


def target_lines(rows, T=256, peak_mb=100.0, ratio=1.3):
    """Issue-3 targets for mesp at T 256: peak above weights and time vs autodiff."""
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
                   + ("met" if q <= ratio else f"missed, {q / ratio:.2f}× the goal") + ")")
    return ["", "Targets (issue 3): " + "; ".join(out) + "."]


def breakdown_lines(rows):
    """Where mesp's peak comes from: stored checkpoints, LoRA grads, phase peaks."""
    body = []
    for r in rows:
        ph = r.get("phases")
        if r.get("method") != "mesp" or r.get("status") != "ok" or not ph:
            continue
        body.append([r["model"], r["T"], r["r"], _mb(ph.get("checkpoint_bytes")),
                     _mb(ph.get("grad_bytes")), _mb(ph.get("peak_after_forward")),
                     _mb(ph.get("peak_after_head")), _mb(ph.get("peak_after_backward")),
                     f"{ph.get('forward_s', 0):.1f} / {ph.get('head_s', 0):.1f} / "
                     f"{ph.get('backward_s', 0):.1f}"])
    if not body:
        return []
    head = ["model", "T", "r", "checkpoints MB", "LoRA grads MB", "peak after forward MB",
            "after loss head MB", "after backward MB", "s forward / head / backward"]
    return (["", "mesp peak breakdown (measured step; peaks above weights, cumulative: the "
                 "phase whose column first reaches the final peak sets it; the block "
                 "working set is the backward peak minus checkpoints and grads):", ""]
            + _table(head, body))


def mezo_lines(rows):
    """MeZO's peak against one forward-only pass (inference) at the same point."""
    out = []
    for r in rows:
        if r.get("method") != "mezo" or r.get("status") != "ok" or \
                "inference_peak_above_bytes" not in r:
            continue
        lora = r["lora_params"] * r["itemsize"]
        d = r["peak_above_bytes"] - r["inference_peak_above_bytes"]
        out.append(f"{r['model']} T {r['T']} r {r['r']}: mezo {_mb(r['peak_above_bytes'])} MB "
                   f"vs inference {_mb(r['inference_peak_above_bytes'])} MB "
                   f"(+{_mb(d)} MB; all LoRA parameters: {_mb(lora)} MB)")
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
    worst = max((max(v) - min(v)) / max(abs(min(v)), 1e-12)
                for v in groups.values()) if groups else None
    if worst is None or all(len(v) < 2 for v in groups.values()):
        return []
    verdict = "agree" if worst < 1e-3 else "DISAGREE"
    return ["", f"Sanity: at each point all methods see identical weights and "
                f"tokens; their losses {verdict} (max relative spread {worst:.1e})."]


def sweep_section(sweep, rows):
    """One markdown table (+ fit) for a sweep; rows keyed like the sweep points."""
    lines = [f"### {sweep['title']}", "",
             f"Resident weights (incl. LoRA): {_weights_note(rows)}.", ""]
    ref = {(r["model"], r["T"], r["r"]): r for r in rows if r["method"] == "autodiff"}
    body = []
    for r in rows:
        lead = [r["model"]] if sweep["kind"] in ("size", "family") else []
        body.append(lead + [r["method"], r["T"], r["r"]]
                    + _cells(r, ref.get((r["model"], r["T"], r["r"]))))
    head = (["model"] if sweep["kind"] in ("size", "family") else []) + ["method", "T", "r"] + HEAD
    lines += _table(head, body)
    if sweep["kind"] == "seq":
        lines += slope_lines(rows)
        if {r["model"] for r in rows} == {"Qwen2.5-0.5B"}:
            lines += target_lines(rows)
    lines += breakdown_lines(rows)
    return lines + mezo_lines(rows) + _loss_check(rows) + [""]


def git_commit():
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    # the benchmarks' own outputs (RESULTS.md, raw JSONL rows) do not make a run "dirty"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--",
                     ":(top)", ":(top,exclude)bench/RESULTS.md",
                     ":(top,exclude)bench/*.jsonl"))
    return commit + (" (dirty: uncommitted changes to tracked files)" if dirty else "")


def collect_env(dtype: str) -> dict:
    """Everything the footer needs, read once in the parent process."""
    from importlib.metadata import version

    import mlx.core as mx
    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    pre = os.environ.get("LD_PRELOAD", "")
    cmd = shlex.join(["python"] + sys.argv)
    return {
        "device": ", ".join(f"{k} {v}" for k, v in mx.device_info().items()),
        "cpu": f"{cpu} ({os.cpu_count()} logical CPUs)",
        "os": platform.platform(), "python": platform.python_version(),
        "mlx": version("mlx"), "mlx_lm": version("mlx-lm"), "dtype": dtype,
        "commit": git_commit(), "ld_preload": pre,
        "command": (f"LD_PRELOAD={pre} " if pre else "") + cmd,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def footer(env, rows):
    blas = sorted({r["blas"] for r in rows if r.get("blas")}) or ["(no ok rows)"]
    pre = env["ld_preload"]
    blas_note = (f"OpenBLAS preloaded (`LD_PRELOAD={pre}`)" if "openblas" in pre
                 else "no OpenBLAS preload (MLX's bundled BLAS)")
    comp = {r.get("mlx_lm_compile", True) for r in rows
            if r.get("method", "").startswith("mlx-lm") and r.get("status") == "ok"}
    how = ("in the compiled step (`mx.compile`) of" if comp <= {True} else
           "without the `mx.compile` of" if comp == {False} else
           "(mixed: some rows with, some without the `mx.compile` of)")
    commits = sorted({r["commit"] for r in rows if r.get("commit")} - {env["commit"]})
    mixed = (f" (some rows measured at: {', '.join(commits)})" if commits else "")
    step_only = all(r.get("rss_peak_is_step_only") for r in rows if r.get("status") == "ok")
    return [
        "**Environment.** "
        f"Device: `{env['device']}`; CPU: {env['cpu']}; OS: {env['os']}; "
        f"Python {env['python']}; MLX {env['mlx']}; mlx-lm {env['mlx_lm']}; "
        f"dtype {env['dtype']}; commit {env['commit']}{mixed}; BLAS: {blas_note}, "
        f"mapped in the workers: {', '.join(blas)}; load average at start "
        f"{env['load']}; {env['date']}.",
        "",
        f"Command: `{env['command']}`",
        "",
        "Protocol: one fresh process per row; random weights, batch 1, LoRA "
        "scale 20 on all 7 projections of every block, B non-zero; step 1 is a "
        "warm-up, the numbers are from the following warm step(s). Peak above "
        "weights = `mx.get_peak_memory()` (reset before the measured step) − "
        "`mx.get_active_memory()` after build + LoRA. Process peak RSS = VmHWM "
        + ("reset just before the measured step (`/proc/self/clear_refs`), so it "
           "excludes the build" if step_only else "including the build")
        + ". Baselines: `mlx-lm` = mlx-lm's `linear_to_lora_layers` + "
        f"`nn.value_and_grad(model, default_loss)` {how} "
        "`mlx_lm.tuner.trainer.train`, evaluated with `mx.eval(state, loss, "
        "toks, grads)`; `mlx-lm+ckpt` adds its `grad_checkpoint`. "
        "`time / autodiff` is relative to our `autodiff` at the same point. "
        "MB = 2^20 bytes.",
    ]


def markers(name=None):
    """(start, end) markers of a RESULTS.md section (None: the main memory_bench one)."""
    if name is None:
        return START, END
    return f"<!-- memory_bench:{name}:start -->", f"<!-- memory_bench:{name}:end -->"


def render(sweeps, rows_for, env, name=None, title=None) -> str:
    """The whole memory_bench section, markers included."""
    start, end = markers(name)
    lines = [start, f"## {title or 'Memory and speed benchmark'} (`bench/memory_bench.py`)",
             ""]
    all_rows = []
    for sweep in sweeps:
        rows = rows_for(sweep)
        all_rows += rows
        lines += sweep_section(sweep, rows)
    lines += footer(env, all_rows) + [end]
    return "\n".join(lines) + "\n"


def environment_line(env) -> str:
    """One-paragraph environment footer from collect_env (for other bench scripts)."""
    return (f"**Environment.** Device: `{env['device']}`; CPU: {env['cpu']}; OS: "
            f"{env['os']}; Python {env['python']}; MLX {env['mlx']}; mlx-lm "
            f"{env['mlx_lm']}; dtype {env['dtype']}; commit {env['commit']}; load "
            f"average at start {env['load']}; {env['date']}. Command: `{env['command']}`")


def write_section(path: Path, section: str, start: str = START, end: str = END):
    """Replace (or append) the section between `start` and `end`, keeping the rest."""
    text = path.read_text() if path.exists() else "# Results\n"
    if not section.lstrip().startswith(start):       # the markers always go back in
        section = f"{start}\n{section.rstrip(chr(10))}\n{end}\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
