"""Cross-block inputs of one step: what a block reads besides its input x.

Two kinds, both data in the spec (spec.py), so the driver knows no family:
  side inputs  e_i, a constant input of block i (gemma4's per-layer inputs), computed
               once per step from the token ids and h0 (ModelSpec.side_inputs); nothing
               flows back through them (LoRA layers inside the block that read e still
               get their gradients from the block's own backward);
  shared K, V  block j with kv_from = i attends over block i's K, V (after its norms
               and RoPE). Forward: block i hands its K, V out; they are kept until block
               i's backward. Backward, blocks in reverse (every reader j > i runs before
               i): block j hands dK, dV out, summed per source; block i adds the sum to
               the dK, dV of its own attention before its k/v backward.
Stored: e of every block ([B, T, P] each, freed with the step); each source's K, V from
its forward to its backward (kept, not recomputed: K·hd values per token and source,
where each block's checkpoint is D per token); Σ dK, dV of a source from the backward
of its last reader to its own.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx


class StepLinks:
    """The cross-block state of one step (forward and backward) of a ModelSpec."""

    def __init__(self, spec, ids=None, h0=None):
        self.sources = {b.kv_from for b in spec.blocks if b.kv_from is not None}
        self.side = None
        if spec.side_inputs is not None:
            self.side = spec.side_inputs(ids, h0)
            mx.eval([e for e in self.side if e is not None])
        self.kv, self.dkv = {}, {}

    @property
    def empty(self) -> bool:
        return not self.sources and self.side is None

    def _side(self, i):
        return None if self.side is None else self.side[i]

    def forward(self, i, b) -> Optional["BlockLinks"]:
        """Block i's links for its forward (None: it has none)."""
        if self.empty:
            return None
        kv = None if b.kv_from is None else self.kv[b.kv_from]
        return BlockLinks(self, i, b.kv_from, self._side(i), kv, i in self.sources)

    def backward(self, i, b) -> Optional["BlockLinks"]:
        """Block i's links for its backward: the K, V it reads, and (a source) the
        summed dK, dV of its readers; its own K, V are dropped (it recomputes them)."""
        if self.empty:
            return None
        self.kv.pop(i, None)
        kv = None if b.kv_from is None else self.kv[b.kv_from]
        return BlockLinks(self, i, b.kv_from, self._side(i), kv, i in self.sources,
                          self.dkv.pop(i, None))


@dataclass
class BlockLinks:
    """One block's cross-block inputs and outputs (block.py reads and fills them)."""
    step: StepLinks
    i: int
    kv_from: Optional[int]
    side: Optional[mx.array] = None      # e [B, T, P], or None
    kv: Optional[tuple] = None           # (K, V) of block kv_from, head layout
    export: bool = False                 # later blocks read this block's K, V
    dkv: Optional[tuple] = None          # backward: Σ dK, dV of those readers

    def put_kv(self, k, v):
        """Forward of a source: its K, V for the blocks that read them."""
        self.step.kv[self.i] = (k, v)

    def add_dkv(self, dk, dv):
        """Backward of a reader: dK, dV onto those of its source."""
        old = self.step.dkv.get(self.kv_from)
        self.step.dkv[self.kv_from] = (dk, dv) if old is None else (old[0] + dk,
                                                                    old[1] + dv)
        mx.eval(*self.step.dkv[self.kv_from])
