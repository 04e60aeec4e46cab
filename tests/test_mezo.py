"""MeZO: exact restore (fp32, bf16), exact update, unbiasedness, API, CLI, memory."""

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mesp_mlx
from mesp_mlx.engine import mezo
from mesp_mlx.models.configs import build_model, tiny_config
from mesp_mlx.engine.lora_layers import lora_layers

SMALL = tiny_config(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                    vocab_size=4096)


def _model(dtype=mx.float32, cfg=None, num_layers=None):
    model = build_model(cfg or tiny_config(), dtype=dtype, seed=0)
    mesp_mlx.apply_lora(model, rank=4, num_layers=num_layers)
    for i, (_, m) in enumerate(lora_layers(model)):
        m.lora_a = m.lora_a.astype(dtype)
        m.lora_b = (0.02 * mx.random.normal(m.lora_b.shape, key=mx.random.key(i))
                    ).astype(dtype)
    mx.eval(model.parameters())
    return model


def _batch(vocab=256, B=2, T=16, seed=0):
    k1, k2 = mx.random.split(mx.random.key(seed))
    return (mx.random.randint(0, vocab, (B, T), key=k1),
            mx.random.randint(0, vocab, (B, T), key=k2))


def _params(model):
    return {k: np.array(v.astype(mx.float32)) for k, v in
            tree_flatten(model.trainable_parameters())}


def _bits_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_perturb_restore_is_exact(dtype):
    model = _model(dtype)
    x, y = _batch()
    before = _params(model)
    pert = mezo.Perturbation(model, 7)
    blk = model.model.layers[1]
    with mezo.perturbed(blk, "model.layers.1", pert, 1e-2):
        inside = _params(model)
    assert not np.array_equal(inside["model.layers.1.mlp.up_proj.lora_b"],
                              before["model.layers.1.mlp.up_proj.lora_b"])
    _bits_equal(_params(model), before)
    for seed in range(3):                       # many perturb/restore cycles: no drift
        mesp_mlx.mezo_gradient_estimate(model, x, y, eps=1e-2, seed=seed)
        mezo.mezo_step(model, x, y, lr=0.0, eps=1e-2, seed=seed)
    _bits_equal(_params(model), before)
    assert all(v.dtype == dtype for _, v in tree_flatten(model.trainable_parameters()))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_step_is_exactly_pre_step_plus_update(dtype):
    model = _model(dtype)
    x, y = _batch()
    before = dict(tree_flatten(model.trainable_parameters()))
    lr, wd = 1e-3, 0.1
    res = mezo.mezo_step(model, x, y, lr=lr, eps=1e-2, weight_decay=wd, seed=11)
    pert = mezo.Perturbation(model, 11)
    after = dict(tree_flatten(model.trainable_parameters()))
    for k, t in before.items():
        t32 = t.astype(mx.float32)
        want = (t32 - lr * (res.p * pert.z(k, t.shape) + wd * t32)).astype(dtype)
        assert mx.array_equal(after[k], want).item(), k
        z = np.array(pert.z(k, t.shape))
        ref = np.array(t32) - lr * (res.p * z + wd * np.array(t32))   # numpy, float64
        np.testing.assert_allclose(np.array(after[k].astype(mx.float32)), ref,
                                   atol=1e-6 if dtype == mx.float32 else 1e-2, err_msg=k)


class _Quadratic(nn.Module):
    """L(θ) = ½ θᵀQθ + bᵀθ, ∇L = Qθ + b."""

    def __init__(self, d=6):
        super().__init__()
        rng = np.random.default_rng(0)
        m = rng.normal(size=(d, d))
        self.theta = mx.array(rng.normal(size=d), mx.float32)
        self._Q = mx.array(m @ m.T / d + np.eye(d), mx.float32)
        self._b = mx.array(rng.normal(size=d), mx.float32)

    def loss(self):
        t = self.theta
        return 0.5 * (t @ self._Q @ t) + self._b @ t

    def grad(self):
        return np.array(self._Q @ self.theta + self._b)


