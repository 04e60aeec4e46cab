"""Real architectures from their config values, with random weights.

Memory does not depend on weight values, so benchmarks and "will it fit?"
answers build the exact architecture offline (values from each model's config.json)
instead of downloading weights. `tiny_config(family)` gives a small config of
every supported family for tests (windows and no-RoPE layers included).
"""

import copy
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

_QWEN25 = dict(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0,
               vocab_size=151936, tie_word_embeddings=True,
               max_position_embeddings=32768)
_QWEN3 = dict(model_type="qwen3", rms_norm_eps=1e-6, rope_theta=1000000.0,
              vocab_size=151936, tie_word_embeddings=True,
              max_position_embeddings=40960, head_dim=128, num_key_value_heads=8)
_LLAMA32 = dict(model_type="llama", rms_norm_eps=1e-5, rope_theta=500000.0,
                vocab_size=128256, tie_word_embeddings=True,
                max_position_embeddings=131072, num_key_value_heads=8,
                rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0,
                                  original_max_position_embeddings=8192))
_GEMMA3 = dict(model_type="gemma3_text", rms_norm_eps=1e-6, rope_theta=1000000.0,
               rope_local_base_freq=10000.0, query_pre_attn_scalar=256, head_dim=256,
               sliding_window_pattern=6)
_SMOLLM2 = dict(model_type="llama", rms_norm_eps=1e-5, vocab_size=49152,
                tie_word_embeddings=True, max_position_embeddings=8192, head_dim=64)

_QWEN35_ROPE = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25)
# Qwen3.5 dense text models (the text_config of each model's config.json, which mlx-lm
# also reads flat): layer i is a gated DeltaNet layer unless (i + 1) % 4 == 0; 16 key
# heads of 128, value heads of 128, conv kernel 4; attention heads of 256 with a
# per-head output gate and RoPE on a quarter of each head (θ 1e7); tied head
_QWEN35 = dict(model_type="qwen3_5", rms_norm_eps=1e-6, vocab_size=248320,
               tie_word_embeddings=True, max_position_embeddings=262144, head_dim=256,
               full_attention_interval=4, linear_num_key_heads=16, linear_key_head_dim=128,
               linear_value_head_dim=128, linear_conv_kernel_dim=4,
               rope_parameters=dict(rope_type="default", rope_theta=10000000.0,
                                    partial_rotary_factor=0.25, mrope_interleaved=True,
                                    mrope_section=[11, 11, 10]))
_LFM2 = dict(model_type="lfm2", num_hidden_layers=16, num_key_value_heads=8,
             vocab_size=65536, norm_eps=1e-5, rope_theta=1000000.0,
             max_position_embeddings=128000, conv_bias=False, conv_L_cache=3,
             block_multiple_of=256, block_ffn_dim_multiplier=1.0,
             block_auto_adjust_ff_dim=True,
             layer_types=["full_attention" if i in (2, 5, 8, 10, 12, 14) else "conv"
                          for i in range(16)])

_GEMMA4 = dict(model_type="gemma4_text", num_attention_heads=8, head_dim=256,
               global_head_dim=512, hidden_size_per_layer_input=256, vocab_size=262144,
               vocab_size_per_layer_input=262144, sliding_window=512,
               final_logit_softcapping=30.0, rms_norm_eps=1e-6,
               max_position_embeddings=131072, tie_word_embeddings=True)

