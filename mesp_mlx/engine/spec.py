"""What the per-block engine needs to know about a model, as data.

A family reader (families.py) turns mlx-lm modules into a `ModelSpec`; the
generic block (block.py) and the driver (backprop.py) walk it and know no
family. One block, by role (not by mlx-lm attribute name):

    a  = N_attn_in(x)                      (pre-norm; olmo2 has none)
    r1 = mixer(a)                          (the token mixer, below)
    h  = x + α · N_attn_out(r1)            (sandwich / post-norm; α granite's residual)
    r2 = down(act(gate(N_mlp_in(h))) ⊙ up(N_mlp_in(h)))
    h2 = h + α · N_mlp_out(r2)
    out = h2, or with a `Tail` (gemma4): s · (h2 + N_t(proj_t(gelu(gate_t(h2)) ⊙ e)))
Token mixers (`BlockSpec.mixer`):
  "attention":   q, k, v = proj(a) → [N_q/N_k full width] → heads → [N_q/N_k/N_v per
                 head] → RoPE;  r1 = o_proj(attention(q, k, v; scale, softcap, window) ⊙
                 σ(z)) with z the per-head output gate q_proj also emits (q_gate,
                 Qwen3-Next); a KV-shared block (kv_from = i) projects q only and
                 attends over the K, V of block i
  "gated_delta": the gated DeltaNet of `DeltaSpec` (deltanet.py has its math).
  "short_conv":  LFM2's gated short convolution of `ConvSpec` (short_conv.py has its math).
Cross-block inputs (links.py): e, a constant input per block (ModelSpec.side_inputs:
gemma4's per-layer inputs), and the K, V a KV-shared block reads from an earlier one.
Embedding: h0 = embed(ids) · embed_scale. Head: z = (N_final(h) W_headᵀ) / logit_scale,
then z' = c · tanh(z / c) with c the final softcap.
"""

from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from ..ops.frozen import FrozenWeight
from ..ops.rmsnorm import rmsnorm
from ..ops.rope import Rope


@dataclass(frozen=True)
class Norm:
    """A frozen RMSNorm: y = x · rsqrt(mean(x²) + eps) ⊙ w (w None: no weight).
    w is the *effective* weight (w or 1 + w, as the family computes it)."""
    w: Optional[mx.array]
    eps: float

    def __call__(self, x):
        return rmsnorm(x, self.w, self.eps)


@dataclass(frozen=True)
class Fused:
    """One projection whose output is split into parts (phi3's qkv_proj, gate_up_proj)."""
    module: nn.Module
    sizes: Tuple[int, ...]          # output widths of the parts, in order


Proj = Union[Tuple[nn.Module, ...], Fused]     # separate projections, or one fused


@dataclass
class DeltaSpec:
    """A gated DeltaNet token mixer (Qwen3.5, Qwen3-Next linear attention).
    The frozen A_log, dt_bias, conv1d.weight and norm.weight are read from `module`
    when the block runs (streamed weights swap them in per block), never copied."""
    module: nn.Module               # the mlx-lm GatedDeltaNet
    proj: Tuple[nn.Module, ...]     # (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a), or
                                    # grouped: (in_proj_qkvz, in_proj_ba)
    out: nn.Module                  # out_proj
    Hk: int                         # key heads
    Hv: int                         # value heads (a multiple of Hk)
    Dk: int                         # key head dim
    Dv: int                         # value head dim
    kernel: int                     # causal conv kernel K
    norm_eps: float                 # eps of the gated RMSNorm
    qk_eps: float = 1e-6            # normalize_qk's eps (fixed in mlx-lm)
    grouped: bool = False           # Qwen3-Next: outputs interleaved per key head

    @property
    def conv_dim(self) -> int:
        return 2 * self.Hk * self.Dk + self.Hv * self.Dv


@dataclass
class ConvSpec:
    """LFM2's gated short convolution (a token mixer); the frozen conv weight and bias
    are read from `module` when the block runs (streamed weights swap them in)."""
    module: nn.Module               # the mlx-lm ShortConv (its `conv` is the depthwise conv)
    in_proj: nn.Module              # D -> 3D: B, C, x
    out: nn.Module                  # out_proj
    kernel: int                     # conv kernel K (zero history of K − 1 tokens)


@dataclass
class Tail:
    """What follows the MLP residual (gemma4): out = s · (h2 + N(proj(gelu(gate(h2)) ⊙
    e))) with e the block's constant per-layer input; without `gate`, out = s · h2.
    s, a frozen [1] array of the block, is read from `module` when the block runs."""
    module: nn.Module
    scalar: str                     # attribute of `module` holding s
    gate: Optional[nn.Module] = None    # D -> P
    proj: Optional[nn.Module] = None    # P -> D
    norm: Optional[Norm] = None

    def s(self):
        return getattr(self.module, self.scalar)


