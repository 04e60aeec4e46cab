"""mlx-lm's whole `mlx_lm.lora` YAML and CLI surface is accepted
with the same meaning, or refused with an error naming the alternative."""

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from conftest import make_model_dir, sentence, write_jsonl
from helpers import cli

from mesp_mlx.train import prechecks as checks, loop as trainer
from mesp_mlx.errors import ConfigError
from mesp_mlx.train.config import TrainConfig, load_yaml, resolve
from mesp_mlx.lora import build_parser

# The content of ml-explore/mlx-lm's mlx_lm/examples/lora_config.yaml (MIT
# licence), keys and values unchanged, comments shortened; model and data are
# given on the command line, which wins over YAML in both tools.
MLX_LM_EXAMPLE = """\
model: "mlx_model"
train: true
fine_tune_type: lora
training_mode: normal
optimizer: adamw
# optimizer_config:
#   adamw:
#     betas: [0.9, 0.98]
#     eps: 1e-6
#     weight_decay: 0.05
#     bias_correction: true
data: "/path/to/training/data"
seed: 0
num_layers: 16
batch_size: 4
iters: 1000
val_batches: 25
learning_rate: 1e-5
steps_per_report: 10
steps_per_eval: 200
resume_adapter_file: null
adapter_path: "adapters"
save_every: 100
test: false
test_batches: 100
max_seq_length: 2048
grad_checkpoint: false
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 8
  scale: 20.0
  dropout: 0.0
#lr_schedule:
#  name: cosine_decay
#  warmup: 100 # 0 for no warmup
#  warmup_init: 1e-7 # 0 if not specified
#  arguments: [1e-5, 1000, 1e-7] # passed to scheduler
"""


def mlx_lm_example() -> str:
    """The example as installed with mlx-lm when it ships it, else the copy above."""
    import mlx_lm
    f = Path(mlx_lm.__file__).parent / "examples" / "lora_config.yaml"
    return f.read_text() if f.is_file() else MLX_LM_EXAMPLE


@pytest.fixture(scope="module")
def model16(tmp_path_factory):
    """The example adapts 16 blocks: a tiny model with 16."""
    return make_model_dir(tmp_path_factory.mktemp("m16"), "qwen2", num_hidden_layers=16)


def test_mlx_lm_example_yaml_trains_unchanged(model16, text_data, tmp_path):
    (tmp_path / "lora_config.yaml").write_text(mlx_lm_example())
    rc, out, err = cli("-c", tmp_path / "lora_config.yaml", "--model", model16, "--data",
                       text_data, "--iters", 2, "--adapter-path", tmp_path / "ad",
                       "--max-seq-length", 64)
    assert rc == 0, err + out[-2000:]
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["num_layers"] == 16 and cfg["optimizer"] == "adamw"
    assert cfg["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert cfg["learning_rate"] == 1e-5 and cfg["steps_per_save"] == 100
    w = mx.load(str(tmp_path / "ad" / "adapters.safetensors"))
    assert len(w) == 16 * 2 * 2           # 16 blocks x {q, v} x {lora_a, lora_b}
    # and the commented-out schedule, uncommented, is read as mlx-lm reads it
    lines, on = [], False
    for line in mlx_lm_example().splitlines():
        on = line.startswith("#lr_schedule:") or (on and line.startswith("#  "))
        lines.append(line[1:] if on else line)
    (tmp_path / "s.yaml").write_text("\n".join(lines) + "\n")
    s = load_yaml(tmp_path / "s.yaml")["lr_schedule"]
    assert s["name"] == "cosine_decay" and s["warmup"] == 100
    resolve({}, str(tmp_path / "s.yaml")).validate()


def test_every_mlx_lm_default_key_is_accepted(tmp_path):
    from mlx_lm.lora import CONFIG_DEFAULTS
    raw = dict(CONFIG_DEFAULTS, model="m", data="d", train=True)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = resolve({}, str(tmp_path / "c.yaml")).validate()
    assert cfg.num_layers == 16 and cfg.steps_per_save == 100 and cfg.method == "mesp"


def test_every_mlx_lm_cli_flag_exists():
    from mlx_lm.lora import build_parser as mlx_parser
    ours = {o for a in build_parser()._actions for o in a.option_strings}
    theirs = {o for a in mlx_parser()._actions for o in a.option_strings}
    assert theirs - ours == set()
    ns = build_parser().parse_args(["--clear-cache-threshold", "1GB", "--report-to", "x",
                                    "--project-name", "p", "--trust-remote-code",
                                    "--fine-tune-type", "lora", "--grad-checkpoint",
                                    "--optimizer", "muon"])
    assert ns.clear_cache_threshold == "1GB" and ns.grad_checkpoint is True


BASE = {"model": "m", "data": "d", "train": True}


@pytest.mark.parametrize("kw,match", [
    ({"fine_tune_type": "dora"}, "fine_tune_type dora is not supported.*lora.*mlx_lm.lora"),
    ({"fine_tune_type": "full"}, "fine_tune_type full is not supported.*mlx_lm.lora"),
    ({"train_mode": "grpo"}, "mlx-lm-lora"),
    ({"report_to": "tensorboard"}, "not a known service; choose from wandb, swanlab"),
    ({"report_to": "wandb"}, "pip install wandb"),
    ({"clear_cache_threshold": "lots"}, "clear-cache-threshold"),
    ({"hf_dataset": {"path": "x", "chosen_feature": "c"}}, "mlx-lm-lora"),
    ({"hf_dataset": {"train_split": "train"}}, "needs `path`"),
    ({"save_best": True, "val_batches": 0}, "--val-batches must not be 0"),
])
def test_refused_keys_name_the_alternative(kw, match, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)          # not installed
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**BASE, **kw).validate()


