"""Real Qwen2.5 architectures from their config values, with random weights.

Memory does not depend on weight values, so benchmarks and "will it fit?"
answers build the exact architecture offline (REFERENCE §2) instead of
downloading weights.
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

_BASE = dict(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0,
             vocab_size=151936, tie_word_embeddings=True,
             max_position_embeddings=32768)

CONFIGS = {
    "Qwen2.5-0.5B": dict(_BASE, hidden_size=896, num_hidden_layers=24,
                         intermediate_size=4864, num_attention_heads=14,
                         num_key_value_heads=2),
    "Qwen2.5-1.5B": dict(_BASE, hidden_size=1536, num_hidden_layers=28,
                         intermediate_size=8960, num_attention_heads=12,
                         num_key_value_heads=2),
    "Qwen2.5-3B": dict(_BASE, hidden_size=2048, num_hidden_layers=36,
                       intermediate_size=11008, num_attention_heads=16,
                       num_key_value_heads=2),
}


def tiny_config(**overrides) -> dict:
    """A small Qwen2 config for tests (GQA 2:1, biases on q/k/v, tied)."""
    cfg = dict(_BASE, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    cfg.update(overrides)
    return cfg


def config_for(name: str) -> dict:
    key = name.split("/")[-1]
    for suffix in ("-Instruct", "-4bit", "-8bit", "-bf16"):
        key = key.replace(suffix, "")
    if key not in CONFIGS:
        raise ValueError(f"no bundled architecture for {name!r}; known: "
                         f"{', '.join(CONFIGS)}")
    return dict(CONFIGS[key])


def build_model(config, dtype=mx.float32, seed: int = 0,
                quantize: Optional[dict] = None) -> nn.Module:
    """qwen2.Model from a config dict or bundled name, random weights, evaluated.

    quantize: e.g. {"group_size": 64, "bits": 4} to quantize like mlx-lm.
    """
    from mlx_lm.models import qwen2

    if isinstance(config, str):
        config = config_for(config)
    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    if quantize:
        nn.quantize(model, **quantize)
    mx.eval(model.parameters())
    return model
