"""`python -m mesp_mlx.lora --stream-weights` on 4-bit model directories: the same
losses as the resident run, adapters that mlx-lm loads, clean errors."""

import re
import shutil

import mlx.core as mx
import pytest
from conftest import make_model_dir
from helpers import base, cli, losses

Q4 = {"group_size": 32, "bits": 4}


@pytest.fixture(scope="module")
def q4_dir(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = make_model_dir(tmp_path_factory.mktemp(f"q4_{family}"), family,
                                          quantize=Q4)
        return made[family]
    return get


@pytest.mark.parametrize("family,method", [("qwen2", "mesp"), ("qwen2", "mebp"),
                                           ("qwen2", "mezo"), ("gemma3", "mesp"),
                                           ("phi3", "mesp")])
def test_stream_weights_trains_like_resident_and_mlx_lm_loads(q4_dir, text_data, tmp_path,
                                                             family, method):
    import mlx_lm

    model_dir = q4_dir(family)
    runs = {}
    for name, extra in (("resident", ()), ("streamed", ("--stream-weights",))):
        rc, out, err = cli(*base(model_dir, text_data, tmp_path / name, "--train", "--test",
                                 "--iters", 2, "--method", method, "--optimizer", "sgd",
                                 "--lora-dtype", "bfloat16", *extra))
        assert rc == 0, err
        runs[name] = out
    assert "Streaming" in runs["streamed"]
    assert losses(runs["streamed"]) == losses(runs["resident"])
    test = [re.search(r"Test loss ([\d.]+)", o).group(1) for o in runs.values()]
    assert test[0] == test[1]
    model, tok = mlx_lm.load(str(model_dir), adapter_path=str(tmp_path / "streamed"))
    lora = [m for _, m in model.named_modules() if "lora_a" in m]
    assert lora and lora[0].lora_a.dtype == mx.bfloat16
    logits = model(mx.array([[1, 2, 3]]))
    assert bool(mx.all(mx.isfinite(logits)).item())


def test_truncated_weights_file_is_a_clean_error(q4_dir, text_data, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(q4_dir("qwen2"), d)
    f = d / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    rc, out, err = cli(*base(d, text_data, tmp_path / "ad", "--train", "--iters", 1,
                             "--stream-weights"))
    assert rc == 1 and "error:" in err and "Traceback" not in err
    assert "truncated" in err or "could not load" in err, err


def test_stream_weights_refuses_autodiff(q4_dir, text_data, tmp_path):
    rc, _, err = cli(*base(q4_dir("qwen2"), text_data, tmp_path / "ad", "--train",
                           "--stream-weights", "--method", "autodiff"))
    assert rc == 1 and "--stream-weights needs" in err


def test_report_and_memory_log_count_the_weights(q4_dir, text_data, tmp_path):
    import json

    log = tmp_path / "mem.jsonl"
    rc, out, err = cli(*base(q4_dir("qwen2"), text_data, tmp_path / "ad", "--train",
                             "--iters", 2, "--stream-weights", "--memory-log", log))
    assert rc == 0, err
    assert "above the weights" in out
    assert "frozen weights streamed from disk" in out
    assert "idle process with MLX imported" in out
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert recs and all("mlx_peak" in r and "mlx_peak_above_weights" in r for r in recs)
    assert all(r["mlx_peak"] >= r["mlx_peak_above_weights"] for r in recs)


def test_memory_cli_streams_and_prints_the_accounting(tmp_path, capsys):
    import json

    from mesp_mlx.models.configs import tiny_config
    from mesp_mlx.memory.cli import main as memory_main

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_config("qwen2", vocab_size=1024)))
    assert memory_main(["--config-json", str(cfg), "--max-seq-length", "16", "--quantize",
                        "4", "--dtype", "bfloat16", "--lora-dtype", "bfloat16",
                        "--optimizer", "sgd", "--stream-weights"]) == 0
    out = capsys.readouterr().out
    assert "streamed weights" in out and "streamed from disk" in out
    assert "MLX peak" in out and "in total (weights included)" in out
    assert "idle process with MLX imported" in out
    assert memory_main(["--config-json", str(cfg), "--method", "autodiff",
                        "--stream-weights"]) == 1


def test_test_only_with_adapters_streamed_equals_resident(q4_dir, text_data, tmp_path):
    d = q4_dir("qwen2")
    rc, _, err = cli(*base(d, text_data, tmp_path / "ad", "--train", "--iters", 1))
    assert rc == 0, err
    got = []
    for extra in ((), ("--stream-weights",)):
        rc, out, err = cli("--model", d, "--data", text_data, "--test", "--adapter-path",
                           tmp_path / "ad", "--max-seq-length", 128, *extra)
        assert rc == 0, err
        got.append(re.search(r"Test loss ([\d.]+)", out).group(1))
    assert got[0] == got[1]
