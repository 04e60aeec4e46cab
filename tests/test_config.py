"""YAML and CLI values keep their declared types, and
non-finite or non-positive hyperparameters are rejected before anything loads."""

import contextlib
import io

import pytest

from mesp_mlx.errors import ConfigError
from mesp_mlx.train.config import TrainConfig, resolve
from mesp_mlx.lora import main

BASE = {"model": "m", "data": "d", "train": True}


def from_yaml(tmp_path, text):
    (tmp_path / "c.yaml").write_text("model: m\ndata: d\ntrain: true\n" + text)
    return resolve({}, str(tmp_path / "c.yaml")).validate()


def cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:          # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("text,match", [
    ("rank: 4.5\n", r"rank must be an integer, got 4.5 \(a float\)"),
    ("rank: 4.0\n", r"rank must be an integer"),
    ("iters: true\n", r"iters must be an integer, got True \(a boolean\)"),
    ("mask_prompt: \"no\"\n", r"mask_prompt must be true or false.*got 'no' \(a string\)"),
    ("mask_prompt: 1\n", r"mask_prompt must be true or false"),
    ("train: yes please\n", r"train must be true or false"),
    ("learning_rate: fast\n", r"learning_rate must be a number, got 'fast'"),
    ("scale: false\n", r"scale must be a number"),
    ("method: 3\n", r"method must be a string, got 3 \(an integer\)"),
    ("lora_parameters: {keys: q_proj}\n", r"lora_keys must be a list of strings"),
    ("optimizer_config: {adam: 3}\n", r"optimizer_config must be a mapping"),
])
def test_yaml_types_are_strict(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        from_yaml(tmp_path, text)


def test_yaml_numbers_that_are_fine(tmp_path):
    cfg = from_yaml(tmp_path, "learning_rate: 1e-5\nscale: 10\nrank: 4\nmask_prompt: no\n"
                    "memory_budget: 6000000000\n")
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.scale, float) and cfg.scale == 10.0
    assert cfg.rank == 4 and cfg.mask_prompt is False and cfg.memory_budget == "6000000000"


def test_python_api_config_is_checked_too():
    with pytest.raises(ConfigError, match="rank must be an integer"):
        TrainConfig(**BASE, rank=4.5).validate()


@pytest.mark.parametrize("field,value", [
    ("learning_rate", float("inf")), ("learning_rate", float("nan")), ("learning_rate", 0.0),
    ("learning_rate", -1e-3), ("scale", float("nan")), ("scale", 0.0), ("scale", float("inf")),
    ("mezo_eps", float("nan")), ("mezo_weight_decay", float("inf")),
    ("dropout", float("nan")),
])
def test_non_finite_or_non_positive_hyperparameters(field, value):
    with pytest.raises(ConfigError, match=field.replace("_", "-")):
        TrainConfig(**BASE, **{field: value}).validate()


@pytest.mark.parametrize("flag,value", [("--learning-rate", "inf"), ("--scale", "nan"),
                                        ("--learning-rate", "0")])
def test_cli_rejects_hyperparameters_before_loading(tmp_path, flag, value):
    # an unknown hub repo and a missing data folder: the hyperparameter is reported first
    rc, out, err = cli("--model", "nobody/no-such-model", "--data", tmp_path / "none",
                       "--train", flag, value, "--adapter-path", tmp_path / "ad")
    assert rc == 1 and f"{flag} must be a finite number > 0" in err, err
    assert "Traceback" not in out + err and not (tmp_path / "ad").exists()


def test_cli_bad_int_flag_is_exit_1(tmp_path):
    rc, out, err = cli("--model", "m", "--data", "d", "--train", "--rank", "4.5")
    assert rc == 1 and "--rank: invalid int value: '4.5'" in err