CONFIGS = {
    "Qwen2.5-0.5B": dict(_QWEN25, hidden_size=896, num_hidden_layers=24,
                         intermediate_size=4864, num_attention_heads=14,
                         num_key_value_heads=2),
    "Qwen2.5-1.5B": dict(_QWEN25, hidden_size=1536, num_hidden_layers=28,
                         intermediate_size=8960, num_attention_heads=12,
                         num_key_value_heads=2),
    "Qwen2.5-3B": dict(_QWEN25, hidden_size=2048, num_hidden_layers=36,
                       intermediate_size=11008, num_attention_heads=16,
                       num_key_value_heads=2),
    "Qwen3-0.6B": dict(_QWEN3, hidden_size=1024, num_hidden_layers=28,
                       intermediate_size=3072, num_attention_heads=16),
    "Qwen3-1.7B": dict(_QWEN3, hidden_size=2048, num_hidden_layers=28,
                       intermediate_size=6144, num_attention_heads=16),
    "Qwen3-4B": dict(_QWEN3, hidden_size=2560, num_hidden_layers=36,
                     intermediate_size=9728, num_attention_heads=32),
    "Llama-3.2-1B": dict(_LLAMA32, hidden_size=2048, num_hidden_layers=16,
                         intermediate_size=8192, num_attention_heads=32, head_dim=64),
    "Llama-3.2-3B": dict(_LLAMA32, hidden_size=3072, num_hidden_layers=28,
                         intermediate_size=8192, num_attention_heads=24, head_dim=128),
    "gemma-3-1b": dict(_GEMMA3, hidden_size=1152, num_hidden_layers=26,
                       intermediate_size=6912, num_attention_heads=4,
                       num_key_value_heads=1, vocab_size=262144, sliding_window=512,
                       max_position_embeddings=32768),
    "gemma-3-4b": dict(_GEMMA3, hidden_size=2560, num_hidden_layers=34,
                       intermediate_size=10240, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=262208, sliding_window=1024,
                       max_position_embeddings=131072,
                       rope_scaling=dict(rope_type="linear", factor=8.0)),
    "SmolLM2-135M": dict(_SMOLLM2, hidden_size=576, num_hidden_layers=30,
                         intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0),
    "SmolLM2-360M": dict(_SMOLLM2, hidden_size=960, num_hidden_layers=32,
                         intermediate_size=2560, num_attention_heads=15,
                         num_key_value_heads=5, rope_theta=10000.0),
    "SmolLM2-1.7B": dict(_SMOLLM2, hidden_size=2048, num_hidden_layers=24,
                         intermediate_size=8192, num_attention_heads=32,
                         num_key_value_heads=32, rope_theta=130000.0),
    "SmolLM3-3B": dict(model_type="smollm3", hidden_size=2048, num_hidden_layers=36,
                       intermediate_size=11008, num_attention_heads=16,
                       num_key_value_heads=4, head_dim=128, vocab_size=128256,
                       rms_norm_eps=1e-6, rope_theta=5000000.0, tie_word_embeddings=True,
                       max_position_embeddings=65536, no_rope_layer_interval=4),
    # Qwen3.5-0.8B, -2B, -4B: each model's config.json
    "Qwen3.5-0.8B": dict(_QWEN35, hidden_size=1024, num_hidden_layers=24,
                         intermediate_size=3584, num_attention_heads=8,
                         num_key_value_heads=2, linear_num_value_heads=16),
    "Qwen3.5-2B": dict(_QWEN35, hidden_size=2048, num_hidden_layers=24,
                       intermediate_size=6144, num_attention_heads=8,
                       num_key_value_heads=2, linear_num_value_heads=16),
    "Qwen3.5-4B": dict(_QWEN35, hidden_size=2560, num_hidden_layers=32,
                       intermediate_size=9216, num_attention_heads=16,
                       num_key_value_heads=4, linear_num_value_heads=32),
    "EXAONE-4.0-1.2B": dict(model_type="exaone4", hidden_size=2048, num_hidden_layers=30,
                            intermediate_size=4096, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=64, vocab_size=102400,
                            rms_norm_eps=1e-5, rope_theta=1000000.0,
                            max_position_embeddings=65536, tie_word_embeddings=True,
                            sliding_window=None, sliding_window_pattern=None,
                            rope_scaling=dict(rope_type="llama3", factor=16.0,
                                              low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_position_embeddings=8192)),
    "Ministral-3-3B": dict(model_type="ministral3", hidden_size=3072, num_hidden_layers=26,
                           intermediate_size=9216, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=128, vocab_size=131072,
                           rms_norm_eps=1e-5, max_position_embeddings=262144,
                           tie_word_embeddings=True, sliding_window=None,
                           rope_parameters=dict(rope_type="yarn", factor=16.0,
                                                original_max_position_embeddings=16384,
                                                beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                                                mscale_all_dim=1.0, rope_theta=1000000.0,
                                                llama_4_scaling_beta=0.1)),
    "helium-1-2b": dict(model_type="helium", hidden_size=2560, num_hidden_layers=24,
                        intermediate_size=7040, num_attention_heads=20,
                        num_key_value_heads=20, head_dim=128, vocab_size=48000,
                        rms_norm_eps=1e-8, rope_theta=100000.0, max_position_embeddings=4096,
                        attention_bias=False, mlp_bias=False, tie_word_embeddings=False),
    "LFM2-350M": dict(_LFM2, hidden_size=1024, block_dim=1024, block_ff_dim=6656,
                      num_attention_heads=16),
    "LFM2-1.2B": dict(_LFM2, hidden_size=2048, block_dim=2048, block_ff_dim=12288,
                      num_attention_heads=32),
    "LFM2.5-1.2B": dict(_LFM2, hidden_size=2048, block_dim=2048, block_ff_dim=12288,
                        num_attention_heads=32),
    "gemma-4-E2B": dict(_GEMMA4, hidden_size=1536, num_hidden_layers=35,
                        intermediate_size=6144, num_key_value_heads=1, num_kv_shared_layers=20,
                        sliding_window_pattern=5, use_double_wide_mlp=True),
    "gemma-4-E4B": dict(_GEMMA4, hidden_size=2560, num_hidden_layers=42,
                        intermediate_size=10240, num_key_value_heads=2, num_kv_shared_layers=18,
                        sliding_window_pattern=6, use_double_wide_mlp=False),
}

