"""The activation plan: what one step's spare memory buys, and the schedule's knobs.

`EngineOptions` holds the knobs of the per-block schedule; `planned` spends an
activation budget (bytes above the minimal schedule) on, in order: fewer and wider
token chunks, blocks that keep their forward tensors and skip the recompute, one
block's attention probabilities, and extras for kept blocks. Why that order, with
the measurements behind it: docs/memory-budget.md.
"""

from dataclasses import dataclass, replace
from typing import Optional

from .block import block_width, extra_bytes, kept_bytes, probs_bytes, spans
from .deltanet import CHUNK, PIECE


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
    delta_chunk: int = CHUNK          # gated DeltaNet: tokens per recurrence chunk (a power
                                      # of two; one chunk-start state kept per chunk)
    delta_piece: int = PIECE          # gated DeltaNet: tokens per piece of the recurrence's
                                      # forward/backward (its C×C terms live per piece)
    delta_states: str = "pieces"      # gated DeltaNet recompute keeps the state before each
                                      # piece (the backward reruns a piece's forward for its
                                      # chunk-start states) or every chunk's: "chunks"


def cache_policy(opt: EngineOptions) -> str:
    """When the allocator cache is cleared. "auto": after each step (the smallest
    footprint between steps), but never with an activation budget: the cache then
    holds at most the planned peak, and the next step reuses its buffers instead of
    faulting in fresh pages (Qwen2.5-3B T 256, 1.65 GB kept: 16.2 s/step against
    19.5 s when cleared per step, same peak: bench/probes/cache_policy.py)."""
    if opt.clear_cache == "auto":
        return "none" if opt.activation_budget > 0 else "step"
    return opt.clear_cache


def head_tiles(opt: EngineOptions, N: int, V: int):
    """(rows, vocab slice) of a loss-head tile: about opt.head_chunk_bytes of fp32."""
    rows = max(1, min(N, opt.head_rows))
    return rows, max(1, min(V, opt.head_chunk_bytes // (4 * rows)))


WIDE_ROW_BYTES = 12   # × 4·B·F: peak allowed per extra token-chunk row (chunk_plan)


def activation_plan(spec, budget: int, B: int, T: int, itemsize: int, opt=None):
    """[(block, bytes)]: the blocks whose forward keeps what their backward reads
    (block.Kept), head side first (their backward runs first), while the total
    fits `budget`. Every kept block skips its recompute; all of them are alive
    together at the loss head, so the peak grows by at most the total."""
    out, used = [], 0
    for i in range(len(spec.blocks) - 1, spec.first - 1, -1):
        n = kept_bytes(spec.blocks[i], B, T, itemsize, opt)
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
    went from 1.29× to 1.13× autodiff for +49.7 MB of peak (7.4 · 4·F per row, measured
    with bench/pareto.py; WIDE_ROW_BYTES is the bound the peak tests hold on a small
    model, so it overcounts large ones: LFM2-1.2B at T 256, 128 rows wider, +16.8 MB
    measured against 50.3 MB counted)."""
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
         bench/probes/block_profile.py), where a kept block costs 29 MB and saves one
         block's recompute (459 → 282 ms at one chunk);
      2. blocks that keep their forward tensors, head side first (activation_plan);
      3. P of a recomputed block's attention for its backward (one block's P,
         B·H·T² fp32, where that attention is one query block: block.keeps_probs);
      4. extras for kept blocks, head side first (block.extra_bytes: P and σ(gate), so
         their backward runs no exp; Qwen2.5-3B T 256, one block, one chunk: 282 ms
         without them, 222 ms with, autodiff's ~252: bench/probes/block_profile.py)."""
    spare = opt.activation_budget
    wide = chunk_plan(spec, opt, B, T, spare)
    if wide is not None:
        opt, spare = replace(opt, token_chunk_bytes=wide[1]), spare - wide[2]
    plan = activation_plan(spec, spare, B, T, itemsize, opt)
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
