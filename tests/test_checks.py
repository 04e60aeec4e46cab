"""Cheap checks run before the model loads (a hub
model: before the download) and before anything is written."""

import os

import pytest
from conftest import sentence, write_jsonl
from helpers import base, cli

from mesp_mlx.train import prechecks as checks
from mesp_mlx.errors import ConfigError

HUB = "nobody/no-such-model"        # loading it would fail (offline): it must not be reached


def _early(tmp_path, text_data, *extra):
    rc, out, err = cli("--model", HUB, "--data", text_data, "--train",
                       "--adapter-path", tmp_path / "ad", *extra)
    assert rc == 1 and "Traceback" not in out + err, (out, err)
    assert HUB not in err, "the model was loaded first"
    assert not (tmp_path / "ad").exists()
    return err


@pytest.mark.parametrize("extra,expect", [
    (["--device-profile", "pixel-9"], r"unknown device profile 'pixel-9'"),
    (["--memory-budget", "lots"], r"cannot read memory size 'lots'"),
    (["--resume-adapter-file", "/no/such/adapters.safetensors"], r"adapter file .* not found"),
])
def test_cheap_errors_come_before_the_model(tmp_path, text_data, extra, expect):
    import re
    assert re.search(expect, _early(tmp_path, text_data, *extra))


def test_missing_data_folder_comes_before_the_model(tmp_path):
    rc, out, err = cli("--model", HUB, "--data", tmp_path / "nodata", "--train")
    assert rc == 1 and "data directory" in err and "not found" in err and HUB not in err


def test_bad_data_line_comes_before_the_model(tmp_path):
    d = tmp_path / "d"
    write_jsonl(d / "train.jsonl", [{"text": sentence(1)}])
    with open(d / "train.jsonl", "ab") as f:
        f.write(b'{"text": "\xff"}\n')
    rc, out, err = cli("--model", HUB, "--data", d, "--train")
    assert rc == 1 and "train.jsonl:2: not valid UTF-8" in err and HUB not in err


def test_adapter_path_under_a_regular_file(tmp_path, text_data):
    (tmp_path / "file").write_text("x")
    rc, out, err = cli("--model", HUB, "--data", text_data, "--train",
                       "--adapter-path", tmp_path / "file" / "ad")
    assert rc == 1 and "lies under" in err and "regular file" in err
    rc, out, err = cli("--model", HUB, "--data", text_data, "--train",
                       "--adapter-path", tmp_path / "file")
    assert rc == 1 and "is a file, not a directory" in err
    assert (tmp_path / "file").read_text() == "x"


def test_read_only_adapter_path(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:                      # root writes anywhere: simulate instead
        ro.chmod(0o555)
    else:
        monkeypatch.setattr(checks.os, "access", lambda p, mode: False)
    try:
        with pytest.raises(ConfigError, match=r"ro is not writable"):
            checks.check_writable_dir(ro / "ad")
    finally:
        ro.chmod(0o755)


def test_memory_log_in_missing_directory(tmp_path, text_data):
    err = _early(tmp_path, text_data, "--memory-log", tmp_path / "no" / "mem.jsonl")
    assert "--memory-log" in err and "does not exist" in err


def test_num_layers_above_the_layer_count(tiny_model_dir, text_data, tmp_path):
    rc, out, err = cli(*base(tiny_model_dir, text_data, tmp_path / "ad", "--train",
                             "--num-layers", 5))
    assert rc == 1 and "Traceback" not in out + err
    assert "--num-layers 5 is more than the model's 2 blocks" in err
    assert not (tmp_path / "ad").exists()


def test_unknown_lora_key_is_clean(tiny_model_dir, text_data, tmp_path):
    (tmp_path / "c.yaml").write_text("lora_parameters: {keys: [nope_proj]}\n")
    rc, out, err = cli(*base(tiny_model_dir, text_data, tmp_path / "ad", "--train",
                             "--config", tmp_path / "c.yaml"))
    assert rc == 1 and "unknown LoRA key 'nope_proj'" in err and "Traceback" not in err
