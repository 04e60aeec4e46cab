"""Per-block schedules for exact LoRA gradients: MeBP and MeSP.

Both run the same explicit schedule (REFERENCE §3: tight lifetimes in MLX need
evaluation barriers outside transforms, not a layer inside one lazy graph):
  1. forward: run the blocks, evaluating and keeping only each block's input
     (the checkpoints, L × B × T × D × itemsize bytes);
  2. loss head on the final hidden state → loss and dL/dh;
  3. for each block in reverse: recompute it from its checkpoint, backprop the
     incoming gradient, evaluate, drop the checkpoint and the block's tensors.
"mebp": step 3 is mx.vjp of the block (autodiff), the head is autodiff on full logits.
"mesp": step 3 is the hand-derived backward below (ops/), the head is chunked
        (ops/loss_head.py), and the recompute skips what the backward never
        reads (down_proj's output).
"""

import time
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from .layers import LoRALinear
from .ops.attention import attention_backward_chunked, attention_chunked
from .ops.frozen import FrozenWeight
from .ops.lora_linear import lora_linear, lora_linear_backward
from .ops.loss_head import loss_head_value_and_grad
from .ops.rmsnorm import rmsnorm, rmsnorm_backward
from .ops.rope import rope, rope_backward
from .ops.swiglu import swiglu, swiglu_backward

SUPPORTED = ("qwen2",)


@dataclass
class EngineOptions:
    """Knobs of the schedule (defaults chosen by bench/memory_bench.py)."""

    head_chunk_bytes: int = 8 << 20   # fp32 logits per loss-head tile [rows, vocab slice]
    head_rows: int = 512              # token rows per loss-head tile
    attn_chunk_bytes: int = 8 << 20   # attention probs per query block (rows = this / 4HT)
    clear_cache: str = "step"         # allocator cache: "none", "step" or "block" (mx.clear_cache)
    fused_attention: Optional[bool] = None  # None: fused SDPA where it is memory-efficient