def test_estimate_is_unbiased_on_a_quadratic():
    model, N = _Quadratic(), 1000
    g = model.grad()
    ests = []
    for seed in range(N):
        pert = mezo.Perturbation(model, seed)

        def loss_at(c):
            with mezo.perturbed(model, "", pert, c):
                return model.loss().item()
        res = mezo.spsa(loss_at, 1e-2, seed)
        z = np.array(pert.z("theta", (len(g),)))
        assert abs(res.p - g @ z) < 1e-3 * (1 + abs(g @ z))   # exact for a quadratic
        ests.append(res.p * z)
    ests = np.array(ests)
    rel = np.linalg.norm(ests.mean(0) - g) / np.linalg.norm(g)
    # E|mean − g|² = (d + 1)|g|² / N for ĝ = (gᵀz) z; allow 4 standard deviations
    bound = 4 * np.sqrt((len(g) + 1) / N)
    print(f"relative error of the mean of {N} estimates: {rel:.3f} (bound {bound:.3f})")
    assert rel < bound
    cos1 = ests[0] @ g / (np.linalg.norm(ests[0]) * np.linalg.norm(g))
    assert cos1 < 0.999                          # one estimate is not the gradient


def test_gradient_estimate_tree_and_params_unchanged():
    model = _model(num_layers=1)                 # LoRA in the last block only
    x, y = _batch()
    before = _params(model)
    ref = dict(tree_flatten(model.trainable_parameters()))
    est = mesp_mlx.mezo_gradient_estimate(model, x, y, seed=5)
    _bits_equal(_params(model), before)
    flat = dict(tree_flatten(est))
    assert flat.keys() == ref.keys() and len(flat) == 14     # 7 projections × (A, B)
    assert all(flat[k].shape == ref[k].shape and flat[k].dtype == ref[k].dtype for k in ref)
    pert = mezo.Perturbation(model, 5)
    res = mezo.spsa(mezo.lm_loss_at(model, x, y, mx.ones(x.shape), pert),
                    mezo.ESTIMATE_EPS, 5)
    for k, v in flat.items():                    # est = p · z(seed), same p everywhere
        np.testing.assert_allclose(np.array(v), res.p * np.array(pert.z(k, v.shape)),
                                   rtol=1e-6, atol=1e-7, err_msg=k)
    _, g = mesp_mlx.value_and_grad(model, x, y, method="autodiff")
    gz = sum((gv * pert.z(k, gv.shape)).sum().item() for k, gv in tree_flatten(g))
    assert abs(res.p - gz) < 0.05 * abs(gz) + 1e-3   # p ≈ zᵀ∇L (finite difference)


def test_forward_loss_matches_autodiff_and_value_and_grad():
    model = _model()
    x, y = _batch()
    mask = mx.broadcast_to((mx.arange(16) < 12).astype(mx.float32), (2, 16))
    want, _ = mesp_mlx.value_and_grad(model, x, y, mask, method="autodiff")
    pert = mezo.Perturbation(model, 0)
    got = mezo.lm_loss_at(model, x, y, mask, pert)(0.0)
    assert abs(got - want.item()) < 1e-5
    mx.random.seed(3)
    l1, g1 = mesp_mlx.value_and_grad(model, x, y, mask, method="mezo")
    mx.random.seed(3)
    l2, g2 = mesp_mlx.value_and_grad(model, x, y, mask, method="mezo")
    _, g3 = mesp_mlx.value_and_grad(model, x, y, mask, method="mezo")
    k = next(iter(dict(tree_flatten(g1))))
    a, b, c = (dict(tree_flatten(g))[k] for g in (g1, g2, g3))
    assert l1.item() == l2.item() and mx.array_equal(a, b).item()   # seeded: reproducible
    assert not mx.array_equal(a, c).item()                          # fresh seed per call
    assert abs(l1.item() - want.item()) < 0.05


