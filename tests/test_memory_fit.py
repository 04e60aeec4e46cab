"""`python -m mesp_mlx.memory --find` answers the largest
--max-seq-length / --batch-size / --rank that fits, from a name or a
config.json alone; --measure confirms it with one step."""

import json

import pytest

from mesp_mlx.models.configs import tiny_config
from mesp_mlx.memory import fit
from mesp_mlx.memory.cli import main
from mesp_mlx.memory.estimate import SPARE, arch_from_config, estimate


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().out


def _answer(out, target):
    line = next(x for x in out.splitlines() if x.startswith(f"largest --{target}"))
    return int(line.split(": ")[1].split()[0].rstrip(";"))


@pytest.mark.parametrize("hi,last", [(100, 37), (37, 37), (20, 20), (1, 1), (100, 0)])
def test_largest_is_the_boundary(hi, last):
    calls = []

    def fits(v):
        calls.append(v)
        return v <= last
    assert fit.largest(fits, hi) == min(last, hi)
    assert len(calls) <= 2 * hi.bit_length() + 2


CASES = [  # (target, model, method, T, B, rank, budget)
    ("max-seq-length", "Qwen2.5-0.5B", "mesp", 512, 1, 8, "iphone-6gb"),
    ("batch-size", "Qwen2.5-1.5B-Instruct-4bit", "mesp", 512, 1, 8, "3GB"),
    ("rank", "Qwen3-0.6B-bf16", "mebp", 256, 1, 8, "2GB"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_find_answers_the_largest_value_that_fits(capsys, case):
    from mesp_mlx.memory import resolve_budget
    from mesp_mlx.memory.cli import _DTYPES, _config, _parser, _resolve_variant
    target, model, method, T, B, r, budget = case
    flag = "--device-profile" if budget.startswith("iphone") else "--memory-budget"
    argv = ["--model", model, "--method", method, "--max-seq-length", T,
            "--batch-size", B, "--rank", r, flag, budget]
    rc, out = _run(capsys, *argv, "--find", target)
    assert rc == 0, out
    v = _answer(out, target)
    assert f"add to the training command: --{target} {v}" in out
    rc, again = _run(capsys, *argv, f"--{target}", v, "--no-measure")
    assert rc == 0 and "verdict: fits" in again, again           # v fits ...
    args = _resolve_variant(_parser().parse_args([str(a) for a in argv]))
    b = resolve_budget(*((None, budget) if flag == "--device-profile" else (budget, None)))

    def total(value):
        kw = {"max-seq-length": (value, B, r), "batch-size": (T, value, r),
              "rank": (T, B, value)}[target]
        arch = arch_from_config(_config(args), _DTYPES[args.dtype], args.quantize, kw[2])
        return estimate(arch, method, kw[0], kw[1], "adam").total_bytes
    assert total(v) <= b * (1 - SPARE) < total(v + 1)             # ... and v + 1 not


def test_find_from_a_config_json_or_model_dir_and_measure(tmp_path, capsys):
    cfg = tiny_config()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = arch_from_config(cfg)
    est = estimate(arch, "mesp", 128, 1)
    budget = int(est.total_bytes / (1 - SPARE))  # T 128 fits with the spare: a small answer
    for model in (tmp_path / "config.json", tmp_path):
        rc, out = _run(capsys, "--model", model, "--memory-budget", budget,
                       "--find", "max-seq-length", "--measure")
        assert rc in (0, 2), out
        v = _answer(out, "max-seq-length")
        assert abs(v - 128) <= 1 and "measured at --max-seq-length" in out, out
        assert ("fits, confirmed" in out) == (rc == 0)
    rc, out = _run(capsys, "--model", tmp_path, "--memory-budget", budget,
                   "--find", "batch-size", "--max-seq-length", 32)
    assert rc == 0 and _answer(out, "batch-size") >= 2


def test_find_needs_a_budget_and_reports_a_miss(capsys):
    assert main(["--model", "Qwen2.5-0.5B", "--find", "rank"]) == 1
    assert "needs a budget" in capsys.readouterr().err
    rc, out = _run(capsys, "--model", "Qwen2.5-3B", "--device-profile", "iphone-8gb",
                   "--find", "max-seq-length")
    assert rc == 2 and "DOES NOT FIT" in out and "The weights (" in out
    assert "--method mesp" not in out and "--quantize 4" in out     # mesp is the method


def test_a_budget_below_the_runtime_blames_the_runtime(capsys):
    rc, out = _run(capsys, "--model", "Qwen2.5-0.5B", "--memory-budget", "5MB")
    assert rc == 2 and "The runtime alone" in out and "weights" not in out.split(
        "verdict")[1].split("\n")[1]