def test_grad_checkpoint_selects_mebp_unless_a_method_is_given(tmp_path):
    (tmp_path / "c.yaml").write_text("grad_checkpoint: true\n")
    assert resolve(BASE, str(tmp_path / "c.yaml")).method == "mebp"
    assert resolve({**BASE, "method": "mesp"}, str(tmp_path / "c.yaml")).method == "mesp"
    assert resolve({**BASE, "grad_checkpoint": None}).method == "mesp"


@pytest.mark.parametrize("name", ["muon", "adafactor"])
def test_mlx_optimizers_muon_and_adafactor_train(tiny_model_dir, text_data, tmp_path,
                                                 name):
    rc, out, err = cli("--model", tiny_model_dir, "--data", text_data, "--train",
                       "--iters", 2, "--optimizer", name, "--batch-size", 4,
                       "--adapter-path", tmp_path / "ad", "--rank", 2,
                       "--max-seq-length", 32, "--val-batches", 1)
    assert rc == 0, err
    assert (tmp_path / "ad" / "state.safetensors").is_file()


def test_clear_cache_threshold_reaches_the_trainer(tiny_model_dir, text_data,
                                                   monkeypatch, tmp_path):
    seen, real = [], trainer.clear_cache
    monkeypatch.setattr(trainer, "clear_cache", seen.append)
    rc, _, err = cli("--model", tiny_model_dir, "--data", text_data, "--train",
                     "--iters", 2, "--clear-cache-threshold", "1MB", "--adapter-path",
                     tmp_path / "ad", "--rank", 2, "--max-seq-length", 32,
                     "--val-batches", 0)
    assert rc == 0, err
    assert seen and set(seen) == {10**6}        # after every step and validation
    # and the threshold does clear: a cache above it is emptied, one below is kept
    x = mx.ones((1 << 16,))
    mx.eval(x)
    del x
    assert mx.get_cache_memory() > 0
    real(1 << 40)
    assert mx.get_cache_memory() > 0
    real(1)
    assert mx.get_cache_memory() == 0


def _fake_module(name, **attrs):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    m.__dict__.update(attrs)
    return m


def test_report_to_wandb_logs_mlx_lm_keys(tiny_model_dir, text_data, tmp_path,
                                          monkeypatch):
    import mlx_lm.tuner.callbacks as cb
    logged, inits = [], []
    fake = _fake_module("wandb", init=lambda **kw: inits.append(kw),
                        log=lambda d, step=None: logged.append((step, d)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(cb, "wandb", fake)
    rc, _, err = cli("--model", tiny_model_dir, "--data", text_data, "--train",
                     "--iters", 2, "--steps-per-report", 1, "--steps-per-eval", 2,
                     "--report-to", "wandb", "--adapter-path", tmp_path / "ad",
                     "--rank", 2, "--max-seq-length", 32, "--val-batches", 1)
    assert rc == 0, err
    assert inits[0]["project"] == "ad" and inits[0]["config"]["report_to"] == "wandb"
    train = [d for _, d in logged if "train_loss" in d]
    val = [d for _, d in logged if "val_loss" in d]
    assert [d["iteration"] for d in train] == [1, 2] and [d["iteration"] for d in val] == [0, 2]
    assert set(train[0]) == {"iteration", "train_loss", "learning_rate",
                             "iterations_per_second", "tokens_per_second",
                             "trained_tokens", "peak_memory"}
    assert set(val[0]) == {"iteration", "val_loss", "val_time"}


def _fake_datasets(tables):
    def load_dataset(path, split=None, **kw):
        rows = tables[path]
        if split.startswith("train[:"):
            return rows[:len(rows) * 8 // 10]
        if split.startswith("train[-"):
            return rows[-max(len(rows) // 10, 1):]
        return rows
    return _fake_module("datasets", load_dataset=load_dataset)


def test_hf_dataset_with_features_trains(tiny_model_dir, tmp_path, monkeypatch):
    rows = [{"q": sentence(i, 5), "a": sentence(i + 40, 3)} for i in range(20)]
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets({"org/qa": rows}))
    (tmp_path / "c.yaml").write_text(
        f"model: {tiny_model_dir}\ntrain: true\niters: 2\nbatch_size: 2\n"
        f"adapter_path: {tmp_path / 'ad'}\nmax_seq_length: 64\nlora_parameters: "
        "{rank: 2, scale: 2.0, dropout: 0.0}\nmask_prompt: true\n"
        "hf_dataset:\n  path: org/qa\n  prompt_feature: q\n  completion_feature: a\n")
    rc, out, err = cli("-c", tmp_path / "c.yaml")
    assert rc == 0, err
    assert (tmp_path / "ad" / "adapters.safetensors").is_file()
    raw = checks.read_data(resolve({}, str(tmp_path / "c.yaml")), ("train",))
    assert len(raw["train"][0]) == 16 and len(raw["valid"][0]) == 2
    assert raw["train"][1] == "completions" and raw["train"][0][0]["prompt"] == rows[0]["q"]


def test_hf_dataset_without_datasets_says_how(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    cfg = TrainConfig(model="m", train=True, hf_dataset={"path": "billsum"})
    with pytest.raises(Exception, match="pip install datasets"):
        checks.read_data(cfg.validate(), ("train",))


def test_local_data_feature_keys(tmp_path):
    d = tmp_path / "qa"
    write_jsonl(d / "train.jsonl", [{"question": "a b", "answer": "c"}] * 3)
    cfg = TrainConfig(model="m", data=str(d), train=True, prompt_feature="question",
                      completion_feature="answer")
    raw = checks.read_data(cfg, ("train",))
    assert raw["train"][1] == "completions" and raw["train"][0][0] == {
        "prompt": "a b", "completion": "c"}
