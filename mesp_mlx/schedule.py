"""Per-block schedules for exact LoRA gradients: MeBP and MeSP.

Both run the same explicit schedule (REFERENCE §3: tight lifetimes in MLX need
evaluation barriers outside transforms, not a layer inside one lazy graph):
  1. forward: run the blocks, evaluating and keeping only each block's input
     (the checkpoints, L × B × T × D × itemsize bytes);
  2. loss head on the final hidden state → loss and dL/dh;
  3. for each block in reverse: recompute it from its checkpoint, backprop the
     incoming gradient, evaluate, drop the checkpoint and the block's tensors.
"mebp": step 3 is mx.vjp of the mlx-lm block itself (autodiff, with the mask the
        model would build), the head is autodiff on full logits.
"mesp": step 3 is the generic hand-derived backward (block.py) of the block's
        spec, the head is chunked (ops/loss_head.py).
The driver knows no model family: families.py reads a ModelSpec, verify.py
checks it against the model's own forward once.
Packed rows ("mesp" only): `segments` [B, T] gives each position's example; the
positions within examples are derived once here (packing.Packing) and every
block runs RoPE and attention per example.
Streamed weights (stream.py): each block runs inside `weights.block(b)` (its
frozen arrays read, then released), and the spec's head/embedding read the file
by tiles and rows; resident: no-ops.
"""

import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from .block import (block_backward, block_forward, block_width, extra_bytes, kept_bytes,
                    layer_mask, probs_bytes, spans)
from .checkpoints import open_checkpoints
from .families import read_spec
from .ops.loss_head import loss_head_value_and_grad
from .ops.dequant_matmul import tile_barriers
from .ops.rmsnorm import rmsnorm_backward
from .packing import Packing
from .stream import weight_source
from .verify import verify_spec


@dataclass
class EngineOptions:
    """Knobs of the schedule (defaults chosen by bench/memory_bench.py)."""

    head_chunk_bytes: int = 8 << 20   # fp32 logits per loss-head tile [rows, vocab slice]
    head_rows: int = 512              # token rows per loss-head tile
    attn_chunk_bytes: int = 8 << 20   # attention probs per query block (rows = this / 4HT)
    token_chunk_bytes: int = 4 << 20  # widest per-chunk tensor of a block (rows = this / 4BF)
    clear_cache: str = "auto"         # allocator cache: "none", "step", "block" (mx.clear_cache)
                                      # or "auto": "step", "none" with an activation budget
    fused_attention: Optional[bool] = None  # None: fused SDPA where it is memory-efficient
    verify: bool = True               # check the spec against the model once (verify.py)
    activation_budget: int = 0        # extra bytes for blocks that skip their recompute (mesp)
    checkpoints: str = "memory"       # block inputs kept in "memory" or on "disk" (a temp file)
    checkpoint_dir: Optional[str] = None  # directory of the "disk" file (None: the temp dir)
    keep_probs: bool = False          # recompute keeps P for the backward (set by the plan)


def cache_policy(opt: EngineOptions) -> str:
    """When the allocator cache is cleared. "auto": after each step (the smallest
    footprint between steps), but never with an activation budget: the cache then
    holds at most the planned peak, and the next step reuses its buffers instead of
    faulting in fresh pages (Qwen2.5-3B T 256, 1.65 GB kept: 16.2 s/step against
    19.5 s when cleared per step, same peak: bench/cache_policy.py)."""
    if opt.clear_cache == "auto":
        return "none" if opt.activation_budget > 0 else "step"
    return opt.clear_cache