# Tiny configs per family (tests): D 64, 2-4 blocks, vocab 256, GQA 2:1.
_T = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
          num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
          rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096)
_TINY_YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                  beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.0)
# 5 blocks: 0-2 own their K, V (1 full, 2 sliding); 3 reads block 2's, 4 reads block 1's
_TINY_GEMMA4 = dict(_T, model_type="gemma4_text", num_hidden_layers=5, intermediate_size=64,
                    head_dim=16, global_head_dim=32, num_kv_shared_layers=2,
                    hidden_size_per_layer_input=32, vocab_size_per_layer_input=256,
                    sliding_window=4, final_logit_softcapping=5.0,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                 "sliding_attention", "full_attention"])
TINY = {
    "qwen2": dict(_T, model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(_T, model_type="qwen3", head_dim=16, tie_word_embeddings=True),
    "llama": dict(_T, model_type="llama", tie_word_embeddings=False,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0,
                                    original_max_position_embeddings=64)),
    "llama-bias-sliding": dict(_T, model_type="llama", num_hidden_layers=3,
                               attention_bias=True, mlp_bias=True, sliding_window=5,
                               layer_types=["sliding_attention", "full_attention",
                                            "sliding_attention"]),
    "llama-yarn": dict(_T, model_type="llama", rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
        beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.0)),
    "llama-linear": dict(_T, model_type="llama", rope_traditional=True,
                         rope_scaling=dict(rope_type="linear", factor=2.0)),
    "llama-dynamic": dict(_T, model_type="llama",
                          rope_scaling=dict(rope_type="dynamic", factor=2.0)),
    "mistral": dict(_T, model_type="mistral", sliding_window=4, tie_word_embeddings=False),
    "smollm3": dict(_T, model_type="smollm3", num_hidden_layers=4,
                    no_rope_layer_interval=2, tie_word_embeddings=True),
    "gemma": dict(_T, model_type="gemma", head_dim=16),
    "gemma2": dict(_T, model_type="gemma2", head_dim=16, query_pre_attn_scalar=16,
                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    "gemma3_text": dict(_T, model_type="gemma3_text", head_dim=16, num_hidden_layers=3,
                        query_pre_attn_scalar=16, sliding_window=4,
                        sliding_window_pattern=3, rope_local_base_freq=100.0,
                        rope_scaling=dict(rope_type="linear", factor=8.0)),
    "gemma3": dict(model_type="gemma3", vocab_size=256, text_config=dict(
        _T, model_type="gemma3_text", head_dim=16, num_hidden_layers=2,
        query_pre_attn_scalar=16, sliding_window=4, sliding_window_pattern=2)),
    "phi3": dict(_T, model_type="phi3", partial_rotary_factor=0.5,
                 original_max_position_embeddings=64,
                 rope_scaling=dict(type="longrope", short_factor=[1.0 + 0.1 * i
                                                                  for i in range(4)],
                                   long_factor=[1.0 + 0.5 * i for i in range(4)])),
    "granite": dict(_T, model_type="granite", logits_scaling=4.0,
                    attention_multiplier=0.2, embedding_multiplier=3.0,
                    residual_multiplier=0.5, attention_bias=False, mlp_bias=False),
    "olmo2": dict(_T, model_type="olmo2", tie_word_embeddings=False),
    # text-only qwen3_5 config (mlx-lm wraps it as the text_config): DeltaNet layers
    # 0, 2 and gated attention 1, 3; 2 key / 4 value heads, conv kernel 4. eps 1e-3:
    # the gated RMSNorm divides by the rms of the recurrence output, ~1e-3 in a random
    # model, so at eps 1e-6 it amplifies fp32 rounding up to 1000×; 1e-3 caps that at
    # ~30× (the model's own fp32 noise floor: tests/test_qwen3_5.py)
    "qwen3_5": dict(_T, model_type="qwen3_5", num_hidden_layers=4, head_dim=16,
                    rms_norm_eps=1e-3,
                    tie_word_embeddings=True, full_attention_interval=2,
                    linear_num_key_heads=2, linear_num_value_heads=4,
                    linear_key_head_dim=16, linear_value_head_dim=8,
                    linear_conv_kernel_dim=4, rope_parameters=_QWEN35_ROPE),
    "olmo3": dict(_T, model_type="olmo3", num_hidden_layers=3, sliding_window=4,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                  rope_scaling=_TINY_YARN),
    "exaone4": dict(_T, model_type="exaone4", num_hidden_layers=3, head_dim=16,
                    tie_word_embeddings=False, sliding_window=4, sliding_window_pattern="LLG",
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0,
                                      original_max_position_embeddings=64)),
    "ministral3": dict(_T, model_type="ministral3", num_hidden_layers=3, head_dim=16,
                       sliding_window=4, layer_types=["sliding_attention", "full_attention",
                                                      "sliding_attention"],
                       rope_parameters=dict(_TINY_YARN, rope_theta=10000.0,
                                            llama_4_scaling_beta=0.1)),
    "mistral3": dict(model_type="mistral3", vocab_size=256, text_config=dict(
        _T, model_type="ministral3", head_dim=16, tie_word_embeddings=False,
        rope_parameters=dict(_TINY_YARN, rope_theta=10000.0, llama_4_scaling_beta=0.1))),
    "helium": dict(_T, model_type="helium", head_dim=16, attention_bias=True,
                   mlp_bias=True, tie_word_embeddings=True),
    "ernie4_5": dict(_T, model_type="ernie4_5", head_dim=16, use_bias=True,
                     tie_word_embeddings=False),
    "lfm2": dict(_T, model_type="lfm2", num_hidden_layers=3, norm_eps=1e-5, conv_bias=True,
                 conv_L_cache=3, block_dim=64, block_ff_dim=128, block_multiple_of=32,
                 block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=True,
                 layer_types=["conv", "full_attention", "conv"]),
    "apertus": dict(_T, model_type="apertus", mlp_bias=False, attention_bias=False,
                    post_norm=False, qk_norm=True, tie_word_embeddings=False,
                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0,
                                      original_max_position_embeddings=64)),
    "gemma4_text": _TINY_GEMMA4,
    "gemma4": dict(model_type="gemma4", vocab_size=256, text_config=dict(
        _TINY_GEMMA4, num_hidden_layers=4, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention",
                     "full_attention"], hidden_size_per_layer_input=0)),
}


