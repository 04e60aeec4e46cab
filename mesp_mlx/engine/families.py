"""Family readers: mlx-lm modules -> ModelSpec.

Each reader is a few attribute reads; the block math lives in block.py once.
A family is named by the mlx-lm module that defines the model class
(`mlx_lm.models.llama` also serves `mistral`, which mlx-lm remaps to llama).
Adding a family = adding a reader here plus its tests, never a block copy.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .block_parts import xielu_act
from .lora_layers import LoRALinear
from ..ops.frozen import FrozenWeight
from ..ops.rmsnorm import effective_weight
from ..ops.rope import rope_from_module
from .spec import (PLAIN_IO, BlockIO, BlockSpec, ConvSpec, DeltaSpec, Fused, ModelSpec,
                   Norm, Tail)
from ..errors import UnsupportedModelError

# out of reach of the per-block engines: why, per family
OUT_OF_REACH = {
    "qwen3_moe": "a mixture-of-experts MLP (router + SwitchGLU)",
    "gemma3n": ("AltUp (four hidden-state streams, predicted and corrected by per-token "
                "routers in every block), Laurel low-rank residual branches and a sparse "
                "top-k GELU (a per-token mean + k·std cutoff on the gate)"),
    "lfm2_moe": "a mixture-of-experts feed-forward (router + SwitchGLU)",
}


def family_of(model) -> str:
    """Name of the mlx-lm module defining the model class (e.g. 'llama')."""
    return type(model).__module__.rsplit(".", 1)[-1]


def _norm(mod) -> Norm:
    # mlx-lm's gemma RMSNorm classes scale by 1 + w; nn.RMSNorm by w
    kind = "1+w" if type(mod).__module__.startswith("mlx_lm.models.gemma") else "w"
    if type(mod) is not nn.RMSNorm and kind == "w":
        raise UnsupportedModelError(f"unknown norm class {type(mod).__name__}")
    return Norm(effective_weight(mod.weight, kind), mod.eps)


def _out_dim(mod) -> int:
    return FrozenWeight.of(mod.linear if isinstance(mod, LoRALinear) else mod).shape[0]


def _mlp(blk) -> dict:
    """gate_up and down of a block's dense GLU MLP."""
    mlp = blk.mlp
    if "gate_up_proj" in mlp:
        F = _out_dim(mlp.gate_up_proj) // 2
        gate_up = Fused(mlp.gate_up_proj, (F, F))
    else:
        gate_up = (mlp.gate_proj, mlp.up_proj)
    return dict(gate_up=gate_up, down=mlp.down_proj)


def _block(blk, *, norms, act="silu", window=None, residual=1.0, softcap=None,
           mask_array=False, qk_norm="none", rope=True, io=PLAIN_IO, mlp=None) -> BlockSpec:
    """Read the attention/MLP modules shared by every family's block (rope False:
    a layer without positional rotation, e.g. exaone4's global layers)."""
    a = blk.self_attn
    H = getattr(a, "n_heads", None) or a.num_attention_heads       # olmo3 names them
    K = getattr(a, "n_kv_heads", None) or a.num_key_value_heads    # num_*_heads
    if "qkv_proj" in a:
        hd = _out_dim(a.qkv_proj) // (H + 2 * K)
        qkv = Fused(a.qkv_proj, (H * hd, K * hd, K * hd))
    else:
        hd = _out_dim(a.q_proj) // H
        qkv = (a.q_proj, a.k_proj, a.v_proj)
    qn = dict(q_norm=_norm(a.q_norm), k_norm=_norm(a.k_norm),
              qk_norm_full=qk_norm == "full") if qk_norm != "none" else {}
    return BlockSpec(blk, **(mlp or _mlp(blk)), qkv=qkv, o=a.o_proj, H=H, K=K, hd=hd,
                     scale=a.scale, rope=rope_from_module(a.rope) if rope else None,
                     softcap=softcap, window=window, act=act, residual=residual,
                     mask_array=mask_array, io=io,
                     **{k: _norm(getattr(blk, n)) for k, n in norms.items()}, **qn)


PRE = dict(attn_in="input_layernorm", mlp_in="post_attention_layernorm")
SANDWICH = dict(attn_in="input_layernorm", attn_out="post_attention_layernorm",
                mlp_in="pre_feedforward_layernorm", mlp_out="post_feedforward_layernorm")