def head_tiles(opt: EngineOptions, N: int, V: int):
    """(rows, vocab slice) of a loss-head tile: about opt.head_chunk_bytes of fp32."""
    rows = max(1, min(N, opt.head_rows))
    return rows, max(1, min(V, opt.head_chunk_bytes // (4 * rows)))


WIDE_ROW_BYTES = 12   # × 4·B·F: peak allowed per extra token-chunk row (chunk_plan)


def activation_plan(spec, budget: int, B: int, T: int, itemsize: int):
    """[(block, bytes)]: the blocks whose forward keeps what their backward reads
    (block.Kept), head side first (their backward runs first), while the total
    fits `budget`. Every kept block skips its recompute; all of them are alive
    together at the loss head, so the peak grows by at most the total."""
    out, used = [], 0
    for i in range(len(spec.blocks) - 1, spec.first - 1, -1):
        n = kept_bytes(spec.blocks[i], B, T, itemsize)
        if used + n > budget:
            break
        out.append((i, n))
        used += n
    return out


def _widest(T: int, rows: int) -> int:
    return max(t1 - t0 for t0, t1 in spans(T, rows))


def chunk_plan(spec, opt: EngineOptions, B: int, T: int, spare: int):
    """(rows, token_chunk_bytes, bytes spent): the fewest token chunks that `spare`
    buys, each of about T / n rows, up to one chunk of all T; None if it buys no
    fewer chunks (rows that leave the count as it is would buy nothing).
    Fewer chunks mean fewer passes over every block's weights, in the forward, the
    recompute and the backward: Qwen2.5-3B T 256 with every block kept, 95 → 256 rows
    went from 1.29× to 1.13× autodiff for +49.7 MB of peak (7.4 · 4·F per row; rows at
    64da905 in bench/pareto_2026-12-04_89c2f92.jsonl against those in
    bench/pareto_before_wide_chunks.jsonl; WIDE_ROW_BYTES is the bound the peak tests
    hold on a small model)."""
    F = max(block_width(b) for b in spec.blocks)
    rows = max(1, opt.token_chunk_bytes // (4 * B * F))
    n0, widest0 = len(spans(T, rows)), _widest(T, rows)
    row = WIDE_ROW_BYTES * 4 * B * F
    for n in range(1, n0):
        r = -(-T // n)
        cost = max(0, _widest(T, r) - widest0) * row
        if len(spans(T, r)) < n0 and cost <= spare:
            return r, 4 * B * F * r, cost
    return None


def describe_plan(plan, n_blocks: int, chunk_rows: Optional[int] = None) -> str:
    """One line: which blocks skip their recompute and what they keep (and the
    token-chunk rows the rest of the budget bought, if any); plan as `planned`'s."""
    wide = "" if chunk_rows is None else f"; token chunks widened to {chunk_rows} rows"
    if not plan:
        return f"activation plan: minimal (every one of {n_blocks} blocks recomputed){wide}"
    idx = sorted(i for i, *_ in plan)
    span = f"{idx[0]}" if len(idx) == 1 else f"{idx[0]}-{idx[-1]}"
    n_extra = sum(1 for *_, e in plan if e)
    extra = f"; {n_extra} of them also keep P and σ(gate)" if n_extra else ""
    return (f"activation plan: {len(idx)} of {n_blocks} blocks ({span}) keep their "
            f"forward tensors ({sum(n for _, n, _ in plan) / 1e6:.1f} MB) and skip "
            f"their recompute{extra}{wide}")


def planned(spec, opt: EngineOptions, B: int, T: int, itemsize: int):
    """(plan, the options the blocks run with, the widened chunk rows or None).
    plan: [(block, bytes, extras)]. The budget buys, in this order:
      1. fewer, wider token chunks (chunk_plan): they speed up every block, a kept
         block only itself. Qwen2.5-3B T 256: 3 chunks → 1, ≤ 85 MB, saved 109 ms in
         each of 36 blocks (forward 284 → 238, recompute and backward 522 → 459 ms:
         bench/block_profile.py), where a kept block costs 29 MB and saves one
         block's recompute (459 → 282 ms at one chunk);
      2. blocks that keep their forward tensors, head side first (activation_plan);
      3. P of a recomputed block's attention for its backward (one block's P,
         B·H·T² fp32, where that attention is one query block: block.keeps_probs);
      4. extras for kept blocks, head side first (block.extra_bytes: P and σ(gate), so
         their backward runs no exp; Qwen2.5-3B T 256, one block, one chunk: 282 ms
         without them, 222 ms with, autodiff's ~252: bench/block_profile.py)."""
    spare = opt.activation_budget
    wide = chunk_plan(spec, opt, B, T, spare)
    if wide is not None:
        opt, spare = replace(opt, token_chunk_bytes=wide[1]), spare - wide[2]
    plan = activation_plan(spec, spare, B, T, itemsize)
    spare -= sum(n for _, n in plan)
    pb = max(probs_bytes(b, opt, B, T) for b in spec.blocks)
    if 0 < pb <= spare and len(plan) < len(spec.blocks) - spec.first:
        opt, spare = replace(opt, keep_probs=True), spare - pb
    out = []
    for i, n in plan:
        e = extra_bytes(spec.blocks[i], opt, B, T, itemsize)
        take = 0 < e <= spare
        spare -= e if take else 0
        out.append((i, n + (e if take else 0), take))
    return out, opt, None if wide is None else wide[0]


def model_spec(model, method: str, T: int, opt: Optional[EngineOptions] = None):
    """The model's ModelSpec, checked against the model's own forward (once); with
    streamed weights, its head and embedding read the weights file."""
    opt = opt or EngineOptions()
    spec = read_spec(model)
    weights = weight_source(model)
    if opt.verify:
        verify_spec(model, spec, method, T, opt, weights)
    return weights.spec(spec)


def run(model, inputs, targets, mask, method, options: Optional[EngineOptions] = None,
        stats: Optional[dict] = None, segments=None):
    """Loss and LoRA gradients (tree of model.trainable_parameters()); segments
    [B, T]: packed examples (method "mesp")."""
    if segments is not None and method != "mesp":
        raise ValueError(f"packed rows (segments) need method 'mesp', got {method!r}")
    packing = None if segments is None else Packing.of(segments)
    opt = options or EngineOptions()
    B, T = inputs.shape
    spec = model_spec(model, method, T, opt)
    clock = _Clock(stats)

    h = spec.embed_ids(inputs)
    mx.eval(h)
    store = open_checkpoints(opt.checkpoints, opt.checkpoint_dir,
                             (len(spec.blocks) - spec.first) * h.nbytes)
    hs = [h]                              # handed over, so _run can free h
    del h
    try:
        # mesp runs outside any transform: evaluate per W0 tile (mebp runs under
        # mx.vjp / value_and_grad, where barriers would keep everything: 5.8 GB)
        with tile_barriers() if method == "mesp" else nullcontext():
            return _run(model, spec, store, hs, targets, mask, method, opt, stats, clock,
                        packing, weight_source(model))
    finally:
        store.close()                     # a disk file goes on success, error and Ctrl-C


def _run(model, spec, store, hs, targets, mask, method, opt, stats, clock, packing,
         weights):
    h = hs.pop()
    T = h.shape[1]
    # 1. forward, keeping block inputs from the lowest LoRA block up (and, for the
    #    blocks the activation plan names, what their backward reads)
    plan, wide = {}, None
    if method == "mesp":
        plan, opt, wide = planned(spec, opt, h.shape[0], T, h.dtype.size)
        plan = {i: (n, e) for i, n, e in plan}
    n_ckpt, kept = 0, {}
    for i, b in enumerate(spec.blocks):
        if i >= spec.first:
            store.put(i, h)
            n_ckpt += 1
        with weights.block(b):
            if i in plan:
                h, kept[i] = block_forward(b, h, opt, keep=True, packing=packing,
                                           extras=plan[i][1])
            elif method == "mesp":
                h = block_forward(b, h, opt, packing=packing)
            else:
                h = b.module(h, layer_mask(b, T))
            mx.eval(h)
    if stats is not None:
        stats["checkpoint_bytes"] = n_ckpt * h.nbytes
        stats["n_checkpoints"] = n_ckpt
        stats["checkpoints"] = store.kind
        stats["kept_blocks"] = sorted(plan)
        stats["kept_bytes"] = sum(n for n, _ in plan.values())
        stats["kept_extras"] = sorted(i for i, (_, e) in plan.items() if e)
        stats["token_chunk_rows"] = wide          # None: the minimal schedule's chunks
        stats["keep_probs"] = opt.keep_probs
    clock.lap("forward_s")

    # 2. loss head
    if method == "mesp":
        loss, dh = _chunked_head(spec, h, targets, mask, opt)
    else:
        def head(h):
            logits = spec.logits(spec.norm(h)).astype(mx.float32)
            ce = nn.losses.cross_entropy(logits, targets) * mask
            return ce.sum() / mx.maximum(mask.sum(), 1.0)

        loss, dh = mx.value_and_grad(head)(h)
    del h
    mx.eval(loss, dh)
    clock.lap("head_s")

    # 3. backward, block by block in reverse
    flat = {}
    for i in range(len(spec.blocks) - 1, spec.first - 1, -1):
        x, b = store.pop(i), spec.blocks[i]
        with weights.block(b):
            if method == "mesp":
                dh = block_backward(spec.paths, b, x, dh, flat, opt,
                                    need_dx=i > spec.first, kept=kept.pop(i, None),
                                    packing=packing)
            else:
                dh = _mebp_block(spec.paths, b, x, dh, flat, layer_mask(b, T))
            del x
            mx.eval(dh, *flat.values())
        if cache_policy(opt) == "block":
            mx.clear_cache()
    if cache_policy(opt) in ("block", "step"):
        mx.clear_cache()
    clock.lap("backward_s")
    if stats is not None:
        stats["grad_bytes"] = sum(g.nbytes for g in flat.values())
    grads = tree_map_with_path(lambda p, _: flat[p], model.trainable_parameters())
    return loss, grads


def _chunked_head(spec, h, targets, mask, opt):
    """Final norm + tiled head/loss, one row tile at a time (never the [N, V] logits,
    nor more than a tile of normed rows); (loss, dL/dh)."""
    B, T, D = h.shape
    N, V = B * T, spec.head.shape[0]
    rows, vocab = head_tiles(opt, N, V)
    hf, y, m = h.reshape(N, D), targets.reshape(-1), mask.reshape(-1).astype(mx.float32)
    denom = mx.maximum(m.sum(), 1.0)
    loss, dh = mx.array(0.0, mx.float32), None
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        hc = hf[n0:n1]
        lc, dhn = loss_head_value_and_grad(spec.norm(hc), spec.head, y[n0:n1], m[n0:n1],
                                           rows, vocab, softcap=spec.final_softcap,
                                           logit_scale=spec.logit_scale, denom=denom)
        dhc = rmsnorm_backward(dhn, hc, spec.norm.w, spec.norm.eps)
        loss = loss + lc
        if n1 - n0 == N:
            dh = dhc
        else:
            dh = mx.zeros(hf.shape, hf.dtype) if dh is None else dh
            dh[n0:n1] = dhc
        del dhn, dhc
        mx.eval(loss, dh)
    return loss, dh.reshape(h.shape)


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


def _mebp_block(paths, b, x, g, flat, mask):
    """Recompute the mlx-lm block under mx.vjp; autodiff gives dx and the LoRA grads."""
    blk = b.module
    names, params = zip(*tree_flatten(blk.trainable_parameters()))

    def f(x, *ps):
        blk.update(tree_unflatten(list(zip(names, ps))))
        return blk(x, mask)

    _, vjps = mx.vjp(f, [x, *params], [g])
    blk.update(tree_unflatten(list(zip(names, params))))
    prefix = paths[id(blk)]
    for n, d in zip(names, vjps[1:]):
        flat[f"{prefix}.{n}"] = d
    return vjps[0]
