"""Adapter files: mlx-lm's format, atomic saves, exact reload, mlx-lm load + fuse parity."""

import json
import sys

import mlx.core as mx
import numpy as np
import pytest

from mesp_mlx.train import adapters
from mesp_mlx.train.adapters import AdapterError
from mesp_mlx.engine.lora_layers import apply_lora


def _trained_lora_model(model_dir, rank=4, num_layers=None, keys=None):
    """The tiny model with LoRA whose B is non-zero (so adapters change logits)."""
    import mlx_lm
    model, _ = mlx_lm.load(str(model_dir))
    mx.random.seed(0)
    apply_lora(model, rank=rank, scale=2.0, keys=keys, num_layers=num_layers)
    for _, m in adapters.lora_layers(model):
        m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    mx.eval(model.parameters())
    model.eval()
    return model


TOKENS = mx.array([[5, 17, 42, 9, 100, 3, 77, 12]])


def test_files_are_mlx_lm_format(tiny_model_dir, tmp_path):
    model = _trained_lora_model(tiny_model_dir, num_layers=1, keys=["q_proj", "down_proj"])
    f = adapters.save_adapters(model, tmp_path, {"method": "mesp"}, step=7, snapshot=True)
    assert f == tmp_path / "adapters.safetensors"
    assert (tmp_path / "0000007_adapters.safetensors").is_file()
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == 1
    assert cfg["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.0,
                                      "keys": ["self_attn.q_proj", "mlp.down_proj"]}
    assert cfg["method"] == "mesp"
    w = mx.load(str(f))
    assert sorted(w) == ["model.layers.1.mlp.down_proj.lora_a",
                         "model.layers.1.mlp.down_proj.lora_b",
                         "model.layers.1.self_attn.q_proj.lora_a",
                         "model.layers.1.self_attn.q_proj.lora_b"]
    assert w["model.layers.1.self_attn.q_proj.lora_a"].shape == (32, 4)   # (d_in, r)
    assert w["model.layers.1.mlp.down_proj.lora_b"].shape == (4, 32)      # (r, d_out)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_mlx_lm_load_and_fuse_give_our_logits(tiny_model_dir, tmp_path, monkeypatch):
    import mlx_lm
    import mlx_lm.fuse

    model = _trained_lora_model(tiny_model_dir)
    ours = model(TOKENS)
    adapters.save_adapters(model, tmp_path / "ad")
    theirs, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(tmp_path / "ad"))
    np.testing.assert_allclose(np.array(theirs(TOKENS)), np.array(ours), atol=1e-5)

    monkeypatch.setattr(sys, "argv", ["fuse", "--model", str(tiny_model_dir),
                                      "--adapter-path", str(tmp_path / "ad"),
                                      "--save-path", str(tmp_path / "fused")])
    mlx_lm.fuse.main()
    fused, _ = mlx_lm.load(str(tmp_path / "fused"))
    assert not adapters.lora_layers(fused)
    np.testing.assert_allclose(np.array(fused(TOKENS)), np.array(ours), atol=1e-4)


def test_reload_into_fresh_model_and_mismatch(tiny_model_dir, tmp_path):
    import mlx_lm

    model = _trained_lora_model(tiny_model_dir)
    adapters.save_adapters(model, tmp_path)
    fresh, _ = mlx_lm.load(str(tiny_model_dir))
    adapters.load_adapter_dir(fresh, tmp_path)
    fresh.eval()
    np.testing.assert_array_equal(np.array(fresh(TOKENS)), np.array(model(TOKENS)))

    other, _ = mlx_lm.load(str(tiny_model_dir))
    apply_lora(other, rank=8)
    with pytest.raises(AdapterError, match="shape"):
        adapters.load_weights(other, tmp_path)
    with pytest.raises(AdapterError, match="not found"):
        adapters.load_weights(other, tmp_path / "missing.safetensors")


def test_interrupted_save_keeps_last_good_file(tiny_model_dir, tmp_path, monkeypatch):
    model = _trained_lora_model(tiny_model_dir)
    f = adapters.save_adapters(model, tmp_path, step=1)
    before = f.read_bytes()
    real = mx.save_safetensors

    def crash(path, arrays, metadata=None):
        real(path, {k: v[:1] for k, v in list(arrays.items())[:1]})   # partial write
        raise KeyboardInterrupt

    monkeypatch.setattr(mx, "save_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        adapters.save_adapters(model, tmp_path, step=2)
    assert f.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_state_from_another_save_is_ignored(tiny_model_dir, tmp_path):
    import mlx.optimizers as optim

    model = _trained_lora_model(tiny_model_dir)
    opt = optim.Adam(1e-3)
    opt.init(model.trainable_parameters())
    f = adapters.save_adapters(model, tmp_path, step=5)
    adapters.save_state(f, opt, {"step": 5, "seed": 0})
    assert adapters.load_state(f, optim.Adam(1e-3))[0]["step"] == 5
    adapters.save_adapters(model, tmp_path, step=6)          # crash before its state
    assert adapters.load_state(f, optim.Adam(1e-3)) is None


# ---------------------------------------------------------------- unreadable or mismatched files

@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_safetensors_is_a_clear_error(tiny_model_dir, tmp_path, damage):
    model = _trained_lora_model(tiny_model_dir)
    f = adapters.save_adapters(model, tmp_path)
    good = f.read_bytes()
    f.write_bytes({"truncated": good[:len(good) // 2], "garbage": b"not a tensor" * 9,
                   "empty": b""}[damage])
    with pytest.raises(AdapterError, match=r"is not a readable safetensors file .*truncated"):
        adapters.load_weights(model, f)
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        adapters.load_adapter_dir(_fresh(tiny_model_dir), tmp_path)


def _fresh(model_dir):
    import mlx_lm
    return mlx_lm.load(str(model_dir))[0]


def test_non_finite_adapters_are_refused(tiny_model_dir, tmp_path):
    model = _trained_lora_model(tiny_model_dir)
    f = adapters.save_adapters(model, tmp_path)
    w = mx.load(str(f))
    k = next(iter(w))
    w[k] = w[k] * float("nan")
    mx.save_safetensors(str(f), w)
    with pytest.raises(AdapterError, match="non-finite values .*diverged"):
        adapters.check_weights(model, f)


def test_check_resume_checks_state_shapes(tiny_model_dir, tmp_path):
    import mlx.optimizers as optim
    model = _trained_lora_model(tiny_model_dir, rank=4)
    f = adapters.save_adapters(model, tmp_path, step=3)
    opt = optim.Adam(learning_rate=1e-3)
    opt.init(model.trainable_parameters())
    adapters.save_state(f, opt, {"step": 3, "seed": 0})
    adapters.check_resume(model, f)                       # consistent: fine
    state = tmp_path / "state.safetensors"
    flat = mx.load(str(state))
    k = next(k for k in flat if k.endswith(".lora_a.m"))
    flat[k] = mx.zeros((1, 1))
    mx.save_safetensors(str(state), flat)
    with pytest.raises(AdapterError,
                       match=r"(?s)state.safetensors does not match .*lora_a.m: shape \(1, 1\)"):
        adapters.check_resume(model, f)
    (tmp_path / "state.json").write_text("{broken")
    with pytest.raises(AdapterError, match="state.json is not a readable JSON file"):
        adapters.check_resume(model, f)
