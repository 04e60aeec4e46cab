"""LoRA layers with mlx-lm's parameter names, and `apply_lora`.

`LoRALinear` keeps mlx-lm's layout (`linear` = the shared frozen base,
`lora_a` (d_in, r), `lora_b` (r, d_out), `scale`), so adapter files are
interchangeable with `mlx_lm.tuner.lora.LoRALinear`. Its call goes through
`ops.lora_linear_fn`, so plain MLX autodiff uses our hand backward too.

Dropout: the mask is drawn from `_drop_key`, a per-layer PRNG key that the
engine sets once per step (`set_dropout_keys`). Any recompute of the layer
within the step therefore sees the same mask (mlx-lm redraws it, giving wrong
gradients under checkpointing).
"""

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import mlx.core as mx
import mlx.nn as nn

from ..ops.frozen import FrozenWeight
from ..ops.lora_linear import lora_linear_fn

# Qwen/Llama-style names of the 7 projections (benchmarks name them for mlx-lm)
ALL_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class LoRALinear(nn.Module):
    def __init__(self, linear: nn.Module, r: int = 8, scale: float = 20.0,
                 dropout: float = 0.0):
        super().__init__()
        d_out, d_in = FrozenWeight.of(linear).shape
        self.linear = linear                        # shared, never copied
        self.scale = scale
        self.dropout = dropout
        self.lora_a = mx.random.uniform(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in),
                                        (d_in, r))
        self.lora_b = mx.zeros((r, d_out))
        self._drop_key = None
        self._drop_rows = None          # RowWindow: this shard's rows of the batch's mask

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]

    def drop_multiplier(self, x: mx.array, at=None) -> Optional[mx.array]:
        """m = mask / (1 - p) for this step, or None (no dropout / eval mode).
        at = (t0, T): x holds token rows t0… of a [B, T, d_in] input, so m is those
        rows of the full input's mask (drawn whole: T·d_in bytes for a moment)."""
        if not self.training or self.dropout <= 0:
            return None
        keep = 1.0 - self.dropout
        key = self._drop_key if self._drop_key is not None else mx.random.key(0)
        B, lo = (x.shape[0], 0) if self._drop_rows is None else \
            (self._drop_rows.batch, self._drop_rows.lo)   # data parallel: global rows
        T, t0 = (x.shape[1], 0) if at is None else (at[1], at[0])   # token chunk
        mask = mx.random.bernoulli(keep, (B, T, *x.shape[2:]), key=key)
        if (B, T) != tuple(x.shape[:2]):
            mask = mask[lo:lo + x.shape[0], t0:t0 + x.shape[1]]
        return mask.astype(x.dtype) / keep

    def __call__(self, x):
        return lora_linear_fn(x, self.lora_a, self.lora_b, FrozenWeight.of(self.linear),
                              self.scale, self.linear.get("bias"), self.drop_multiplier(x))

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """Merged linear W0 + s (A B)ᵀ, like mlx-lm's `LoRALinear.fuse`."""
        from mlx_lm.tuner.lora import LoRALinear as MLXLoRALinear

        ref = MLXLoRALinear.from_base(self.linear, r=self.rank, scale=self.scale)
        ref.lora_a, ref.lora_b = self.lora_a, self.lora_b
        return ref.fuse(dequantize=dequantize)


