"""Per-block schedules for exact LoRA gradients: MeBP and MeSP.

Both run the same explicit schedule (tight lifetimes in MLX need evaluation
barriers outside transforms, not a layer inside one lazy graph):
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
Cross-block inputs (links.py): per-block constant inputs and K, V shared between
blocks travel beside h, so the driver stays family-agnostic.
Streamed weights (stream.py): each block runs inside `weights.block(b)` (its
frozen arrays read, then released), and the spec's head/embedding read the file
by tiles and rows; resident: no-ops.
Token weights (`weights` [B, T], any sign, unnormalised): the loss is Σ w·ℓ in
place of the masked mean; given as a function of the per-token ℓ, the head
computes ℓ and the unweighted dℓ/dh in one pass, then scales dh by w (row-wise
linear through the final norm). `forward_head` is a forward and that head alone;
its dh, weighted, can be handed to a later run (`head`), which then skips the head.
Preference objectives (preference.py) use all three.
"""

import time
from contextlib import contextmanager, nullcontext
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from ..ops.dequant_matmul import tile_barriers
from ..ops.loss_head import loss_head_value_and_grad
from ..ops.rmsnorm import rmsnorm_backward
from .block import block_backward, block_forward, layer_mask
from .checkpoints import open_checkpoints
from .links import StepLinks
from .packing import Packing
from .plan import EngineOptions, cache_policy, head_tiles, planned
from .stream import weight_source
from .walk import model_spec, own_block, walk


def run(model, inputs, targets, mask, method, options: Optional[EngineOptions] = None,
        stats: Optional[dict] = None, segments=None, weights=None, into=None, head=None):
    """Loss and LoRA gradients (tree of model.trainable_parameters()); segments
    [B, T]: packed examples (method "mesp"); weights: [B, T] token weights, or a
    function of the per-token ℓ [B, T] giving them (mask is then unused); into: a
    {path: gradient} dict this call's gradients are added to (and returned from);
    head: (loss, dL/dh [B, T, D] of the final hidden state), known already (the
    head is skipped; forward_head)."""
    if segments is not None and method != "mesp":
        raise ValueError(f"packed rows (segments) need method 'mesp', got {method!r}")
    packing = None if segments is None else Packing.of(segments)
    opt = options or EngineOptions()
    with no_cache() if cache_policy(opt) == "always" else nullcontext():
        return _step(model, inputs, targets, mask, method, opt, stats, packing, weights,
                     into, head)


@contextmanager
def no_cache():
    """The allocator keeps no freed buffer during the step (clear_cache "always"):
    the process footprint stays near the MLX peak, for some reallocation."""
    limit = mx.set_cache_limit(0)
    try:
        yield
    finally:
        mx.set_cache_limit(limit)
        mx.clear_cache()


def _step(model, inputs, targets, mask, method, opt, stats, packing, weights, into, head):
    B, T = inputs.shape
    spec = model_spec(model, method, T, opt)
    clock = Clock(stats)

    h = spec.embed_ids(inputs)
    mx.eval(h)
    links = StepLinks(spec, inputs, h)
    store = open_checkpoints(opt.checkpoints, opt.checkpoint_dir,
                             (len(spec.blocks) - spec.first) * h.nbytes)
    hs = [h]                              # handed over, so _run can free h
    del h
    try:
        # mesp runs outside any transform: evaluate per W0 tile (mebp runs under
        # mx.vjp / value_and_grad, where barriers would keep everything: 5.8 GB)
        with tile_barriers() if method == "mesp" else nullcontext():
            return _run(model, spec, store, hs, targets, mask, method, opt, stats, clock,
                        packing, weight_source(model), weights, into, head, links)
    finally:
        store.close()                     # a disk file goes on success, error and Ctrl-C


