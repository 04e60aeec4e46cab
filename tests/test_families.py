"""Family readers: what each mlx-lm family becomes, and what is refused (naming
the method that works)."""

import mlx.core as mx
import mlx.nn as nn
import pytest

import mesp_mlx
from mesp_mlx.models.configs import TINY, build_model
from mesp_mlx.engine.families import UnsupportedModelError
from mesp_mlx.engine.lora_layers import lora_layers

from helpers import batch, check_exact, make


def test_default_keys_are_every_block_linear():
    phi = make({}, family="phi3")
    names = {p.split(".", 3)[3] for p, _ in lora_layers(phi)}
    assert names == {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                     "mlp.down_proj"}
    assert len(lora_layers(make({}, family="qwen3"))) == 2 * 7


def test_errors():
    model = make({})
    x, y, mask = batch(4)
    with pytest.raises(ValueError, match="supported: autodiff, mebp, mesp"):
        mesp_mlx.value_and_grad(model, x, y, method="bogus")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        mesp_mlx.value_and_grad(model, x[0], y[0])

    class Other(nn.Module):
        pass
    with pytest.raises(UnsupportedModelError, match="autodiff"):
        mesp_mlx.value_and_grad(Other(), x, y, method="mesp")


@pytest.mark.parametrize("method", ["mesp", "mebp"])
def test_out_of_reach_family_names_autodiff(method):
    """MoE: a clear error naming the method that works; autodiff still runs."""
    cfg = dict(TINY["qwen3"], model_type="qwen3_moe", num_experts=4,
               num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
               mlp_only_layers=[], norm_topk_prob=True)
    model = build_model(cfg)
    mesp_mlx.apply_lora(model, rank=2, keys=["q_proj"])
    x, y, mask = batch(5)
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts.*autodiff"):
        mesp_mlx.value_and_grad(model, x, y, mask, method=method)
    loss, _ = mesp_mlx.value_and_grad(model, x, y, mask, method="autodiff")
    assert mx.isfinite(loss).item()


def test_position_scaled_queries_refuse_beyond_their_range():
    """ministral3 scales queries by 1 + β·log(1 + ⌊t / N⌋): exact (scale 1) for T ≤ N,
    a clear error beyond (the tiny config's N is 64)."""
    model = make({}, family="ministral3")
    x, y, mask = batch(65, B=1)
    with pytest.raises(UnsupportedModelError, match="up to 64 tokens.*autodiff"):
        mesp_mlx.value_and_grad(model, x, y, mask, method="mesp")
    check_exact(model, *batch(64, B=1))


MOE = {
    "lfm2_moe": dict(TINY["lfm2"], model_type="lfm2_moe", intermediate_size=64,
                     moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                     norm_topk_prob=True, use_expert_bias=False, num_dense_layers=1),
    "gemma4_text": dict(TINY["gemma4_text"], enable_moe_block=True, num_experts=4,
                        top_k_experts=2, moe_intermediate_size=32),
}


@pytest.mark.parametrize("family", list(MOE))
def test_moe_variants_name_autodiff(family):
    """The MoE variants of the new families: refused before any step, naming autodiff."""
    model = build_model(MOE[family])
    mesp_mlx.apply_lora(model, rank=2, keys=["q_proj"])
    x, y, mask = batch(5)
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts.*autodiff"):
        mesp_mlx.value_and_grad(model, x, y, mask, method="mesp")
