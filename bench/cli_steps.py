"""The CLI as a user runs it: every step's memory and time, and the whole process.

    python -m bench.cli_steps --setting paper        # 4-bit 0.5B, streamed, bf16 LoRA, SGD
    python -m bench.cli_steps --setting default      # fp32 0.5B: the default plan vs autodiff

Each point is one `python -m mesp_mlx.lora --train` process on a random-weight copy of
the real Qwen2.5-0.5B (built once under --model-root, with the demo's tokenizer), with
--memory-log: the row keeps every step's MLX peak (weights included, and above the
resident weights), the step times, and the process's peak RSS (getrusage of the
child, which includes every library the CLI imports). Data: one text of 257 tokens
per example (--max-seq-length 257, so T = 256), batch 1, r 8 on all 7 projections.
`default` runs autodiff and the default plan alternately (A B A B), so each ratio
pairs runs made under the same load. MB = 10⁶ bytes.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common

RESULTS = common.RESULTS / "cli_steps.jsonl"
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SETTINGS = {
    "paper": dict(dtype="bfloat16", quantize=4, runs=(
        ("mesp, streamed", ("--stream-weights", "--lora-dtype", "bfloat16")),)),
    "default": dict(dtype="float32", quantize=None, runs=(
        ("autodiff", ("--method", "autodiff")), ("mesp, default plan", ()),
        ("autodiff", ("--method", "autodiff")), ("mesp, default plan", ()))),
}


def prepare(spec_json: str) -> int:
    """Worker: the random model as an mlx-lm directory with the demo's tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import mesp_mlx.demo as demo
    from mesp_mlx.models.configs import build_model, config_for

    spec = json.loads(spec_json)
    out = Path(spec["dir"])
    q = {"group_size": 64, "bits": 4} if spec["quantize"] else None
    cfg = config_for("Qwen2.5-0.5B")
    model = build_model(cfg, dtype=getattr(mx, spec["dtype"]), seed=0, quantize=q)
    tmp = out.with_suffix(".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (tmp / "config.json").write_text(json.dumps(dict(cfg, **({"quantization": q} if q else {})),
                                                indent=2))
    for name in TOKENIZER:
        shutil.copy(Path(demo.model_path()) / name, tmp / name)
    tmp.rename(out)
    return 0