def lora_layers(model: nn.Module):
    """[(path, LoRALinear)] in module order."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]


def set_dropout_keys(model: nn.Module, key: Optional[mx.array]):
    """Give every LoRA layer its own key for this step (None: clear)."""
    layers = lora_layers(model)
    keys = mx.random.split(key, max(len(layers), 2)) if key is not None else None
    for i, (_, m) in enumerate(layers):
        m._drop_key = None if keys is None else keys[i]


@dataclass(frozen=True)
class RowWindow:
    """Inputs are rows lo.. of a `batch`-row batch (a data-parallel shard)."""
    batch: int
    lo: int


def set_dropout_rows(model: nn.Module, rows: Optional[RowWindow]):
    """Each layer keeps `rows` of the whole batch's dropout mask, so a shard
    drops exactly what one process would (None: masks of the input's shape).
    Not a tuple: nn.Module would file a tuple among its parameters."""
    for _, m in lora_layers(model):
        m._drop_rows = rows


def block_linears(block: nn.Module) -> list:
    """Paths of the frozen linear layers inside a block, in module order
    (mlx-lm's default LoRA targets since 0.28: every linear of the block)."""
    return [p for p, m in block.named_modules()
            if isinstance(m, (nn.Linear, nn.QuantizedLinear))][::-1]


def apply_lora(model: nn.Module, rank: int = 8, scale: float = 20.0,
               dropout: float = 0.0, keys: Optional[Iterable[str]] = None,
               num_layers: Optional[int] = None, dtype=None) -> nn.Module:
    """Replace the linear layers named by `keys` in the last `num_layers` blocks
    by LoRA layers (in place), freeze everything else, return the model.

    keys: block-relative paths like "self_attn.q_proj" or short names "q_proj"
          (None: every linear layer of each block, as mlx-lm; phi3: qkv_proj, ...).
    num_layers: None = every block (unlike mlx-lm, 0 means none).
    dtype: of lora_a/lora_b (an mx.Dtype or its name, e.g. "bfloat16" as in the MeSP
           paper); None: float32, as mlx-lm.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    blocks = getattr(model, "layers", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `layers`: not an mlx-lm "
                         "decoder model")
    n = len(blocks) if num_layers is None else int(num_layers)
    if not 0 <= n <= len(blocks):
        raise ValueError(f"num_layers={num_layers} but the model has {len(blocks)} blocks")
    model.freeze()
    targets = blocks[len(blocks) - n:]
    per_block = _resolve_keys(keys, [block_linears(b) for b in targets])
    for block, paths in zip(targets, per_block):
        for path in paths:
            parent, name = _parent(block, path)
            lora = LoRALinear(getattr(parent, name), rank, scale, dropout)
            if dtype is not None:
                lora.lora_a = lora.lora_a.astype(_dtype(dtype))
                lora.lora_b = lora.lora_b.astype(_dtype(dtype))
            setattr(parent, name, lora)
    return model


def _dtype(d):
    if isinstance(d, str):
        if not isinstance(getattr(mx, d, None), mx.Dtype):
            raise ValueError(f"unknown LoRA dtype {d!r}; e.g. bfloat16, float32")
        return getattr(mx, d)
    return d


def _resolve_keys(keys, available):
    """Per block (available: each block's linear paths), the paths `keys` names.
    A key may be missing from some blocks (hybrid models: a DeltaNet layer has no
    q_proj), as in mlx-lm, but must name a linear of at least one block."""
    if keys is None:
        return available
    out = [[] for _ in available]
    for k in keys:
        hit = False
        for paths, have in zip(out, available):
            full = [a for a in have if a == k or a.endswith("." + k)]
            paths += [a for a in full if a not in paths]
            hit = hit or bool(full)
        if not hit and available:
            names = list(dict.fromkeys(a for have in available for a in have))
            raise ValueError(f"unknown LoRA key {k!r}; this model's blocks have "
                             f"{', '.join(names)}")
    return out


def _parent(root: nn.Module, path: str):
    *head, name = path.split(".")
    for p in head:
        root = getattr(root, p)
    return root, name


def step_dropout(model):
    """Draw one key for this step's dropout masks (from MLX's global RNG)."""
    if any(m.dropout > 0 and m.training for _, m in lora_layers(model)):
        seed = mx.random.randint(0, 2**31 - 1, ()).item()
        set_dropout_keys(model, mx.random.key(seed))
    else:
        set_dropout_keys(model, None)
