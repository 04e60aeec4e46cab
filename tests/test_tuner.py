"""mesp_mlx.tuner.train is mlx_lm.tuner.trainer.train with our engine.
A script written against mlx-lm runs with one import changed; on data without
padding targets its losses equal mlx-lm's; a custom loss falls back to autodiff."""

import json
import runpy
import sys

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

from mesp_mlx.compat import mlx_lm_tuner as tuner
from mesp_mlx.engine.lora_layers import LoRALinear

MLX_IMPORT = "from mlx_lm.tuner.trainer import train"
SCRIPT = '''\
"""A LoRA fine-tuning script written for mlx-lm's Python API."""
import json
import sys
import types

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx_lm import load
from mlx_lm.tuner.datasets import CacheDataset, load_dataset
from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback
from mlx_lm.tuner.trainer import train
from mlx_lm.tuner.utils import linear_to_lora_layers

model_path, data_path, out = sys.argv[1:4]
model, tokenizer = load(model_path)
spec = types.SimpleNamespace(data=data_path, train=True, test=False, mask_prompt=False)
train_set, valid_set, _ = load_dataset(spec, tokenizer)
model.freeze()
mx.random.seed(0)
linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})


class Recorder(TrainingCallback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_loss_report(self, info):
        self.train.append(info)

    def on_val_loss_report(self, info):
        self.val.append(info)


rec = Recorder()
np.random.seed(0)
args = TrainingArgs(batch_size=4, iters=6, val_batches=2, steps_per_report=2,
                    steps_per_eval=3, steps_per_save=3, max_seq_length=128,
                    adapter_file=f"{out}/adapters.safetensors")
train(model, optim.Adam(learning_rate=1e-2), CacheDataset(train_set),
      CacheDataset(valid_set), args=args, training_callback=rec)
json.dump({"train": rec.train, "val": rec.val,
           "layers": sorted({type(m).__module__ for _, m in model.named_modules()
                             if hasattr(m, "lora_a")})}, open(f"{out}/reports.json", "w"))
'''


def run_script(text, tmp_path, name, model_dir, data_dir, monkeypatch):
    out = tmp_path / name
    out.mkdir()
    (out / "script.py").write_text(text)
    monkeypatch.setattr(sys, "argv", ["script.py", str(model_dir), str(data_dir), str(out)])
    runpy.run_path(str(out / "script.py"), run_name="__main__")
    return out, json.loads((out / "reports.json").read_text())