def data_dir(root: Path) -> Path:
    """train.jsonl of long texts (cut to 257 tokens by the CLI) from the demo corpus."""
    import mesp_mlx.demo as demo

    d = root / "cli_steps_data"
    if not (d / "train.jsonl").exists():
        d.mkdir(parents=True, exist_ok=True)
        lines = [json.loads(x)["text"] for x in
                 (Path(demo.data_path("corpus")) / "train.jsonl").read_text().splitlines()]
        texts = [" ".join(lines[i:i + 40]) for i in range(0, 400, 40)]
        (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return d


def run_cli(model: Path, data: Path, iters: int, extra) -> dict:
    """One CLI process; its memory log, step times and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "mem.jsonl"
        argv = ["--model", str(model), "--data", str(data), "--train", "--iters", str(iters),
                "--batch-size", "1", "--max-seq-length", "257", "--optimizer", "sgd",
                "--learning-rate", "1e-4", "--val-batches", "0", "--steps-per-report", "1",
                "--adapter-path", str(Path(tmp) / "ad"), "--memory-log", str(log), *extra]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "mesp_mlx.lora", *argv], capture_output=True,
                           text=True, env=common.subprocess_env())
        wall = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        if p.returncode != 0:
            return {"status": "error", "error": (p.stderr or p.stdout)[-400:], "argv": argv}
        recs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        times = [b["time"] - a["time"] for a, b in zip(recs, recs[1:])]
        plan = next((x for x in p.stdout.splitlines() if x.startswith("activation plan")), None)
        return {"status": "ok", "argv": argv, "wall_s": wall, "plan": plan,
                "step_peaks": [r["mlx_peak"] for r in recs],
                "step_peaks_above_weights": [r.get("mlx_peak_above_weights") for r in recs],
                "step_s": times, "rss_peak_bytes": rss if rss > before * 1024 else None,
                "footprint_peak": max(r.get("footprint_peak") or 0 for r in recs)}


def measure(args, env):
    spec = SETTINGS[args.setting]
    name = f"Qwen2.5-0.5B-{'4bit-g64-bf16' if spec['quantize'] else spec['dtype']}"
    model = args.model_root / name
    if not model.exists():
        print(f"building {model} ...", flush=True)
        subprocess.run([sys.executable, "-m", "bench.cli_steps", "--prepare",
                        json.dumps({"dir": str(model), **{k: spec[k] for k in
                                                           ("dtype", "quantize")}})],
                       check=True, env=common.subprocess_env())
    data = data_dir(args.model_root)
    for label, extra in spec["runs"]:
        row = dict(run_cli(model, data, args.iters, extra), setting=args.setting, label=label,
                   model="Qwen2.5-0.5B", T=256, dtype=spec["dtype"])
        common.append_row(args.results, row, env)
        if row["status"] == "ok":
            print(f"{label}: step peaks (MB) "
                  + ", ".join(common.mb(p) for p in row["step_peaks"])
                  + f"; steps (s) " + ", ".join(f"{t:.2f}" for t in row["step_s"])
                  + f"; process peak {common.mb(row['footprint_peak'])} MB", flush=True)
        else:
            print(f"{label}: {row['error']}", flush=True)


def section(rows) -> str:
    """The RESULTS.md section: per-step peaks, step time ratio, process peak."""
    rows = [r for r in rows if r.get("status") == "ok"]
    last = {}                             # each setting's newest run (commit and date)
    for r in rows:
        last[r["setting"]] = (r.get("commit"), r.get("date"))
    rows = [r for r in rows if (r.get("commit"), r.get("date")) == last[r["setting"]]]
    if not rows:
        return ""
    out = ["## The CLI, step by step", "",
           "Qwen2.5-0.5B with random weights through `python -m mesp_mlx.lora`, T 256, "
           "batch 1, r 8 on all 7 projections, SGD. MLX peak of each step (weights "
           "included), time per step after the first, and the process's peak footprint. "
           "Baseline: `--method autodiff` through the same CLI, run alternately with the "
           "default plan (A B A B); for the paper setting, the engine-level rows above.", ""]
    body = []
    for r in rows:
        steady = r["step_s"][1:] or r["step_s"]
        body.append([r["setting"], r["label"], r["dtype"],
                     " / ".join(common.mb(p) for p in r["step_peaks"]),
                     common.mb(max(p for p in r["step_peaks_above_weights"] if p is not None)),
                     f"{sum(steady) / max(len(steady), 1):.2f}",
                     common.mb(r["footprint_peak"])])
    out += common.table(["setting", "run", "dtype", "MLX peak per step (MB)",
                         "max above weights (MB)", "s/step", "process peak (MB)"], body,
                        "lllrrrr")
    out += ["", *_default_goal(rows), common.footer(rows)]
    return "\n".join(out)


def _steady(r) -> float:
    t = r["step_s"][1:] or r["step_s"]
    return sum(t) / max(len(t), 1)


def _default_goal(rows) -> list:
    """The default plan against autodiff, pair by pair (A B A B): time and peak ratios."""
    auto = [r for r in rows if r["setting"] == "default" and r["label"] == "autodiff"]
    ours = [r for r in rows if r["setting"] == "default" and r["label"] != "autodiff"]
    if not auto or not ours:
        return []
    peak = lambda r: max(p for p in r["step_peaks_above_weights"] if p is not None)
    pairs = [f"{_steady(b) / _steady(a):.2f}× the time at {peak(b) / peak(a):.2f}× the "
             f"MLX peak above the weights" for a, b in zip(auto, ours)]
    return [f"Default plan against `--method autodiff`, pair by pair: {'; '.join(pairs)} "
            "(goal: ≤ 1.0× the time at ≤ 0.5× the peak).", ""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=tuple(SETTINGS), default="paper")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--model-root", type=Path, default=Path(tempfile.gettempdir()) / "mesp-models")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--prepare", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.prepare:
        return prepare(args.prepare)
    env = common.environment(common.command("bench.cli_steps", argv or sys.argv[1:]))
    measure(args, env)
    print(section(common.load_rows(args.results)))
    common.wrote(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
