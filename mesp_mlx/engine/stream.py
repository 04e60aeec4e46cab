"""Frozen weights streamed from the model's safetensors, block by block.

    model, tok = mlx_lm.load(model_dir, lazy=True)     # nothing read yet
    stream_weights(model, model_dir)                    # or load_model(..., stream_weights=True)
    apply_lora(model); value_and_grad(model, ...)       # mesp, mebp or mezo

What stays resident: norm weights, 0-d scalars, LoRA parameters, optimizer state (and
anything outside the blocks that is not the embedding or head). Every other array of a block
(W0, its quantization scales/biases, linear biases) is replaced in its module by a
placeholder of the same shape and dtype holding one element (a stride-0 view, 4
bytes), and read back from the file by `block(b)`, a context the schedule puts
around each block's forward and around its recompute + backward; on exit the
placeholders return and the block's weights are freed by the next evaluation.
The embedding/head table (V, D) is never read whole: `StreamedTable` gives the
loss head FrozenWeight's interface, reading one vocabulary tile per `rows(v0, v1)`,
and the embedding lookup reads only the batch's distinct token rows.
The model's own forward (mlx-lm's __call__) would see the placeholders, so a
streamed model runs only through the per-block engine (mesp, mebp, mezo, evaluation
via forward.py); `method="autodiff"` refuses it.
"""

from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .families import head_module, language_model
from ..ops.frozen import FrozenWeight
from .safetensors_io import WeightFiles, WeightsFileError

_ATTR = "_mesp_stream"


def _placeholder(a: mx.array) -> mx.array:
    """Same shape and dtype as `a`, one element of memory (a broadcast view)."""
    p = mx.broadcast_to(mx.zeros((1,) * a.ndim, a.dtype), a.shape)
    mx.eval(p)
    return p


def _is_norm(module) -> bool:
    return "Norm" in type(module).__name__