def tiny_config(family: str = "qwen2", **overrides) -> dict:
    """A small config of `family` (a TINY key) for tests; qwen2 by default
    (GQA 2:1, biases on q/k/v, tied)."""
    if family not in TINY:
        raise ValueError(f"no tiny config for {family!r}; known: {', '.join(TINY)}")
    cfg = dict(TINY[family])
    if "text_config" in cfg:
        cfg["text_config"] = dict(cfg["text_config"], **overrides)
    else:
        cfg.update(overrides)
    return cfg


def config_for(name: str) -> dict:
    """Bundled config of a model name (org prefix, -Instruct/-Thinking/-it/-Base and
    quantization suffixes ignored, any case), e.g. mlx-community/Qwen3-0.6B-4bit."""
    key = name.split("/")[-1].lower()
    for suffix in ("-4bit", "-8bit", "-bf16", "-mlx", "-instruct", "-thinking", "-base",
                   "-it"):
        key = key.replace(suffix, "")
    folded = {k.lower(): k for k in CONFIGS}
    if key not in folded:
        raise ValueError(f"no bundled architecture for {name!r}; known: "
                         f"{', '.join(CONFIGS)}")
    return dict(CONFIGS[folded[key]])


def model_class(config: dict):
    """(Model, ModelArgs) classes mlx-lm would use for `config` (remaps included)."""
    from mlx_lm.utils import _get_classes
    return _get_classes(config)


def build_model(config, dtype=mx.float32, seed: int = 0,
                quantize: Optional[dict] = None, lazy: bool = False) -> nn.Module:
    """mlx-lm Model from a config dict or bundled name, random weights, evaluated.

    quantize: e.g. {"group_size": 64, "bits": 4} to quantize like mlx-lm.
    lazy: leave the weights unevaluated (shapes and nbytes only, no memory).
    """
    config = config_for(config) if isinstance(config, str) else copy.deepcopy(config)
    Model, Args = model_class(config)          # (a copy: qwen3_5 edits rope_parameters)
    mx.random.seed(seed)
    model = Model(Args.from_dict(config))
    if hasattr(model, "sanitize"):       # gemma3: no lm_head weight -> tie it
        from mlx.utils import tree_flatten
        weights = {k: v for k, v in tree_flatten(model.parameters())
                   if not k.endswith("lm_head.weight")}
        model.sanitize(weights)
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    if quantize:
        nn.quantize(model, **quantize)
    if not lazy:
        mx.eval(model.parameters())
    return model
