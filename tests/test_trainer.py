"""Training loop: exact resume, methods agree, exact accumulation, chunked evaluation."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mesp_mlx.train import data, loop as trainer
from mesp_mlx import engine
from mesp_mlx.errors import ConfigError

from helpers import lora_model, train_cfg


def test_resume_reproduces_uninterrupted_losses(tiny_model_dir, loaded, tmp_path):
    common = dict(optimizer="adamw", grad_accumulation_steps=2, seed=5, steps_per_save=3)
    full = trainer.train(lora_model(tiny_model_dir, 0.1), loaded["train"], loaded["valid"],
                         train_cfg(**common), log=lambda *_: None)
    part = trainer.train(lora_model(tiny_model_dir, 0.1), loaded["train"], loaded["valid"],
                         train_cfg(iters=3, adapter_path=str(tmp_path), **common),
                         log=lambda *_: None)   # stops mid-accumulation at iteration 3
    np.testing.assert_array_equal(part.step_losses, full.step_losses[:3])
    resumed = trainer.train(lora_model(tiny_model_dir, 0.1, seed=99), loaded["train"],
                            loaded["valid"], train_cfg(resume_adapter_file=str(tmp_path),
                                                  **common), log=lambda *_: None)
    assert resumed.step == 6 and len(resumed.step_losses) == 3
    np.testing.assert_array_equal(resumed.step_losses, full.step_losses[3:])
    assert resumed.val_losses[-1] == full.val_losses[-1]
    assert full.step_losses[-1] < full.step_losses[0]


@pytest.mark.parametrize("method", ["mebp", "mesp"])
def test_methods_train_like_autodiff(tiny_model_dir, loaded, method):
    if method not in engine.METHODS:
        pytest.skip(f"engine has no {method} yet")
    ref = trainer.train(lora_model(tiny_model_dir), loaded["train"], None,
                        train_cfg(iters=3), log=lambda *_: None)
    got = trainer.train(lora_model(tiny_model_dir), loaded["train"], None,
                        train_cfg(iters=3, method=method), log=lambda *_: None)
    np.testing.assert_allclose(got.step_losses, ref.step_losses, rtol=1e-4, atol=1e-5)


def test_accumulation_is_exact_token_weighted_mean(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    for _, m in trainer.adapters.lora_layers(model):
        m.lora_b = 0.1 * mx.random.normal(m.lora_b.shape)
    ds = data.Dataset("x", [list(range(3, 3 + n)) for n in (5, 9, 12, 20)], [0, 2, 0, 4])
    _, g_all = engine.value_and_grad(model, *_io(data.make_batch(ds, [0, 1, 2, 3])),
                                     method="autodiff")
    acc = trainer.Accumulator(every=2)
    for idx in ([0, 1], [2, 3]):
        b = data.make_batch(ds, idx)
        _, g = engine.value_and_grad(model, *_io(b), method="autodiff")
        acc.add(g, b.n_targets)
    mean = tree_map(lambda x: x / acc.n, acc.grads)
    for (k, a), (_, b) in zip(tree_flatten(mean), tree_flatten(g_all)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6,
                                   err_msg=k)


def _io(b):
    return b.inputs, b.targets, b.mask


def test_evaluate_matches_full_logits_loss(tiny_model_dir, loaded, monkeypatch):
    model = lora_model(tiny_model_dir)
    batches = data.fixed_batches(loaded["valid"], 3, -1)
    got = trainer.evaluate(model, batches)
    tot = sum(engine.masked_ce(model(b.inputs), b.targets, b.mask).item() * b.n_targets
              for b in batches)
    want = tot / sum(b.n_targets for b in batches)
    assert abs(got - want) < 1e-5 * max(1.0, want)


def test_unsupported_method_setup_is_a_config_error(tiny_model_dir, loaded):
    with pytest.raises(ConfigError, match="nope"):
        trainer.train(lora_model(tiny_model_dir), loaded["train"], None,
                      train_cfg(method="nope"), log=lambda *_: None)
    with pytest.raises(ConfigError, match="mezo does not accumulate"):
        trainer.train(lora_model(tiny_model_dir), loaded["train"], None,
                      train_cfg(method="mezo", grad_accumulation_steps=2), log=lambda *_: None)


def test_sgd_without_momentum_keeps_no_state_and_updates_as_mlx():
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten as flat

    params = {"a": mx.ones((3, 4)), "b": {"c": mx.arange(5, dtype=mx.float32)}}
    grads = {"a": mx.full((3, 4), 0.5), "b": {"c": mx.ones((5,))}}
    plain = trainer.build_optimizer("sgd", 0.1)
    plain.init(params)
    assert not [k for k, v in flat(plain.state) if isinstance(v, mx.array) and v.ndim > 0]
    for momentum in (0.0, 0.9):
        ours = trainer.build_optimizer("sgd", 0.1, {"momentum": momentum})
        ref = optim.SGD(learning_rate=0.1, momentum=momentum)
        p1, p2 = params, params
        for _ in range(2):
            p1, p2 = ours.apply_gradients(grads, p1), ref.apply_gradients(grads, p2)
        for (k, a), (_, b) in zip(flat(p1), flat(p2)):
            assert mx.array_equal(a, b).item(), (momentum, k)