def head_tiles(opt: EngineOptions, N: int, V: int):
    """(rows, vocab slice) of a loss-head tile: about opt.head_chunk_bytes of fp32."""
    rows = max(1, min(N, opt.head_rows))
    return rows, max(1, min(V, opt.head_chunk_bytes // (4 * rows)))


def fused_attention_ok(opt: EngineOptions) -> bool:
    """Metal's fused SDPA never materialises the T×T scores; the CPU fallback does."""
    if opt.fused_attention is not None:
        return opt.fused_attention
    return mx.default_device() == mx.gpu and mx.metal.is_available()


@dataclass
class Parts:
    """The pieces of a Qwen2 model that the schedule touches."""

    embed: nn.Module
    blocks: list
    norm: nn.Module
    head: FrozenWeight           # (V, D): tied embedding or LM head
    logits: object               # callable hn -> logits (autodiff head)
    paths: dict                  # id(module) -> dotted path in the model
    first: int                   # lowest block holding a LoRA layer


def model_parts(model) -> Parts:
    mtype = getattr(model, "model_type", None) or getattr(getattr(model, "args", None),
                                                          "model_type", None)
    if mtype not in SUPPORTED:
        raise ValueError(f"model family {mtype!r} is not supported by the per-block "
                         f"schedules (supported: {', '.join(SUPPORTED)}); use "
                         "method='autodiff'")
    inner = model.model
    tied = model.args.tie_word_embeddings
    head_mod = inner.embed_tokens if tied else model.lm_head
    paths = {id(m): p for p, m in model.named_modules()}
    lora_blocks = [i for i, b in enumerate(inner.layers)
                   if any(isinstance(m, LoRALinear) for _, m in b.named_modules())]
    _check_trainable(model)
    for b in inner.layers:
        r = b.self_attn.rope
        if not isinstance(r, nn.RoPE) or r.traditional or r.scale != 1.0:
            raise ValueError(f"unsupported RoPE variant {type(r).__name__} (only plain "
                             "non-traditional RoPE, as in Qwen2.5); use method='autodiff'")
    return Parts(inner.embed_tokens, inner.layers, inner.norm, FrozenWeight.of(head_mod),
                 head_mod.as_linear if tied else head_mod, paths,
                 lora_blocks[0] if lora_blocks else len(inner.layers))


def _check_trainable(model):
    bad = [k for k, _ in tree_flatten(model.trainable_parameters())
           if not k.endswith((".lora_a", ".lora_b"))]
    if bad:
        raise ValueError(f"the per-block schedules train LoRA parameters only, but "
                         f"{bad[:3]} are trainable; freeze them or use method='autodiff'")


def run(model, inputs, targets, mask, method, options: Optional[EngineOptions] = None,
        stats: Optional[dict] = None):
    """Loss and LoRA gradients (tree of model.trainable_parameters())."""
    opt = options or EngineOptions()
    parts = model_parts(model)
    clock = _Clock(stats)
    B, T = inputs.shape
    attn_mask = "causal" if T > 1 else None

    # 1. forward, keeping block inputs from the lowest LoRA block up
    h = parts.embed(inputs)
    mx.eval(h)
    ckpts = {}
    for i, blk in enumerate(parts.blocks):
        if i >= parts.first:
            ckpts[i] = h
        h = block_forward(blk, h, opt) if method == "mesp" else blk(h, attn_mask)
        mx.eval(h)
    if stats is not None:
        stats["checkpoint_bytes"] = sum(c.nbytes for c in ckpts.values())
        stats["n_checkpoints"] = len(ckpts)
    clock.lap("forward_s")

    # 2. loss head
    flat_t, flat_m = targets.reshape(-1), mask.reshape(-1)
    if method == "mesp":
        V, D = parts.head.shape
        rows, vocab = head_tiles(opt, B * T, V)
        hf = h.reshape(-1, D)
        hn = rmsnorm(hf, parts.norm.weight, parts.norm.eps)
        loss, dhn = loss_head_value_and_grad(hn, parts.head, flat_t, flat_m, rows, vocab)
        dh = rmsnorm_backward(dhn, hf, parts.norm.weight, parts.norm.eps).reshape(h.shape)
        del hn, dhn, hf
    else:
        def head(h):
            logits = parts.logits(parts.norm(h)).astype(mx.float32)
            ce = nn.losses.cross_entropy(logits, targets) * mask
            return ce.sum() / mx.maximum(mask.sum(), 1.0)

        loss, dh = mx.value_and_grad(head)(h)
    del h
    mx.eval(loss, dh)
    clock.lap("head_s")

    # 3. backward, block by block in reverse
    flat = {}
    back = _mesp_block if method == "mesp" else _mebp_block
    for i in range(len(parts.blocks) - 1, parts.first - 1, -1):
        x = ckpts.pop(i)
        dh = back(parts, parts.blocks[i], x, dh, attn_mask, flat, opt,
                  need_dx=i > parts.first)
        del x
        mx.eval(dh, *flat.values())
        if opt.clear_cache == "block":
            mx.clear_cache()
    if opt.clear_cache in ("block", "step"):
        mx.clear_cache()
    clock.lap("backward_s")
    if stats is not None:
        stats["grad_bytes"] = sum(g.nbytes for g in flat.values())
    grads = tree_map_with_path(lambda p, _: flat[p], model.trainable_parameters())
    return loss, grads


class _Clock:
    """Wall time per phase and the MLX peak so far into `stats` (no-op without stats)."""

    def __init__(self, stats):
        self.stats, self.t = stats, time.perf_counter()

    def lap(self, name):
        if self.stats is not None:
            now = time.perf_counter()
            self.stats[name] = now - self.t
            self.stats["peak_after_" + name[:-2]] = mx.get_peak_memory()  # monotone
            self.t = now


# ---------------------------------------------------------------- MeBP block
def _mebp_block(parts, blk, x, g, attn_mask, flat, opt, need_dx=True):
    """Recompute the block under mx.vjp; autodiff gives dx and the LoRA grads."""
    names, params = zip(*tree_flatten(blk.trainable_parameters()))

    def f(x, *ps):
        blk.update(tree_unflatten(list(zip(names, ps))))
        return blk(x, attn_mask)

    _, vjps = mx.vjp(f, [x, *params], [g])
    blk.update(tree_unflatten(list(zip(names, params))))
    prefix = parts.paths[id(blk)]
    for n, d in zip(names, vjps[1:]):
        flat[f"{prefix}.{n}"] = d
    return vjps[0]


# ---------------------------------------------------------------- MeSP block
def _lin(mod, x):
    """Forward of a frozen or LoRA projection."""
    if isinstance(mod, LoRALinear):
        return lora_linear(x, FrozenWeight.of(mod.linear), mod.lora_a, mod.lora_b,
                           mod.scale, mod.linear.get("bias"), mod.drop_multiplier(x))
    return lora_linear(x, FrozenWeight.of(mod), bias=mod.get("bias"))


def _lin_bwd(parts, mod, g, x, flat, need_dx=True):
    """dx of a projection; LoRA grads go to `flat` under mlx-lm's names."""
    if not isinstance(mod, LoRALinear):
        return FrozenWeight.of(mod).gW(g) if need_dx else None
    dx, dA, dB = lora_linear_backward(g, x, FrozenWeight.of(mod.linear), mod.lora_a,
                                      mod.lora_b, mod.scale, mod.drop_multiplier(x),
                                      need_dx)
    p = parts.paths[id(mod)]
    flat[p + ".lora_a"], flat[p + ".lora_b"] = dA, dB
    return dx


def _heads(t, n):          # [B,T,n·hd] -> [B,n,T,hd]
    B, T, _ = t.shape
    return t.reshape(B, T, n, -1).transpose(0, 2, 1, 3)


def _tokens(t):            # [B,n,T,hd] -> [B,T,n·hd]
    B, n, T, hd = t.shape
    return t.transpose(0, 2, 1, 3).reshape(B, T, n * hd)


def _attend(q, k, v, scale, opt):
    T, H = q.shape[2], q.shape[1]
    if fused_attention_ok(opt) or T == 1:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale,
                                                    mask="causal" if T > 1 else None)
    return attention_chunked(q, k, v, scale, max(1, opt.attn_chunk_bytes // (4 * H * T)))


def _attention_half(blk, x, opt):
    """n1, q, k, v (after RoPE, head layout), o, hm = x + o_proj(o)."""
    a, ln1 = blk.self_attn, blk.input_layernorm
    n1 = rmsnorm(x, ln1.weight, ln1.eps)
    q = rope(_heads(_lin(a.q_proj, n1), a.n_heads), a.rope.dims, a.rope.base)
    k = rope(_heads(_lin(a.k_proj, n1), a.n_kv_heads), a.rope.dims, a.rope.base)
    v = _heads(_lin(a.v_proj, n1), a.n_kv_heads)
    o = _attend(q, k, v, a.scale, opt)
    return n1, q, k, v, o, x + _lin(a.o_proj, _tokens(o))


def _mlp_half(blk, hm):
    """n2, gate, up, m = swiglu(gate, up): the MLP up to (not through) down_proj."""
    ln2, mlp = blk.post_attention_layernorm, blk.mlp
    n2 = rmsnorm(hm, ln2.weight, ln2.eps)
    gate, up = _lin(mlp.gate_proj, n2), _lin(mlp.up_proj, n2)
    return n2, gate, up, swiglu(gate, up)


def block_forward(blk, x, opt):
    """The block's output through the same ops as its recompute."""
    _, _, _, _, _, hm = _attention_half(blk, x, opt)
    return hm + _lin(blk.mlp.down_proj, _mlp_half(blk, hm)[3])


def _mesp_block(parts, blk, x, g, attn_mask, flat, opt, need_dx=True):
    """Hand-derived backward of one Qwen2 block; returns dL/dx.

    Kept across the mid-block barrier: n1, q, k, v (after RoPE), o (all T×D
    or smaller). Freed at the barrier: the MLP's T×F tensors.
    """
    a, mlp = blk.self_attn, blk.mlp
    ln1, ln2 = blk.input_layernorm, blk.post_attention_layernorm
    H, T = a.n_heads, x.shape[1]
    dims, base = a.rope.dims, a.rope.base

    # recompute (down_proj's output is never needed)
    n1, q, k, v, o, hm = _attention_half(blk, x, opt)
    n2, gate, up, m = _mlp_half(blk, hm)

    # MLP backward: out = hm + down(m)
    dm = _lin_bwd(parts, mlp.down_proj, g, m, flat)
    dgate, dup = swiglu_backward(dm, gate, up)
    del m, dm, gate, up
    dn2 = _lin_bwd(parts, mlp.gate_proj, dgate, n2, flat) + \
        _lin_bwd(parts, mlp.up_proj, dup, n2, flat)
    del dgate, dup
    dh = g + rmsnorm_backward(dn2, hm, ln2.weight, ln2.eps)
    del dn2, n2, hm
    mx.eval(dh, n1, q, k, v, o, *flat.values())          # barrier: MLP tensors freed

    # attention backward: hm = x + o_proj(o)
    do = _heads(_lin_bwd(parts, a.o_proj, dh, _tokens(o), flat), H)
    chunk = max(1, opt.attn_chunk_bytes // (4 * H * T))
    dq, dk, dv = attention_backward_chunked(do, q, k, v, o, a.scale, chunk)
    del do, q, k, v, o
    dq = _tokens(rope_backward(dq, dims, base))
    dk = _tokens(rope_backward(dk, dims, base))
    dv = _tokens(dv)
    dn1 = [_lin_bwd(parts, p, d, n1, flat, need_dx)
           for p, d in ((a.q_proj, dq), (a.k_proj, dk), (a.v_proj, dv))]
    if not need_dx:
        return dh                                           # unused by the caller
    return dh + rmsnorm_backward(dn1[0] + dn1[1] + dn1[2], x, ln1.weight, ln1.eps)
