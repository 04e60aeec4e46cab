"""Data parallelism: measured loopback step times and the all-reduce, plus a
speedup MODEL for real links (not a measurement).

    python -m bench.data_parallel_speed

Measured: steps/s of `python -m mesp_mlx.lora --model demo` in one process (the
baseline) and under `mlx.launch -n 2 --backend ring` on 127.0.0.1 (same global batch),
and the time of one all_sum of the Qwen2.5-0.5B r 8 gradient buffer. Model: one step of
N ranks = T1·B/N + ring all-reduce 2(N−1)/N · S / bandwidth, with T1 the fastest
1-process step in bench/results/memory_bench.jsonl at run time.
"""

import argparse
import json
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench import common

RESULTS = common.RESULTS / "data_parallel_speed.jsonl"

# assumed link bandwidths (bytes/s) and per-message latencies (s), NOT measured here
LINKS = (("1 GbE", 0.117e9, 100e-6), ("10 GbE", 1.17e9, 50e-6),
         ("Thunderbolt 4 bridge, ring (TCP)", 2.5e9, 50e-6),
         ("Thunderbolt 5, JACCL (RDMA)", 8e9, 5e-6))
PROJ = ("q", "k", "v", "o", "gate", "up", "down")


def lora_params(config: dict, r: int) -> int:
    """r·(d_in + d_out) summed over the 7 projections of every block."""
    D, F, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    hd = config.get("head_dim") or D // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    dims = {"q": (D, q), "k": (D, kv), "v": (D, kv), "o": (q, D), "gate": (D, F),
            "up": (D, F), "down": (F, D)}
    return L * r * sum(a + b for a, b in (dims[p] for p in PROJ))


def allreduce_s(nbytes: float, n: int, bandwidth: float, latency: float = 0.0) -> float:
    """Ring all-reduce time: 2(N−1) messages, 2(N−1)/N of the buffer per link."""
    return 2 * (n - 1) * latency + 2 * (n - 1) / n * nbytes / bandwidth


def speedup(step_s: float, nbytes: float, n: int, bandwidth: float,
            latency: float = 0.0) -> float:
    """One process does the whole global batch in step_s; N ranks do 1/N of it
    each, then all-reduce (no overlap of compute and communication)."""
    return step_s / (step_s / n + allreduce_s(nbytes, n, bandwidth, latency))