def _run(model, spec, store, hs, targets, mask, method, opt, stats, clock, packing,
         weights, token_weights, into, given, links):
    h = hs.pop()
    T = h.shape[1]
    # 1. forward, keeping block inputs from the lowest LoRA block up (and, for the
    #    blocks the activation plan names, what their backward reads)
    plan, wide = {}, None
    if method == "mesp":
        plan, opt, wide = planned(spec, opt, h.shape[0], T, h.dtype.size)
        plan = {i: (n, e) for i, n, e in plan}
    n_ckpt, kept = 0, {}

    def forward(i, b, h):
        nonlocal n_ckpt
        if i >= spec.first:
            store.put(i, h)
            n_ckpt += 1
        bl = links.forward(i, b)
        if i in plan:
            h, kept[i] = block_forward(b, h, opt, keep=True, packing=packing,
                                       extras=plan[i][1], links=bl)
            return h
        if method == "mesp":
            return block_forward(b, h, opt, packing=packing, links=bl)
        return own_block(b, h, bl)

    h = walk(spec, h, forward, weights)
    if stats is not None:
        stats["checkpoint_bytes"] = n_ckpt * h.nbytes
        stats["n_checkpoints"] = n_ckpt
        stats["checkpoints"] = store.kind
        stats["kept_blocks"] = sorted(plan)
        stats["kept_bytes"] = sum(n for n, _ in plan.values())
        stats["kept_extras"] = sorted(i for i, (_, e) in plan.items() if e)
        stats["token_chunk_rows"] = wide          # None: the minimal schedule's chunks
        stats["keep_probs"] = opt.keep_probs
    clock.lap("forward")

    # 2. loss head
    if given is not None:
        loss, dh = given
    elif method == "mesp":
        loss, dh = _chunked_head(spec, h, targets, mask, opt, token_weights)
    else:
        loss, dh = _logits_head(spec, h, targets, mask, token_weights)
    del h
    mx.eval(loss, dh)
    clock.lap("head")

    # 3. backward, block by block in reverse
    flat = {} if into is None else into
    for i in range(len(spec.blocks) - 1, spec.first - 1, -1):
        x, b = store.pop(i), spec.blocks[i]
        bl = links.backward(i, b)
        with weights.block(b):
            if method == "mesp":
                dh = block_backward(spec.paths, b, x, dh, flat, opt,
                                    need_dx=i > spec.first, kept=kept.pop(i, None),
                                    packing=packing, links=bl)
            else:
                dh = _mebp_block(spec.paths, b, x, dh, flat, layer_mask(b, T), bl)
            del x
            mx.eval(dh, *flat.values())
        if cache_policy(opt) == "block":
            mx.clear_cache()
    if cache_policy(opt) in ("block", "step"):
        mx.clear_cache()
    clock.lap("backward")
    if stats is not None:
        stats["grad_bytes"] = sum(g.nbytes for g in flat.values())
    grads = tree_map_with_path(lambda p, _: flat[p], model.trainable_parameters())
    return loss, grads


def forward_head(model, inputs, targets, method="mesp",
                 options: Optional[EngineOptions] = None):
    """(ℓ [B, T] fp32, dℓ/dh [B, T, D]): a forward (as `method` runs it) and the head's
    per-token loss and its unweighted gradient w.r.t. the final hidden state (row n:
    ∂ℓₙ/∂hₙ), one head pass; run(head=(Σ w·ℓ, w ⊙ dℓ/dh)) is then the gradient of
    Σ w·ℓ without a second head pass."""
    opt = options or EngineOptions()
    spec = model_spec(model, method, inputs.shape[1], opt)
    got = {}

    def keep(ce):                      # every weight 1: dh is the unweighted gradient
        got["ce"] = ce
        return mx.ones_like(ce)
    with tile_barriers() if method == "mesp" else nullcontext():
        h = spec.embed_ids(inputs)
        mx.eval(h)
        links = StepLinks(spec, inputs, h)

        def block(i, b, h):
            bl = links.forward(i, b)
            return block_forward(b, h, opt, links=bl) if method == "mesp" else \
                own_block(b, h, bl)
        h = walk(spec, h, block, weight_source(model))
        if method == "mesp":
            _, dh = _chunked_head(spec, h, targets, None, opt, keep)
        else:
            _, dh = _logits_head(spec, h, targets, None, keep)
        mx.eval(dh)
    return got["ce"], dh


