"""Every family end to end: `python -m mesp_mlx.lora --train` on a model directory,
and the adapters it writes load in mlx-lm (`mlx_lm.load(..., adapter_path=...)`)
with the same outputs as the trained model."""

import mlx.core as mx
import pytest
from helpers import base, cli, losses

from mesp_mlx.models.configs import TINY

FAMILIES = [f for f in TINY if f not in ("llama-yarn", "llama-linear", "llama-dynamic")]


@pytest.mark.parametrize("family", FAMILIES)
def test_train_and_load_in_mlx_lm(family, family_model_dir, text_data, tmp_path):
    import mlx_lm

    from mesp_mlx.train import adapters
    from mesp_mlx import load_model

    model_dir = family_model_dir(family)
    ad = tmp_path / "ad"
    rc, out, err = cli(*base(model_dir, text_data, ad, "--train", "--iters", 4,
                             "--method", "mesp", "--max-seq-length", 16))
    assert rc == 0, err + out
    assert len(losses(out)) >= 2, out
    ref, tok = mlx_lm.load(str(model_dir), adapter_path=str(ad))
    ours, _, _ = load_model(str(model_dir), log=lambda *_: None)
    adapters.load_adapter_dir(ours, ad)
    ids = mx.array([tok.encode("the cat sat on a mat")])
    a, b = ours(ids), ref(ids)
    assert mx.abs(a - b).max().item() <= 1e-4 * mx.abs(b).max().item()
    assert mx.abs(adapters.adapter_weights(ours)[next(iter(adapters.adapter_weights(ours)))]
                  ).max().item() > 0


@pytest.mark.parametrize("short,repo", [
    ("Qwen3-0.6B-4bit", "mlx-community/Qwen3-0.6B-4bit"),
    ("llama-3.2-1b-instruct-4bit", "mlx-community/Llama-3.2-1B-Instruct-4bit"),
    ("gemma-3-1b-it-8bit", "mlx-community/gemma-3-1b-it-8bit"),
    ("SmolLM3-3B-Base-8bit", "mlx-community/SmolLM3-3B-Base-8bit"),
    ("Qwen2.5-0.5B-Instruct-4bit", "mlx-community/Qwen2.5-0.5B-Instruct-4bit"),
    ("lfm2-1.2b-4bit", "mlx-community/LFM2-1.2B-4bit"),
    ("gemma-4-e2b-it-4bit", "mlx-community/gemma-4-e2b-it-4bit"),
    ("LFM2-350M", "LiquidAI/LFM2-350M"), ("LFM2.5-1.2B-Instruct", "LiquidAI/LFM2.5-1.2B-Instruct"),
    ("LFM2.5-1.2B-Thinking-4bit", "mlx-community/LFM2.5-1.2B-Thinking-4bit"),
    ("gemma-4-E4B-it", "google/gemma-4-E4B-it"),
    ("someone/custom-model", "someone/custom-model"),
])
def test_short_names(short, repo):
    from mesp_mlx.models.configs import config_for
    from mesp_mlx.models.loading import resolve_model_name, short_names
    assert resolve_model_name(short) == repo
    assert "Phi-3.5-mini-instruct-4bit" in short_names()
    if short != "someone/custom-model":
        assert config_for(short)["model_type"]      # the memory planner knows each one