@dataclass(frozen=True)
class BlockIO:
    """How a model calls its block, where that is not block(x, mask) -> out."""
    call: Callable                  # (module, x, mask, side, kv) -> (out, (K, V) or None)
    mask_of: Callable               # (args, kwargs) of a call the model makes -> the mask
    stand_in: Callable              # x -> what a call returns (verify's probe in its place)


PLAIN_IO = BlockIO(lambda m, x, mask, side, kv: (m(x, mask), None),
                   lambda args, kw: args[0] if args else kw.get("mask"), lambda x: x)


@dataclass
class BlockSpec:
    module: nn.Module               # the mlx-lm block itself (mebp runs it)
    gate_up: Proj                   # (gate, up) or Fused
    down: nn.Module
    qkv: Optional[Proj] = None      # attention: (q, k, v) or Fused; (q,) when kv_from
    o: Optional[nn.Module] = None   # attention: o_proj
    H: int = 0                      # query heads
    K: int = 0                      # kv heads
    hd: int = 0                     # head dim
    scale: float = 1.0              # attention logit scale
    delta: Optional[DeltaSpec] = None   # the gated DeltaNet mixer (instead of attention)
    conv: Optional[ConvSpec] = None  # the short-conv mixer (instead of attention)
    attn_in: Optional[Norm] = None
    attn_out: Optional[Norm] = None
    mlp_in: Optional[Norm] = None
    mlp_out: Optional[Norm] = None
    q_norm: Optional[Norm] = None
    k_norm: Optional[Norm] = None
    v_norm: Optional[Norm] = None   # per-head norm of v (gemma4: no weight)
    qk_norm_full: bool = False      # q/k norm over the full projection width (olmo2)
    q_gate: bool = False            # q_proj emits (query, gate) per head; o ⊙ σ(gate)
    rope: Optional[Rope] = None     # None: no positional rotation (smollm3 NoPE layers)
    softcap: Optional[float] = None  # attention logits c·tanh(s/c) (gemma2)
    window: Optional[int] = None    # sliding window W: keys i − W < j ≤ i
    act: str = "silu"               # GLU activation: silu | gelu_tanh | gelu
    residual: float = 1.0           # α on both sub-layer outputs (granite)
    mask_array: bool = False        # mlx-lm hands this block a bool-array mask (gemma2)
    kv_from: Optional[int] = None   # attends over the K, V of this earlier block (gemma4)
    tail: Optional[Tail] = None     # per-layer input and scalar after the MLP (gemma4)
    io: BlockIO = PLAIN_IO          # how the model calls the block (mebp, verify)

    @property
    def mixer(self) -> str:
        """The token mixer: "attention", "gated_delta" or "short_conv"."""
        return ("gated_delta" if self.delta is not None else
                "short_conv" if self.conv is not None else "attention")

    def run(self, x, mask, side=None, kv=None):
        """(out, its (K, V) or None): the mlx-lm block itself on x with the mask its
        model hands it, its per-layer input and the K, V it shares (mebp, verify)."""
        return self.io.call(self.module, x, mask, side, kv)


@dataclass
class ModelSpec:
    family: str
    inner: nn.Module                # the module holding embed_tokens / layers / norm
    embed: nn.Module
    blocks: list                    # [BlockSpec]
    norm: Norm                      # final norm
    head: FrozenWeight              # (V, D): tied embedding or LM head
    head_module: object             # callable hn -> raw logits (autodiff heads)
    paths: dict                     # id(module) -> dotted path in the model
    first: int                      # lowest block holding a LoRA layer
    embed_scale: Optional[float] = None   # multiplies the embedding (exactly as the model)
    logit_scale: Optional[float] = None   # logits are divided by this (granite)
    final_softcap: Optional[float] = None  # z' = c·tanh(z/c) (gemma2)
    max_tokens: Optional[tuple] = None    # (T, why): exact only up to T tokens a row
    side_inputs: Optional[Callable] = None  # (ids, h0) -> [constant input per block or
                                            # None] (gemma4's per-layer inputs)
    extra: dict = field(default_factory=dict)

    def embed_ids(self, ids):
        h = self.embed(ids)
        return h if self.embed_scale is None else h * self.embed_scale

    def logits(self, hn):
        """Full logits of the normed hidden state (autodiff/mebp heads, MeZO checks)."""
        z = self.head_module(hn)
        if self.logit_scale is not None:
            z = z / self.logit_scale
        if self.final_softcap is not None:
            z = mx.tanh(z / self.final_softcap) * self.final_softcap
        return z
