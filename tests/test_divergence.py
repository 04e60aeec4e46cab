"""A diverging run stops with exit 1 and the last good
adapters, and never writes a non-finite adapter or snapshot."""

import re

import mlx.core as mx
import pytest
from mlx.utils import tree_map
from helpers import base, cli

from mesp_mlx import engine
from mesp_mlx.train import loop as trainer
from mesp_mlx.train.config import TrainConfig
from mesp_mlx.train.divergence import DivergenceError, all_finite, first_nonfinite


def _all_saved_finite(folder):
    files = sorted(folder.glob("*.safetensors"))
    assert files
    return all(all_finite(mx.load(str(f))) for f in files)


def test_lr_1e30_stops_with_last_good_adapters(tiny_model_dir, text_data, tmp_path):
    ad = tmp_path / "ad"
    rc, out, err = cli(*base(tiny_model_dir, text_data, ad, "--train", "--iters", 4,
                             "--steps-per-save", 1, "--optimizer", "sgd",
                             "--learning-rate", "1e30"))
    assert rc == 1 and "Traceback" not in out + err
    m = re.search(r"loss became non-finite at step (\d+); last good adapters at (\S+) "
                  r"\(iteration (\d+)\)", err)
    assert m, err
    step, good, good_it = int(m.group(1)), m.group(2), int(m.group(3))
    assert good == str(ad / "adapters.safetensors") and good_it == step - 1
    assert not (ad / f"{step:07d}_adapters.safetensors").exists()
    assert _all_saved_finite(ad)
    assert "train loss nan" not in out


def test_divergence_before_any_save_says_so(tiny_model_dir, text_data, tmp_path):
    rc, out, err = cli(*base(tiny_model_dir, text_data, tmp_path / "ad", "--train",
                             "--iters", 4, "--optimizer", "sgd", "--learning-rate", "1e30"))
    assert rc == 1
    assert re.search(r"loss became non-finite at step \d+; last good adapters at none", err)
    assert not (tmp_path / "ad" / "adapters.safetensors").exists()


def test_non_finite_gradient_is_caught(monkeypatch, tiny_model_dir, text_data):
    from mlx_lm import load

    from mesp_mlx import apply_lora
    from mesp_mlx.train import data
    model, tok = load(str(tiny_model_dir))
    apply_lora(model, rank=2)
    ds = data.load_splits(str(text_data), tok, 128)["train"]
    real = engine.value_and_grad

    def nan_grads(*a, **k):
        loss, g = real(*a, **k)
        return loss, tree_map(lambda x: x * float("nan"), g)
    monkeypatch.setattr(engine, "value_and_grad", nan_grads)
    cfg = TrainConfig(train=True, iters=3, batch_size=4, adapter_path=None,
                      method="autodiff")
    with pytest.raises(DivergenceError, match=r"gradient became non-finite at step 1"):
        trainer.train(model, ds, None, cfg, log=lambda *_: None)
    assert all_finite(model.trainable_parameters())     # the update was never applied


def test_first_nonfinite():
    assert first_nonfinite(1.0, {"a": mx.ones(3)}) is None
    assert first_nonfinite(float("nan")) == "loss"
    assert first_nonfinite(float("inf")) == "loss"
    assert first_nonfinite(1.0, {"a": mx.array([1.0, float("inf")])}) == "gradient"