POST = dict(attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm")


def _qwen2(model, lm, inner):
    return [_block(b, norms=PRE) for b in inner.layers], {}


def _qwen3(model, lm, inner):
    return [_block(b, norms=PRE, qk_norm="head") for b in inner.layers], {}


def _llama(model, lm, inner):        # also mistral and smollm3 (NoPE layers: rope None)
    W = inner.sliding_window
    return [_block(b, norms=PRE, window=W if b.use_sliding else None)
            for b in inner.layers], {}


def _gemma(model, lm, inner):
    return ([_block(b, norms=PRE, act="gelu") for b in inner.layers],
            dict(embed_scale=lm.args.hidden_size ** 0.5))


def _gemma2(model, lm, inner):
    return ([_block(b, norms=SANDWICH, act="gelu_tanh", mask_array=True,
                    softcap=b.self_attn.attn_logit_softcapping) for b in inner.layers],
            dict(embed_scale=lm.args.hidden_size ** 0.5,
                 final_softcap=lm.final_logit_softcapping))


def _gemma3_text(model, lm, inner):
    W = lm.args.sliding_window
    scale = mx.array(lm.args.hidden_size ** 0.5, mx.bfloat16).item()   # as mlx-lm rounds it
    return ([_block(b, norms=SANDWICH, act="gelu_tanh", qk_norm="head",
                    window=W if b.self_attn.is_sliding else None) for b in inner.layers],
            dict(embed_scale=scale))


def _phi3(model, lm, inner):
    return [_block(b, norms=PRE) for b in inner.layers], {}


def _granite(model, lm, inner):
    return ([_block(b, norms=PRE, residual=b.residual_multiplier) for b in inner.layers],
            dict(embed_scale=inner.embedding_multiplier, logit_scale=lm.logits_scaling))


def _olmo2(model, lm, inner):
    return [_block(b, norms=POST, qk_norm="full") for b in inner.layers], {}


def _gated_attention(blk) -> BlockSpec:
    """Qwen3-Next attention: q_proj emits (query, gate) per head, q/k RMSNorm per
    head, partial RoPE, o_proj reads the attention output ⊙ σ(gate)."""
    a = blk.self_attn
    H, K, hd = a.num_attention_heads, a.num_key_value_heads, a.head_dim
    return BlockSpec(blk, **_mlp(blk), qkv=(a.q_proj, a.k_proj, a.v_proj), o=a.o_proj,
                     H=H, K=K, hd=hd, scale=a.scale, q_gate=True, q_norm=_norm(a.q_norm),
                     k_norm=_norm(a.k_norm), rope=rope_from_module(a.rope),
                     **{k: _norm(getattr(blk, n)) for k, n in PRE.items()})


def _gated_delta(blk) -> BlockSpec:
    """A gated DeltaNet layer (DeltaSpec); its gated norm's weight is used as is
    (mlx-lm shifts the other norms by 1 when it converts a checkpoint, not this one)."""
    m = blk.linear_attn
    grouped = "in_proj_qkvz" in m
    proj = ((m.in_proj_qkvz, m.in_proj_ba) if grouped else
            (m.in_proj_qkv, m.in_proj_z, m.in_proj_b, m.in_proj_a))
    d = DeltaSpec(m, proj, m.out_proj, m.num_k_heads, m.num_v_heads, m.head_k_dim,
                  m.head_v_dim, m.conv_kernel_size, m.norm.eps, grouped=grouped)
    return BlockSpec(blk, **_mlp(blk), delta=d,
                     **{k: _norm(getattr(blk, n)) for k, n in PRE.items()})


def _qwen3_5(model, lm, inner):      # also qwen3_5_moe and qwen3_next, dense blocks only
    blocks = []
    for i, b in enumerate(inner.layers):
        if "switch_mlp" in b.mlp:
            raise UnsupportedModelError(
                f"{family_of(model)} layer {i} has a mixture-of-experts MLP (router + "
                "SwitchGLU), which the per-block engines (mesp, mebp) do not implement; "
                "use method='autodiff' (--method autodiff), which is exact for any model")
        blocks.append(_gated_delta(b) if b.is_linear else _gated_attention(b))
    return blocks, {}


def _olmo3(model, lm, inner):         # post-norm, full-width q/k norm, sliding layers
    W = inner.sliding_window
    return [_block(b, norms=POST, qk_norm="full", window=W if t == "sliding_attention"
                   else None) for b, t in zip(inner.layers, inner.layer_types)], {}


def _exaone4(model, lm, inner):       # post-norm, per-head q/k norm; local layers
    W = inner.window_size             # slide with RoPE, global layers have no RoPE
    return [_block(b, norms=POST, qk_norm="head", rope=b.self_attn.use_rope,
                   window=W if b.self_attn.is_local else None) for b in inner.layers], {}


_SCALED_Q_IO = BlockIO(lambda m, x, mask, side, kv: (m(x, None, mask), None),
                       lambda args, kw: args[1] if len(args) > 1 else kw.get("mask"),
                       lambda x: x)        # block(x, attn_scale, mask): scale None = computed


def _ministral3(model, lm, inner):
    """Llama layout; queries scaled by 1 + β·log(1 + ⌊t / N⌋) (Llama 4 attention
    scaling), which is exactly 1 for positions t < N: the engine runs T ≤ N."""
    W, rp = inner.sliding_window, lm.args.rope_parameters
    N = int(rp["original_max_position_embeddings"])
    return ([_block(b, norms=PRE, window=W if b.use_sliding else None, io=_SCALED_Q_IO)
             for b in inner.layers],
            dict(max_tokens=(N, "beyond it queries are scaled by position")))


def _mistral3(model, lm, inner):      # the VLM wrapper: its text model's reader
    fam = family_of(lm)
    if fam not in ("ministral3", "llama"):
        raise UnsupportedModelError(
            f"mistral3 with a {fam} text model is not supported by the per-block engines; "
            "use method='autodiff' (--method autodiff)")
    return READERS[fam](model, lm, inner)


def _lfm2(model, lm, inner):
    """Pre-norm blocks (operator_norm, ffn_norm), SwiGLU feed_forward (w1 gate, w3 up,
    w2 down); the token mixer a short conv ("conv" layers) or GQA attention with
    per-head q/k norms and out_proj; the final norm is `embedding_norm`."""
    blocks = []
    for b in inner.layers:
        ff = b.feed_forward
        common = dict(gate_up=(ff.w1, ff.w3), down=ff.w2, attn_in=_norm(b.operator_norm),
                      mlp_in=_norm(b.ffn_norm))
        if b.is_attention_layer:
            a = b.self_attn
            blocks.append(BlockSpec(
                b, **common, qkv=(a.q_proj, a.k_proj, a.v_proj), o=a.out_proj, H=a.n_heads,
                K=a.n_kv_heads, hd=a.head_dim, scale=a.scale, q_norm=_norm(a.q_layernorm),
                k_norm=_norm(a.k_layernorm), rope=rope_from_module(a.rope)))
        else:
            c = b.conv
            blocks.append(BlockSpec(b, **common, conv=ConvSpec(c, c.in_proj, c.out_proj,
                                                               c.L_cache)))
    return blocks, dict(final_norm=inner.embedding_norm)


def _apertus(model, lm, inner):
    """Pre-norm (attention_layernorm, feedforward_layernorm), per-head q/k norms, and
    an ungated MLP: down(xIELU(up(x))) with the layer's frozen xIELU scalars."""
    norms = dict(attn_in="attention_layernorm", mlp_in="feedforward_layernorm")
    return [_block(b, norms=norms, qk_norm="head", act=xielu_act(b.mlp.act_fn),
                   mlp=dict(gate_up=(b.mlp.up_proj,), down=b.mlp.down_proj))
            for b in inner.layers], {}


_GEMMA4_IO = BlockIO(        # layer(x, mask, cache, per_layer_input, shared_kv, offset)
    lambda m, x, mask, side, kv: m(x, mask, None, per_layer_input=side, shared_kv=kv,
                                   offset=0)[:2],
    lambda args, kw: args[0] if args else kw.get("mask"), lambda x: (x, None, 0))


def _gemma4_text(model, lm, inner):
    """Sandwich blocks, GeGLU (tanh), attention scale 1, per-head q/k norms and a
    weightless v norm; sliding and global layers (own head dim, RoPE, kv heads); the
    last num_kv_shared_layers blocks attend over the K, V of the last earlier block of
    their type (kv_from, no k/v projections, double-wide MLP); after the MLP the tail:
    per-layer input gate, projection and norm (when hidden_size_per_layer_input),
    then × layer_scalar. Final logits softcapped; MoE blocks refused."""
    args = lm.args
    if args.enable_moe_block:
        raise UnsupportedModelError(
            "gemma4 with enable_moe_block has a mixture-of-experts branch (router + "
            "SwitchGLU) in every block, which the per-block engines (mesp, mebp) do not "
            "implement; use method='autodiff' (--method autodiff), which is exact for "
            "any model")
    W, blocks = args.sliding_window, []
    for i, b in enumerate(inner.layers):
        a = b.self_attn
        if a.use_k_eq_v:
            raise UnsupportedModelError(
                "gemma4 with attention_k_eq_v (values = keys) is not supported by the "
                "per-block engines; use method='autodiff' (--method autodiff)")
        shared = not a.has_kv
        kv = {} if shared else dict(k_norm=_norm(a.k_norm), v_norm=Norm(None, a.v_norm.eps))
        pli = b.per_layer_input_gate is not None
        tail = Tail(b, "layer_scalar", b.per_layer_input_gate if pli else None,
                    b.per_layer_projection if pli else None,
                    _norm(b.post_per_layer_input_norm) if pli else None)
        blocks.append(BlockSpec(
            b, **_mlp(b), qkv=(a.q_proj,) if shared else (a.q_proj, a.k_proj, a.v_proj),
            o=a.o_proj, H=a.n_heads, K=a.n_kv_heads, hd=a.head_dim, scale=a.scale,
            q_norm=_norm(a.q_norm), **kv, rope=rope_from_module(a.rope),
            window=W if a.is_sliding else None, act="gelu_tanh",
            kv_from=inner.previous_kvs[i] if shared else None, tail=tail, io=_GEMMA4_IO,
            **{k: _norm(getattr(b, n)) for k, n in SANDWICH.items()}))
    extra = dict(embed_scale=inner.embed_scale, final_softcap=lm.final_logit_softcapping)
    if inner.hidden_size_per_layer_input:
        extra["side_inputs"] = lambda ids, h0: _per_layer_inputs(inner, ids, h0)
    return blocks, extra


def _per_layer_inputs(inner, ids, h0):
    """Each block's per-layer input [B, T, P] as the model computes it (frozen: the
    per-layer embedding of the ids and a normed projection of h0, ×2^-½)."""
    e = inner._project_per_layer_inputs(h0, inner._get_per_layer_inputs(ids))
    return [e[:, :, i, :] for i in range(len(inner.layers))]


READERS = {"qwen2": _qwen2, "qwen3": _qwen3, "llama": _llama, "smollm3": _llama,
           "gemma": _gemma, "gemma2": _gemma2, "gemma3_text": _gemma3_text,
           "gemma3": _gemma3_text, "phi3": _phi3, "granite": _granite, "olmo2": _olmo2,
           "qwen3_5": _qwen3_5, "qwen3_5_moe": _qwen3_5, "qwen3_next": _qwen3_5,
           "olmo3": _olmo3, "exaone4": _exaone4, "ministral3": _ministral3,
           "mistral3": _mistral3, "helium": _qwen2, "ernie4_5": _qwen2, "lfm2": _lfm2,
           "apertus": _apertus,
           "gemma4_text": _gemma4_text, "gemma4": _gemma4_text}


def language_model(model):
    """The text model: VLM wrappers (gemma3, qwen3_5) keep it in `language_model`."""
    return model.language_model if "language_model" in model else model


def read_spec(model) -> ModelSpec:
    """ModelSpec of an mlx-lm model; UnsupportedModelError names what works instead."""
    fam = family_of(model)
    if fam in OUT_OF_REACH:
        raise UnsupportedModelError(
            f"model family {fam!r} has {OUT_OF_REACH[fam]}, which the per-block "
            "engines (mesp, mebp) do not implement; use method='autodiff' "
            "(--method autodiff), which is exact for any model")
    if fam not in READERS:
        raise UnsupportedModelError(
            f"model family {fam!r} is not supported by the per-block engines (supported: "
            f"{', '.join(sorted(set(READERS) | {'mistral'}))}); use method='autodiff' "
            "(--method autodiff)")
    lm = language_model(model)
    inner = lm.model
    try:
        blocks, extra = READERS[fam](model, lm, inner)
    except (AttributeError, KeyError) as e:
        raise UnsupportedModelError(
            f"{fam} model does not have the layout its reader expects ({e}); "
            "use method='autodiff'") from None
    head_mod = head_module(lm, inner)
    paths = {id(m): p for p, m in model.named_modules()}
    lora_blocks = [i for i, b in enumerate(inner.layers)
                   if any(isinstance(m, LoRALinear) for _, m in b.named_modules())]
    _check_trainable(model)
    final = extra.pop("final_norm") if "final_norm" in extra else inner.norm
    return ModelSpec(fam, inner, inner.embed_tokens, blocks, _norm(final),
                     FrozenWeight.of(head_mod),
                     head_mod if head_mod is not inner.embed_tokens else head_mod.as_linear,
                     paths, lora_blocks[0] if lora_blocks else len(blocks), **extra)


def head_module(lm, inner):
    """The LM head the model applies: the embedding when tied (helium builds an
    lm_head it does not use then), else lm_head."""
    tied = getattr(lm, "tie_word_embeddings", None)          # gemma3_text keeps it here
    if tied is None:
        tied = getattr(getattr(lm, "args", None), "tie_word_embeddings", False)
    return inner.embed_tokens if tied or "lm_head" not in lm else lm.lm_head


def _check_trainable(model):
    bad = [k for k, _ in tree_flatten(model.trainable_parameters())
           if not k.endswith((".lora_a", ".lora_b"))]
    if bad:
        raise ValueError(f"the per-block schedules train LoRA parameters only, but "
                         f"{bad[:3]} are trainable; freeze them or use method='autodiff'")
    foreign = [p for p, m in model.named_modules()
               if "lora_a" in m and not isinstance(m, LoRALinear)]
    if foreign:
        raise ValueError(f"{foreign[0]} is a LoRA layer of another library; convert it with "
                         "mesp_mlx.apply_lora (same parameter names) or use "
                         "method='autodiff'")