def _port():
    for _ in range(100):
        p = random.randrange(20000, 59000)
        try:
            for q in (p, p + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
    raise RuntimeError("no free ports")


def _launch(n, prog):
    if n == 1:
        return prog
    return [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(n), "--backend",
            "ring", "--starting-port", str(_port()), "--", *prog]


def _env():
    return dict(common.subprocess_env(), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def step_seconds(n: int, method: str, iters=24, batch=8) -> float:
    """Seconds per step of the demo job over the last half (the first is warm-up)."""
    prog = [sys.executable, "-m", "mesp_mlx.lora", "--model", "demo", "--data", "demo",
            "--train", "--iters", str(iters), "--batch-size", str(batch),
            "--steps-per-report", str(iters // 2), "--val-batches", "0",
            "--method", method, "--adapter-path", "/tmp/mesp_dp_bench_ad"]
    out = subprocess.run(_launch(n, prog), capture_output=True, text=True, env=_env(),
                         timeout=900, stdin=subprocess.DEVNULL)
    rates = re.findall(r"Iter \d+: train loss [\d.]+, lr [^,]+, it/s ([\d.]+)", out.stdout)
    if len(rates) < 2:
        raise RuntimeError(f"no report from {n} rank(s):\n{out.stdout[-1500:]}"
                           f"{out.stderr[-1500:]}")
    return 1.0 / float(rates[-1])


def _worker_allreduce(nbytes: int, reps: int = 5):
    import mlx.core as mx
    g = mx.distributed.init(strict=True, backend="ring")
    x = mx.ones((nbytes // 4,), mx.float32)
    mx.eval(x)
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x, group=g))
        times.append(time.perf_counter() - t)
    if g.rank() == 0:
        print(json.dumps({"allreduce_s": sorted(times[1:])[len(times[1:]) // 2]}))


def allreduce_seconds(nbytes: int) -> float:
    prog = [sys.executable, "-m", "bench.data_parallel_speed", "--worker-allreduce",
            str(nbytes)]
    out = subprocess.run(_launch(2, prog), capture_output=True, text=True, env=_env(),
                         timeout=300, stdin=subprocess.DEVNULL)
    return json.loads(re.search(r"\{.*\}", out.stdout).group(0))["allreduce_s"]


def measured_step_s(model="Qwen2.5-0.5B", T=256, r=8) -> dict:
    """Fastest measured step per method in bench/results/memory_bench.jsonl (least
    disturbed by a shared CPU): {method: seconds}."""
    from bench.memory_bench import RESULTS as MEMORY
    best = {}
    for row in common.load_rows(MEMORY):
        if tuple(row.get(k) for k in ("model", "T", "r", "status")) == (model, T, r, "ok"):
            m = row["method"]
            best[m] = min(best.get(m, 1e9), row["s_per_step"])
    return best


def model_lines(step_s: dict, nbytes: int) -> list:
    ns = (2, 4, 8)
    head = ["| method (1-process step, s) | link (assumed GB/s, latency) | "
            "all-reduce at N=2, ms |"
            + "".join(f" N={n} |" for n in ns), "|---|---|---:|" + "---:|" * len(ns)]
    rows = []
    for method, size in (("mesp", nbytes), ("mezo", 24)):
        for name, bw, lat in LINKS:
            rows.append(f"| {method} ({step_s[method]:.1f}) | {name} ({bw / 1e9:g}, "
                        f"{lat * 1e6:g} µs) | {allreduce_s(size, 2, bw, lat) * 1e3:.3g} |"
                        + "".join(f" {speedup(step_s[method], size, n, bw, lat):.3f}x |"
                                  for n in ns))
    return head + rows


def section(rows) -> str:
    if not rows:
        return "## Data parallelism\n\nNo rows yet: `python -m bench.data_parallel_speed`.\n"
    res = rows[-1]                                    # the newest run
    n_params, nbytes, lb = res["lora_params"], res["allreduce_bytes"], res["loopback"]
    return "\n".join([
        "## Data parallelism", "",
        f"All-reduce per step at Qwen2.5-0.5B, r 8, 7 projections: {n_params:,} LoRA "
        f"gradients = {nbytes / 1e6:.1f} MB fp32 (MeZO: 3 scalars).", "",
        "Measured, 127.0.0.1 loopback (`mlx.launch -n 2 --backend ring`), demo model, "
        "global batch 8, s/step; baseline: one process (the ratio is 1 process / 2 ranks; "
        "both ranks share the same CPU cores, so this shows the overhead, not a speedup):",
        "", *common.table(["method", "1 process", "2 ranks", "ratio"],
                          [[m, f"{lb[m]['1']:.4f}", f"{lb[m]['2']:.4f}",
                            f"{lb[m]['1'] / lb[m]['2']:.2f}x"] for m in lb], "lrrr"),
        "", f"One all_sum of the {nbytes / 1e6:.1f} MB buffer over loopback: "
        f"{res['loopback_allreduce_s'] * 1e3:.1f} ms.", "",
        "MODEL, not a measurement: speedup = T1 / (T1/N + 2(N-1)·latency + 2(N-1)/N · S / "
        "bandwidth), T1 = the fastest 1-process step (Qwen2.5-0.5B, T 256, fp32) in the "
        "memory benchmark's rows when this ran, link bandwidths and latencies assumed:", "",
        *model_lines(res["step_s_measured_0.5B"], nbytes), "",
        common.footer([res], reproduce="python -m bench.data_parallel_speed"), ""])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker-allreduce"]:
        _worker_allreduce(int(argv[1]))
        return 0
    from mesp_mlx.models.configs import CONFIGS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    env = common.environment(common.command(__spec__.name, argv))
    n_params = lora_params(CONFIGS["Qwen2.5-0.5B"], 8)
    nbytes = 4 * n_params
    res = {"lora_params": n_params, "allreduce_bytes": nbytes,
           "step_s_measured_0.5B": measured_step_s(), "dtype": "float32 (demo model)"}
    res["loopback"] = {m: {"1": step_seconds(1, m), "2": step_seconds(2, m)}
                       for m in ("mesp", "mezo")}
    res["loopback_allreduce_s"] = allreduce_seconds(nbytes)
    common.append_row(args.results, res, env)
    print(section(common.load_rows(args.results)))
    common.wrote(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