def _chunked_head(spec, h, targets, mask, opt, weights=None):
    """Final norm + tiled head/loss, one row tile at a time (never the [N, V] logits,
    nor more than a tile of normed rows); (loss, dL/dh). weights: as run's."""
    B, T, D = h.shape
    N, V = B * T, spec.head.shape[0]
    rows, vocab = head_tiles(opt, N, V)
    later = callable(weights)              # ℓ and the unweighted dh first, then w(ℓ)
    hf, y = h.reshape(N, D), targets.reshape(-1)
    m = mask if weights is None else mx.ones((N,)) if later else weights
    m = m.reshape(-1).astype(mx.float32)
    denom = mx.maximum(m.sum(), 1.0) if weights is None else 1.0
    loss, dh, ce = mx.array(0.0, mx.float32), None, []
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        hc = hf[n0:n1]
        lc, dhn = loss_head_value_and_grad(spec.norm(hc), spec.head, y[n0:n1], m[n0:n1],
                                           rows, vocab, softcap=spec.final_softcap,
                                           logit_scale=spec.logit_scale, denom=denom,
                                           per_token=later)
        dhc = rmsnorm_backward(dhn, hc, spec.norm.w, spec.norm.eps)
        if later:
            ce.append(lc)
        else:
            loss = loss + lc
        if n1 - n0 == N:
            dh = dhc
        else:
            dh = mx.zeros(hf.shape, hf.dtype) if dh is None else dh
            dh[n0:n1] = dhc
        del dhn, dhc
        mx.eval(loss, dh)
    if later:
        ce = mx.concatenate(ce).reshape(B, T)
        w = _weights_of(weights, ce)
        loss, dh = mx.sum(w * ce), dh * w.reshape(N, 1).astype(dh.dtype)
        mx.eval(loss, dh)
    return loss, dh.reshape(h.shape)


def _logits_head(spec, h, targets, mask, weights=None):
    """Final norm + head + cross-entropy by autodiff on the full logits (mebp);
    (loss, dL/dh). weights: as run's (a function: one more forward of the head)."""
    def ce_of(h):
        logits = spec.logits(spec.norm(h)).astype(mx.float32)
        return nn.losses.cross_entropy(logits, targets)                 # [B, T]

    if callable(weights):
        weights = _weights_of(weights, ce_of(h))
    if weights is None:
        return mx.value_and_grad(lambda h: (ce_of(h) * mask).sum()
                                 / mx.maximum(mask.sum(), 1.0))(h)
    return mx.value_and_grad(lambda h: (ce_of(h) * weights).sum())(h)


def _weights_of(fn, ce):
    """fn(ℓ) for ℓ [B, T] (fp32): the token weights [B, T], checked."""
    w = fn(ce)
    if not isinstance(w, mx.array) or w.shape != ce.shape:
        raise ValueError(f"token weights must be an mx.array of shape {ce.shape}, got "
                         f"{getattr(w, 'shape', type(w).__name__)}")
    return mx.stop_gradient(w.astype(mx.float32))


class Clock:
    """Seconds per phase (`<name>_s`) and the MLX peak so far (`peak_after_<name>`)
    into `stats` (no-op without stats)."""

    def __init__(self, stats):
        self.stats, self.t = stats, time.perf_counter()

    def lap(self, name):
        if self.stats is not None:
            now = time.perf_counter()
            self.stats[name + "_s"] = now - self.t
            self.stats["peak_after_" + name] = mx.get_peak_memory()      # monotone
            self.t = now

    def sub(self, name):
        """A dict in `stats` for one inner pass's own figures (a nested run's)."""
        return None if self.stats is None else self.stats.setdefault(name, {})


def _side_kv(links):
    """(per-layer input, shared K, V) of a block's links, for BlockSpec.run."""
    return (None, None) if links is None else (links.side, links.kv)


def _mebp_block(paths, b, x, g, flat, mask, links=None):
    """Recompute the mlx-lm block under mx.vjp; autodiff gives dx and the LoRA grads
    (and, across blocks, dK, dV: a reader's go to its source's links, a source's
    readers' sum is the cotangent of the K, V it hands out)."""
    blk = b.module
    names, params = zip(*tree_flatten(blk.trainable_parameters()))
    side, kv = _side_kv(links)
    export = links is not None and links.dkv is not None     # readers' dK, dV to take
    n = len(params)

    def f(x, *ps):
        blk.update(tree_unflatten(list(zip(names, ps[:n]))))
        out, kv_out = b.run(x, mask, side, tuple(ps[n:]) if kv is not None else None)
        return [out, *kv_out] if export else [out]

    cot = [g, *links.dkv] if export else [g]
    _, vjps = mx.vjp(f, [x, *params, *(kv or ())], cot)
    blk.update(tree_unflatten(list(zip(names, params))))
    prefix = paths[id(blk)]
    for nm, d in zip(names, vjps[1:n + 1]):
        k = f"{prefix}.{nm}"
        flat[k] = d if k not in flat else flat[k] + d
    if kv is not None:
        links.add_dkv(*vjps[n + 1:])
    return vjps[0]