def test_an_mlx_lm_script_runs_with_one_import_changed(tiny_model_dir, text_data,
                                                       tmp_path, monkeypatch):
    assert SCRIPT.count(MLX_IMPORT) == 1
    ours_text = SCRIPT.replace(MLX_IMPORT, "from mesp_mlx.tuner import train")
    theirs, ref = run_script(SCRIPT, tmp_path, "mlx_lm", tiny_model_dir, text_data,
                             monkeypatch)
    ours, got = run_script(ours_text, tmp_path, "mesp", tiny_model_dir, text_data,
                           monkeypatch)
    assert got["layers"] == ["mesp_mlx.engine.lora_layers"] and ref["layers"] == ["mlx_lm.tuner.lora"]
    for hook in ("train", "val"):                 # the same reports, the same keys
        assert [sorted(r) for r in got[hook]] == [sorted(r) for r in ref[hook]], hook
        assert [r["iteration"] for r in got[hook]] == [r["iteration"] for r in ref[hook]]
    assert [r["trained_tokens"] < 10**6 for r in got["train"]] == [True] * 3
    names = sorted(p.name for p in ours.iterdir() if p.suffix == ".safetensors")
    assert names == sorted(p.name for p in theirs.iterdir() if p.suffix == ".safetensors")
    a, b = mx.load(str(ours / "adapters.safetensors")), mx.load(str(theirs / "adapters.safetensors"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert got["train"][-1]["train_loss"] < got["train"][0]["train_loss"]


def _lora_model(model_dir):
    import mlx_lm
    from mlx_lm.tuner.utils import linear_to_lora_layers
    model, _ = mlx_lm.load(str(model_dir))
    model.freeze()
    mx.random.seed(0)
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    return model


class Recorder(tuner.TrainingCallback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_loss_report(self, info):
        self.train.append(info)

    def on_val_loss_report(self, info):
        self.val.append(info)


def _both(model_dir, tmp_path, train_set, val_set, method="mesp", **kw):
    from mlx_lm.tuner.trainer import train as mlx_train
    args = tuner.TrainingArgs(batch_size=2, iters=4, val_batches=2, steps_per_report=1,
                              steps_per_eval=2, steps_per_save=100,
                              max_seq_length=kw.pop("max_seq_length", 64),
                              adapter_file=str(tmp_path / "a.safetensors"),
                              grad_accumulation_steps=kw.pop("accum", 1))
    out = []
    for fn, extra in ((mlx_train, {}), (tuner.train, {"method": method,
                                                      "log": lambda *_: None})):
        rec, model = Recorder(), _lora_model(model_dir)
        np.random.seed(0)
        fn(model, optim.Adam(learning_rate=1e-2), train_set, val_set, args=args,
           training_callback=rec, **kw, **extra)
        out.append(rec)
    return out


@pytest.mark.parametrize("method,accum", [("mesp", 1), ("mebp", 2), ("autodiff", 1)])
def test_losses_equal_mlx_lm_without_padding_targets(tiny_model_dir, tmp_path, method,
                                                     accum):
    """mlx-lm's default loss counts the target one past each sequence's end (a
    padding token) unless the sequence is truncated: rows of 40 tokens cut to
    --max-seq-length 33 have none, and equal-length batches make its per-batch
    average equal our token-weighted accumulation, so the runs must agree."""
    rng = np.random.default_rng(0)
    rows = [(rng.integers(3, 150, 40).tolist(), 0) for _ in range(8)]
    ref, got = _both(tiny_model_dir, tmp_path, rows, rows[:4], method, accum=accum,
                     max_seq_length=33)
    r = [x["train_loss"] for x in ref.train]
    g = [x["train_loss"] for x in got.train]
    np.testing.assert_allclose(g, r, rtol=2e-4, err_msg=method)
    np.testing.assert_allclose([x["val_loss"] for x in got.val],
                               [x["val_loss"] for x in ref.val], rtol=2e-4)
    assert abs(got.val[-1]["val_loss"] - got.val[0]["val_loss"]) > 1e-3   # it trained


def test_custom_loss_falls_back_to_autodiff_with_a_warning(tiny_model_dir, tmp_path,
                                                           text_data):
    import mlx_lm
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.trainer import default_loss
    import types
    _, tok = mlx_lm.load(str(tiny_model_dir))
    spec = types.SimpleNamespace(data=str(text_data), train=True, test=False)
    tr, va, _ = load_dataset(spec, tok)

    def my_loss(model, batch, lengths):         # mlx-lm's, under another name
        return default_loss(model, batch, lengths)

    with pytest.warns(tuner.AutodiffFallback, match="custom loss"):
        ref, got = _both(tiny_model_dir, tmp_path, CacheDataset(tr), CacheDataset(va),
                         loss=my_loss)
    np.testing.assert_allclose([x["train_loss"] for x in got.train],
                               [x["train_loss"] for x in ref.train], rtol=2e-4)


def test_convert_keeps_weights_and_call(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = 0.1 * mx.random.normal(m.lora_b.shape)
    x = mx.array([[5, 9, 13, 21]])
    before = model(x)
    assert tuner.convert_lora_layers(model) == 2 * 7
    assert all(isinstance(m, LoRALinear) for p, m in model.named_modules()
               if p.endswith("q_proj"))
    np.testing.assert_allclose(np.array(model(x)), np.array(before), atol=1e-5)
    assert tuner.convert_lora_layers(model) == 0


def test_to_batch_masks_no_padding_target():
    batch = mx.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    b = tuner.to_batch(batch, mx.array([[0, 3], [3, 5]]))
    # row 2: prompt = tokens 0..2, so targets from j = 2 (token 3) on, as mlx-lm
    assert np.array(b.mask).tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    assert (b.n_targets, b.n_tokens) == (4, 6)
