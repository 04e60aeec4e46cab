"""The benchmarks in bench/: one point measured on a tiny config (in process and in a
subprocess), the tables they render, and the package's own hygiene (every module
imports without side effects, RESULTS.md is what `python -m bench.report` writes)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mesp_mlx.models.configs import tiny_config

from bench import common, memory_bench, memory_tables, point, report

ROOT = Path(__file__).resolve().parent.parent

BENCH_MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts)
    for p in [*(ROOT / "bench").glob("*.py"), *(ROOT / "bench" / "probes").glob("*.py")]
    if p.name != "__init__.py")


def _spec(**kw):
    spec = dict(model="tiny", config=tiny_config(), dtype="float32", T=12, r=4,
                method="autodiff", scale=20.0, steps=1, seed=0, mlx_lm_compile=False)
    spec.update(kw)
    return spec


def test_multi_step_breakdown_is_the_last_steps_own():
    three = point.run(_spec(method="mesp", T=64, steps=3))
    assert len(three["step_times_s"]) == 3
    # the forward phase's peak is not contaminated by the earlier steps' backward peaks
    ph = three["phases"]
    assert ph["peak_after_forward"] < 0.9 * ph["peak_after_backward"]
    assert ph["peak_after_backward"] <= three["peak_above_bytes"]


def test_point_measures_sane_numbers():
    row = point.run(_spec())
    assert row["status"] == "ok", row
    # resident bytes are the parameters (+ the tiny token batch)
    assert row["param_bytes"] <= row["weights_bytes"] < row["param_bytes"] + 4096
    assert row["peak_bytes"] - row["weights_bytes"] == row["peak_above_bytes"] > 0
    assert row["s_per_step"] > 0 and math.isfinite(row["loss"])
    # r (d_in + d_out) per projection, D 64, kv width 32, F 128, 2 blocks
    per_block = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert row["lora_params"] == 2 * per_block


def test_mlx_lm_baseline_sees_the_same_weights_and_loss():
    ours = point.run(_spec())
    theirs = point.run(_spec(method="mlx-lm"))
    assert theirs["status"] == "ok", theirs
    assert theirs["lora_params"] == ours["lora_params"]
    assert abs(theirs["loss"] - ours["loss"]) <= 1e-5 * abs(ours["loss"])


def test_failures_become_rows():
    assert point.run(_spec(method="nope"))["status"] == "unsupported"
    bad = point.run(_spec(config=dict(tiny_config(), hidden_size=-8)))
    assert bad["status"] == "error" and bad["error"]
    row = memory_bench.run_point(_spec(), timeout=0.01)
    assert row["status"] == "timeout" and row["method"] == "autodiff"


def test_cli_runs_resumes_and_stamps_rows(tmp_path, capsys):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_config()))
    raw = tmp_path / "rows.jsonl"
    before = common.RESULTS_MD.read_text()
    argv = ["--config-json", str(cfg), "--seq-lens", "8", "--ranks",
            "--methods", "autodiff", "--results", str(raw)]
    assert memory_bench.main(argv) == 0             # one point, in a `python -m` worker
    rows = common.load_rows(raw)
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["T"] == 8
    assert set(common.STAMP) <= set(rows[0]) and rows[0]["mlx"] and rows[0]["date"]
    assert "python -m bench.memory_bench --config-json" in rows[0]["command"]
    text = capsys.readouterr().out
    assert "| autodiff | 8 | 8 |" in text and "| autodiff | 8 | 4 |" not in text
    assert "**Environment.**" in text and "Command: `" in text and "MLX 0." in text
    assert memory_bench.main(argv + ["--resume"]) == 0          # nothing to rerun
    assert "0 to run" in capsys.readouterr().out
    assert len(raw.read_text().splitlines()) == 1
    assert memory_bench.main(argv + ["--resume", "--dry-run"]) == 0  # dry run honours resume
    assert capsys.readouterr().out.strip().endswith("1 points, 0 to run")
    assert common.RESULTS_MD.read_text() == before      # a custom --results leaves it alone


def test_preset_full_holds_the_whole_grid():
    def points(preset):
        return {tuple(sorted(pt.items())) for s in preset for pt in s["points"]}
    grid = points(memory_bench.preset_grid(memory_bench.DEFAULT_METHODS))
    full = points(memory_bench.preset_full(memory_bench.ALL_METHODS_FULL))
    assert len(grid) == 45 and grid < full
    assert {p for p in full - grid} == {
        (("T", 256), ("method", m), ("model", "Qwen2.5-0.5B"), ("r", 8))
        for m in ("mesp@block", "mesp@none")}


def test_bad_cli_input_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        memory_bench.parse_args(["--methods", "sgd"])
    assert "unknown method 'sgd'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        memory_bench.parse_args(["--models", "7B"])
    assert "no bundled architecture" in capsys.readouterr().err


def _row(method, T, peak_mb, s):
    return dict(model="Qwen2.5-0.5B", method=method, T=T, r=8, status="ok",
                peak_above_bytes=peak_mb * 1e6, peak_bytes=(peak_mb + 1900) * 1e6,
                weights_bytes=1900 * 1e6, rss_peak_bytes=None, cache_bytes=0,
                s_per_step=s, loss=12.0, n_layers=24, hidden=896, itemsize=4)


def test_report_slopes_ratios_targets_and_failed_rows():
    rows = [_row("autodiff", T, 5.5 * T, 10.0) for T in (128, 256)]
    rows += [_row("mesp", T, 40 + 0.1 * T, 12.0) for T in (128, 256)]
    rows.append(dict(model="Qwen2.5-0.5B", method="mlx-lm", T=256, r=8,
                     status="oom", error="Unable to allocate | 9 GB"))
    text = "\n".join(memory_tables.sweep_section(dict(kind="seq", title="T sweep"), rows))
    assert "| mesp | 256 | 8 | 65.6 | 1965.6 |" in text and "| 1.20 | ok |" in text
    assert "| mlx-lm | 256 | 8 |" in text and "oom: Unable to allocate / 9 GB" in text
    assert "| mesp | 100.0 | 40.0 | 1.0000 | 128–256 |" in text          # MB per 1k
    assert "24 × 896 × 4 B = 86.0 kB" in text
    assert "target ≤ 100 MB: met" in text and "target ≤ 1.3×: met" in text


def test_footer_names_every_value_and_what_is_missing():
    env = dict(commit="abc", dirty=False, date="2026-01-02", host="h", device="d",
               mlx="0.1", mlx_lm="0.2", command="python -m bench.x")
    rows = [dict(env, dtype="float32"), dict(env, commit="def", dirty=True, dtype="float32"),
            dict(dtype="float32")]
    text = common.footer(rows)
    assert "commit abc (1 row), def with uncommitted changes (1 row), not recorded (1 row)" \
        in text
    assert "dtype float32" in text and "2026-01-02 (1 row not dated)" in text
    assert common.footer([dict(dtype="x")], reproduce="python -m bench.y").endswith(
        "to reproduce: `python -m bench.y`.")


def test_mezo_point_is_a_real_step_at_inference_memory():
    ours = point.run(_spec(T=256))
    row = point.run(_spec(T=256, method="mezo"))
    assert row["status"] == "ok", row
    assert abs(row["loss"] - ours["loss"]) <= 1e-5 * abs(ours["loss"])   # L(θ), same θ
    assert math.isfinite(row["mezo_loss"])
    assert row["peak_above_bytes"] < ours["peak_above_bytes"]
    # ≈ inference: + one block's perturbed LoRA copy, and allocator noise at this tiny size
    assert row["peak_above_bytes"] <= 1.05 * row["inference_peak_above_bytes"] + 96 * 1024
    text = "\n".join(memory_tables.mezo_lines([dict(row, model="tiny", method="mezo",
                                                    T=256, r=4)]))
    assert "mezo" in text and "vs inference" in text


def test_gradient_cosine_smoke(tmp_path, capsys):
    from bench import gradient_cosine
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_config()))
    raw = tmp_path / "gc.jsonl"
    assert gradient_cosine.main(["--models", str(cfg), "--seq-len", "8", "--seeds", "4",
                                 "--ks", "1", "4", "--ideal-samples", "8", "--ideal-ks",
                                 "1", "8", "--results", str(raw)]) == 0
    row = json.loads(raw.read_text())
    assert "python -m bench.gradient_cosine --models" in row["command"]
    assert row["d"] == 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3) * 2
    assert abs(row["cos_mesp_autodiff"] - 1) < 1e-6 and row["sign_agree"] >= 3
    assert 0 < row["abs_cos"]["mean"] < 0.1 and set(row["ideal_k"]) == {"1", "8"}
    assert "Paper comparison" in capsys.readouterr().out
    # a second model run alone keeps the first one's row; both are rendered, and the
    # footer names each row's commit
    raw.write_text(json.dumps(dict(row, commit="0ld0ld")) + "\n")
    cfg2 = tmp_path / "tiny2.json"
    cfg2.write_text(json.dumps(dict(tiny_config(), num_hidden_layers=1)))
    assert gradient_cosine.main(["--models", str(cfg2), "--seq-len", "8", "--seeds", "2",
                                 "--ks", "1", "--ideal-samples", "2", "--ideal-ks", "1",
                                 "--no-autodiff", "--results", str(raw)]) == 0
    text = gradient_cosine.section(common.load_rows(raw))
    assert "| tiny | " in text and "| tiny2 | " in text
    assert text.count("**Environment.**") == 1 and "commit 0ld0ld" in text
    assert "standard errors" in text and "(measured − theory) / s.e." in text
    assert gradient_cosine.theory(1, 10**6) == pytest.approx(math.sqrt(2 / (math.pi * 1e6)),
                                                            rel=1e-5)


def test_convergence_smoke(tiny_model_dir, completion_data, tmp_path, capsys):
    from bench import convergence
    raw = tmp_path / "c.jsonl"
    rc = convergence.main(["--model", str(tiny_model_dir), "--data", str(completion_data),
                           "--iters", "3", "--val-every", "2", "--methods", "autodiff",
                           "mesp", "mezo", "--results", str(raw), "--png",
                           str(tmp_path / "c.png")])
    assert rc == 0
    runs = common.load_rows(raw)
    assert [len(r["losses"]) for r in runs] == [3, 3, 3] and runs[0]["commit"]
    text = capsys.readouterr().out
    assert "| mezo | MeZO-SGD, ε 0.01 |" in text
    assert "- mesp vs autodiff: max per-step loss difference" in text and "; within." in text


def test_data_parallel_all_reduce_size_and_speedup_model():
    """The LoRA gradient count of a real config equals apply_lora's (tiny family) and
    the 0.5B r 8 figure (17.6 MB); the model's speedup tends to N as the link gets
    faster."""
    from mlx.utils import tree_flatten

    from bench import data_parallel_speed as dp
    from mesp_mlx.engine.lora_layers import apply_lora
    from mesp_mlx.models.configs import CONFIGS, build_model

    cfg = tiny_config()
    model = apply_lora(build_model(cfg, seed=0), rank=3)
    n = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    assert dp.lora_params(cfg, 3) == n
    assert dp.lora_params(CONFIGS["Qwen2.5-0.5B"], 8) == 4_399_104
    assert round(4 * 4_399_104 / 1e6, 1) == 17.6
    slow, fast = (dp.speedup(10.0, 17.6e6, 4, bw, 1e-4) for bw in (1e8, 1e11))
    assert slow < fast < 4.0 and fast > 3.99
    assert dp.allreduce_s(1e6, 1, 1e9) == 0.0


def test_packing_bench_measures_the_same_examples():
    """Packed and unpacked epochs see the same tokens and give the same mean loss; the
    table names its baseline."""
    import mesp_mlx
    from bench import packing_speed
    from mesp_mlx.models.configs import build_model

    model = build_model(tiny_config(), seed=0)
    mesp_mlx.apply_lora(model, rank=4)
    ds = packing_speed.skewed(12, 256, 40, seed=1)
    rows = [packing_speed.measure(model, ds, 2, 0), packing_speed.measure(model, ds, 2, 48)]
    assert rows[0]["tokens"] == rows[1]["tokens"] == sum(len(t) - 1 for t in ds.tokens)
    assert rows[1]["steps"] < rows[0]["steps"] and rows[1]["shape"] <= 48
    assert abs(rows[0]["loss"] - rows[1]["loss"]) <= 1e-5 * rows[0]["loss"]
    assert "unpacked (bucketed)" in "\n".join(packing_speed.table("x", rows))


def test_flop_floor_counts_the_real_projections():
    """The per-token projection count is the block's own weights (a lazily built
    Qwen2.5-0.5B, nothing allocated), and the minimal schedule's ratio lies between 1
    and 1 + the recompute share."""
    from mlx.utils import tree_flatten

    from bench import flop_floor
    from mesp_mlx.models.configs import build_model, config_for
    cfg = config_for("Qwen2.5-0.5B")
    model = build_model(cfg, lazy=True)
    weights = {k: v.size for k, v in tree_flatten(model.layers[0].parameters())
               if k.endswith("proj.weight")}
    p = flop_floor.per_token(cfg, 256)
    assert p["projections"] == sum(weights.values())
    assert p["forward"] - p["recompute"] == weights["mlp.down_proj.weight"]
    f = flop_floor.floor(cfg, 256)
    assert 1 < f["ratio"] < 1 + f["recompute_share"]
    assert f["ratio"] == pytest.approx(1.264, abs=1e-3)     # the README's figure


def test_results_md_is_what_the_report_writes():
    """`python -m bench.report` is deterministic, and bench/RESULTS.md is up to date with
    bench/results/; every section names its baseline and ends with its environment."""
    text = report.render()
    assert text == report.render() == common.RESULTS_MD.read_text(), \
        "bench/RESULTS.md is out of date: run python -m bench.report"
    assert "MB = 10⁶ bytes" in text
    sections = text.split("\n## ")[1:]
    assert len(sections) == len(report.sections())
    for s in sections:
        assert "aseline" in s and "**Environment.**" in s, s.splitlines()[0]


def test_every_bench_module_imports_without_side_effects():
    """Importing any bench/*.py or bench/probes/*.py module prints nothing and writes
    nothing (a fresh interpreter, as `python -m` would start)."""
    assert {"bench.report", "bench.point", "bench.probes.block_profile"} <= set(BENCH_MODULES)
    files = sorted(p for p in (ROOT / "bench").rglob("*") if "__pycache__" not in p.parts)
    stat = {p: p.stat().st_mtime_ns for p in files}
    code = ("import importlib, sys\n"
            f"for m in {BENCH_MODULES!r}:\n"
            "    importlib.import_module(m)\n"
            "assert sys.argv == ['-c']\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and p.stderr == ""
    after = sorted(p for p in (ROOT / "bench").rglob("*") if "__pycache__" not in p.parts)
    assert after == files and all(q.stat().st_mtime_ns == stat[q] for q in files)


PROCESS = re.compile(r"sys\.path|[i]ssue [0-9]+|stop [0-9]+|REFERENC[E] §|ARCHITECTURE[S] §")


def test_bench_has_no_path_patching_and_no_process_references():
    """No file in bench/ patches sys.path or cites an issue, a stop or a reference
    section; results live under bench/results/, none of them dated."""
    for p in (ROOT / "bench").rglob("*"):
        if p.is_file() and p.suffix in (".py", ".md", ".jsonl"):
            hits = PROCESS.findall(p.read_text())
            assert not hits, f"{p.relative_to(ROOT)}: {hits}"
    assert not list((ROOT / "bench").glob("*.jsonl"))
    for p in (ROOT / "bench" / "results").iterdir():
        assert not re.search(r"\d{4}-\d\d-\d\d|_[0-9a-f]{7}", p.name), p.name