class StreamedTable:
    """A (V, D) frozen table (tied embedding or LM head), dense or quantized, read from
    the weights file by rows. Has the FrozenWeight interface the loss head uses
    (shape, quantized, rows, take) plus the lookup and full logits."""

    def __init__(self, files: WeightFiles, keys: dict, shape, group_size=64, bits=4,
                 mode="affine"):
        self.files, self.keys, self._shape = files, keys, tuple(shape)
        self.group_size, self.bits, self.mode = group_size, bits, mode

    @property
    def shape(self):
        return self._shape

    @property
    def quantized(self) -> bool:
        return "scales" in self.keys

    def _frozen(self, read) -> FrozenWeight:
        a = {k: read(self.files.file(key), key) for k, key in self.keys.items()}
        return FrozenWeight(a["weight"], a.get("scales"), a.get("biases"),
                            self.group_size, self.bits, self.mode)

    def rows(self, v0: int, v1: int) -> FrozenWeight:
        """Vocabulary rows [v0, v1) read from the file now (one head tile)."""
        return self._frozen(lambda f, k: f.read(k, v0, v1))

    def take(self, ids: mx.array) -> mx.array:
        """Dense rows table[ids] (..., D): only the distinct ids are read."""
        flat = np.array(ids).reshape(-1)
        uniq, inv = np.unique(flat, return_inverse=True)
        part = self._frozen(lambda f, k: f.read_rows(k, uniq))
        return part.take(mx.array(inv.reshape(ids.shape).astype(np.int32)))

    def __call__(self, hn: mx.array) -> mx.array:
        """Full logits Z = hn tableᵀ (mebp's autodiff head), tile by tile; its VJP
        dhn = Σ_tiles dZ[:, tile] table[tile] reads the tiles again, so autodiff never
        keeps the table (without this, autodiff would hold every dequantized tile)."""
        V, D = self._shape
        n = max(1, (8 << 20) // (D * 4))
        tiles = [(v, min(V, v + n)) for v in range(0, V, n)]

        @mx.custom_function
        def logits(hn):
            return mx.concatenate([self.rows(a, b).xWt(hn) for a, b in tiles], axis=-1)

        @logits.vjp
        def logits_vjp(primals, dz, _):
            dh = None
            for a, b in tiles:
                part = self.rows(a, b).gW(dz[..., a:b].astype(primals[0].dtype))
                dh = part if dh is None else dh + part
            return dh

        return logits(hn)


class StreamedWeights:
    """Where a streamed model's frozen weights live: the files, and per block the
    (module, attribute, file key, placeholder) of each streamed array."""

    def __init__(self, model, model_dir):
        self.files = WeightFiles(model_dir)
        self.dir = str(model_dir)
        lm = language_model(model)
        inner = lm.model
        paths = {id(m): p for p, m in model.named_modules()}
        self._blocks = {id(b): self._take_block(b, paths[id(b)]) for b in inner.layers}
        embed = inner.embed_tokens
        head = head_module(lm, inner)
        self._tables = {}
        self.embed = self._take_table(embed, paths[id(embed)])
        self.head = self._take_table(head, paths[id(head)])
        mx.eval(model.parameters())                     # what stays: norms, LoRA, ...

    # -------------------------------------------------------------- setup
    def _key(self, path: str) -> str:
        """The file's name for a parameter path (a LoRA layer's `.linear.` dropped)."""
        for k in (path, path.replace(".linear.", ".")):
            if k in self.files:
                return k
        raise WeightsFileError(
            f"--stream-weights: tensor {path} is not in the weights files of {self.dir} "
            "(streaming reads the model's own safetensors, saved by mlx-lm or "
            "mesp_mlx with the model's parameter names)")

    def _swap_out(self, module, attr: str, path: str):
        a = module[attr]
        key = self._key(path)
        f = self.files.file(key)
        dt = f.entries[key][0]
        if f.shape(key) != tuple(a.shape) or dt != _SAFE_DTYPE.get(a.dtype):
            raise WeightsFileError(
                f"--stream-weights: {key} in {f.path} is {dt} {f.shape(key)} but the "
                f"model has {a.dtype} {tuple(a.shape)}: the files are not this model's")
        ph = _placeholder(a)
        setattr(module, attr, ph)
        return module, attr, key, ph

    def _take_block(self, blk, prefix: str) -> list:
        mods = dict(blk.named_modules())
        out = []
        for rel, _ in tree_flatten(blk.parameters()):
            mpath, _, attr = rel.rpartition(".")
            m = mods[mpath]
            if _is_norm(m) or attr in ("lora_a", "lora_b") or m[attr].ndim == 0:
                continue                               # scalars (xIELU's) stay too
            out.append(self._swap_out(m, attr, f"{prefix}.{rel}"))
        return out

    def _take_table(self, module, prefix: str) -> StreamedTable:
        if id(module) in self._tables:                 # tied: one table for both
            return self._tables[id(module)]
        names = [k for k in ("weight", "scales", "biases") if k in module]
        shape = FrozenWeight.of(module).shape
        swapped = {k: self._swap_out(module, k, f"{prefix}.{k}") for k in names}
        t = StreamedTable(self.files, {k: e[2] for k, e in swapped.items()}, shape,
                          getattr(module, "group_size", 64), getattr(module, "bits", 4),
                          getattr(module, "mode", "affine"))
        t.module, t.placeholders = module, {k: e[3] for k, e in swapped.items()}
        self._tables[id(module)] = t
        return t

    # -------------------------------------------------------------- the hooks
    @contextmanager
    def block(self, b):
        """The block's frozen arrays in its modules for the duration (b: BlockSpec or
        block module); placeholders again on exit."""
        entries = self._blocks.get(id(getattr(b, "module", b)), ())
        for m, attr, key, _ in entries:
            setattr(m, attr, self.files.file(key).read(key))
        try:
            yield
        finally:
            for m, attr, _, ph in entries:
                setattr(m, attr, ph)

    def spec(self, spec):
        """The ModelSpec with the streamed embedding lookup and head table."""
        return replace(spec, embed=self.embed.take, head=self.head, head_module=self.head)

    @contextmanager
    def vocab_prefix(self, n: int):
        """Verification only (verify.py): the embedding/head modules hold their real
        first n rows, so the model's own forward runs over an n-entry vocabulary."""
        tables = list(self._tables.values())
        for t in tables:
            part = t.rows(0, n)
            for k in t.keys:
                setattr(t.module, k, {"weight": part.w, "scales": part.scales,
                                      "biases": part.biases}[k])
        try:
            yield
        finally:
            for t in tables:
                for k, ph in t.placeholders.items():
                    setattr(t.module, k, ph)

    def streamed_bytes(self) -> int:
        """Bytes of every streamed array in the files (blocks + table(s))."""
        keys = [e[2] for es in self._blocks.values() for e in es]
        keys += [k for t in self._tables.values() for k in t.keys.values()]
        return self.files.total_bytes(keys)

    def head_tile_bytes(self, vocab_rows: int = 4096) -> int:
        """Bytes read for one head tile of `vocab_rows` entries (the estimate's figure:
        EngineOptions' 8 MiB of fp32 logits over 512 token rows is 4096 entries)."""
        t = self.head
        return self.files.total_bytes(t.keys.values()) * min(vocab_rows, t.shape[0]) \
            // t.shape[0]

    def block_bytes(self) -> int:
        """The largest block's streamed bytes (what one block holds while it runs)."""
        return max((self.files.total_bytes([e[2] for e in es])
                    for es in self._blocks.values()), default=0)


_SAFE_DTYPE = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16",
               mx.uint32: "U32", mx.int32: "I32", mx.uint8: "U8", mx.int8: "I8",
               mx.uint16: "U16", mx.int16: "I16", mx.int64: "I64", mx.uint64: "U64",
               mx.float64: "F64", mx.bool_: "BOOL"}


class _Resident:
    """The weight source of an ordinary model: everything is already in memory."""

    def block(self, b):
        return nullcontext()

    def spec(self, spec):
        return spec

    def vocab_prefix(self, n):
        return nullcontext()


RESIDENT = _Resident()


def stream_weights(model, model_dir) -> StreamedWeights:
    """Stream `model`'s frozen block weights and embedding/head from the safetensors
    in `model_dir` (the files it was loaded from, best with mlx_lm.load(lazy=True));
    returns the StreamedWeights, also kept on the model."""
    if is_streamed(model):
        return weight_source(model)
    ws = StreamedWeights(model, Path(model_dir))
    object.__setattr__(model, _ATTR, ws)
    return ws


def weight_source(model):
    """The model's StreamedWeights, or RESIDENT."""
    return getattr(model, _ATTR, None) or RESIDENT


def is_streamed(model) -> bool:
    return isinstance(getattr(model, _ATTR, None), StreamedWeights)


def streamed_weight_bytes(model) -> Optional[int]:
    """Bytes of the frozen weights streamed from disk (None: a resident model)."""
    ws = getattr(model, _ATTR, None)
    return ws.streamed_bytes() if ws is not None else None


def resident_weight_bytes(model) -> int:
    """Bytes of the frozen (non-trainable) parameters MLX holds; placeholders of
    streamed arrays count nothing."""
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    lora = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    ws = getattr(model, _ATTR, None)
    held = 0 if ws is None else sum(e[3].nbytes for es in ws._blocks.values() for e in es) \
        + sum(p.nbytes for t in ws._tables.values() for p in t.placeholders.values())
    return total - lora - held