@pytest.mark.parametrize("family", ["qwen3", "llama-bias-sliding", "gemma2",
                                    "gemma3_text", "phi3", "granite", "olmo2", "lfm2",
                                    "gemma4_text"])
def test_forward_loss_every_family(family):
    """MeZO's forward is the engine's spec forward: L(θ + 0·z) is the model's own loss
    (T 16 > the tiny sliding windows, softcaps and logit scaling included)."""
    model = _model(cfg=tiny_config(family))
    x, y = _batch()
    want, _ = mesp_mlx.value_and_grad(model, x, y, method="autodiff")
    got = mezo.lm_loss_at(model, x, y, mx.ones(x.shape), mezo.Perturbation(model, 0))(0.0)
    assert abs(got - want.item()) <= 1e-5 * abs(want.item())


def test_bad_input_is_a_clear_error():
    model = _model()
    x, y = _batch()
    with pytest.raises(ValueError, match="eps must be a positive"):
        mesp_mlx.mezo_gradient_estimate(model, x, y, eps=0.0)
    with pytest.raises(ValueError, match="seed must be an int"):
        mesp_mlx.mezo_gradient_estimate(model, x, y, seed=-1)
    with pytest.raises(ValueError, match="inputs and targets"):
        mesp_mlx.mezo_gradient_estimate(model, x, y[:, :3])
    with pytest.raises(ValueError, match="lr and weight decay"):
        mezo.mezo_step(model, x, y, lr=-1.0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        mesp_mlx.mezo_gradient_estimate(build_model(tiny_config()).freeze(), x, y)


def _peak(fn):
    mx.clear_cache()
    mx.reset_peak_memory()
    fn()
    return mx.get_peak_memory()


def test_mezo_peak_is_inference_plus_lora_and_below_mesp():
    model = _model(cfg=SMALL)
    x, y = _batch(SMALL["vocab_size"], B=1, T=128)
    mask = mx.ones(x.shape)
    mx.eval(x, y, mask)
    pert = mezo.Perturbation(model, 0)
    infer = _peak(lambda: mezo.lm_loss_at(model, x, y, mask, pert)(0.0))
    step = _peak(lambda: mezo.mezo_step(model, x, y, lr=1e-4, seed=1))
    mesp = _peak(lambda: mx.eval(mesp_mlx.value_and_grad(model, x, y, method="mesp")))
    block_lora = sum(v.nbytes for _, v in
                     tree_flatten(model.model.layers[0].trainable_parameters()))
    print(f"peaks MB: inference {infer / 1e6:.2f}, mezo {step / 1e6:.2f}, "
          f"mesp {mesp / 1e6:.2f}; one block's LoRA {block_lora / 1e6:.3f}")
    assert step < mesp
    assert step <= 1.02 * infer + block_lora + (64 << 10)   # + one block's perturbed copy


def test_cli_trains_and_resumes_with_mezo(tiny_model_dir, text_data, tmp_path):
    from helpers import base, cli, losses

    common = ("--train", "--method", "mezo", "--mezo-eps", 1e-3, "--steps-per-save", 2,
              "--steps-per-report", 1)
    rc, out, err = cli(*base(tiny_model_dir, text_data, tmp_path / "ad", *common,
                             "--iters", 4))
    assert rc == 0, err
    assert "MeZO: SGD update" in out and (tmp_path / "ad" / "adapters.safetensors").is_file()
    full = losses(out)
    assert sorted(full) == [1, 2, 3, 4]
    rc, out2, err = cli(*base(tiny_model_dir, text_data, tmp_path / "re", *common,
                              "--iters", 4, "--resume-adapter-file",
                              tmp_path / "ad" / "0000002_adapters.safetensors"))
    assert rc == 0, err
    assert re.search(r"at iteration 2", out2)
    assert losses(out2) == {3: full[3], 4: full[4]}      # seeds and data order replayed
