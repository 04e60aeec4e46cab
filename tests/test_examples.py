"""examples/ cannot rot: the quickstart notebook's code cells and
compare_methods.py run end to end on the bundled demo model."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
COMPARE = ROOT / "examples" / "compare_methods.py"
DEMO_MODEL = ROOT / "mesp_mlx" / "demo" / "model"

needs_demo = pytest.mark.skipif(
    not (DEMO_MODEL / "config.json").is_file(),
    reason=f"demo model not built ({DEMO_MODEL}/config.json missing; "
           "build it with `python -m mesp_mlx.demo.build`)")


def _env() -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=path)


def code_cells(path: Path) -> list:
    """The notebook's code cells as source strings, IPython magics dropped."""
    nb = json.loads(path.read_text())
    assert nb.get("nbformat") == 4, f"{path}: not an nbformat 4 notebook"
    out = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        out.append("\n".join(l for l in src.splitlines()
                             if not l.lstrip().startswith(("%", "!"))))
    return out


def test_notebook_is_valid_json_with_code():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 4
    kinds = {c["cell_type"] for c in nb["cells"]}
    assert kinds == {"code", "markdown"}
    for cell in nb["cells"]:
        assert isinstance(cell["source"], list) and "metadata" in cell
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, \
                "commit the notebook without outputs"
    for i, src in enumerate(code_cells(NOTEBOOK)):
        compile(src, f"{NOTEBOOK.name} code cell {i}", "exec")


@needs_demo
def test_notebook_runs_on_demo_model(tmp_path, monkeypatch):
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        pass
    monkeypatch.chdir(tmp_path)                     # the notebook writes its adapters here
    ns = {"__name__": "__main__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # e.g. plt.show() on Agg
        for i, src in enumerate(code_cells(NOTEBOOK)):
            try:
                exec(compile(src, f"{NOTEBOOK.name} code cell {i}", "exec"), ns)
            except Exception as e:
                raise AssertionError(f"{NOTEBOOK.name} code cell {i} failed: "
                                     f"{type(e).__name__}: {e}\n--- cell ---\n{src}") from e
    runs = ns["runs"]
    assert set(runs) == {"autodiff", "mebp", "mesp", "mezo"}
    for method, r in runs.items():
        assert len(r["loss"]) == len(r["peak_mb"]) == ns["ITERS"], method
        assert all(p > 0 for p in r["peak_mb"]), f"{method}: no memory recorded"
    for method in ("mebp", "mesp"):
        assert abs(runs[method]["loss"][0] - runs["autodiff"]["loss"][0]) < 1e-4, method
        assert ns["grad_error"][method] < 1e-3, (method, ns["grad_error"])
    assert max(runs["autodiff"]["peak_mb"]) > max(runs["mesp"]["peak_mb"]), \
        "the notebook's memory story is wrong: mesp should need less than autodiff"
    assert ns["tuned_valid"] < ns["base_valid"] - 1.0, \
        f"fine-tuning did not clearly lower the validation loss: " \
        f"{ns['base_valid']:.3f} -> {ns['tuned_valid']:.3f}"
    assert ns["after"] != ns["before"], "generations did not change after fine-tuning"
    assert (tmp_path / "quickstart_adapters" / "adapters.safetensors").is_file()

@needs_demo
def test_compare_methods_runs_on_demo_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(COMPARE), "--model", "demo", "--steps", "2",
         "--seq-length", "64"], cwd=tmp_path, env=_env(), capture_output=True,
        text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    rows = {line.split("|")[1].strip(): line for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    assert set(rows) >= {"autodiff", "mebp", "mesp", "mezo"}, out
    assert "failed" not in "".join(rows.values()), out
    for m in ("mebp", "mesp"):                      # exact methods: same gradient (B ≠ 0)
        worst_cos = float(rows[m].split("|")[8].split(",")[0])
        assert worst_cos > 0.9999, rows[m]
    assert "mlx" in out.lower() and "python" in out.lower(), "no environment footer"


def test_compare_methods_rejects_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, str(COMPARE), "--model", str(tmp_path / "nope"),
                           "--steps", "1"], capture_output=True, text=True, timeout=60,
                          env=_env())
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
