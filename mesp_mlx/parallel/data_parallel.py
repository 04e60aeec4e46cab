"""Data parallelism: N ranks train exactly like one process with the same global batch.

Letters: N ranks, batch rows split r·B/N ≤ b < (r+1)·B/N, n_r rank r's targets,
g_r its engine gradient (of its own mean loss L_r), n = Σ_r n_r.
  gradient  g = Σ_r n_r·g_r / n        one all-sum of [n_r·g_r, n_r·L_r, n_r]
  loss      L = Σ_r n_r·L_r / n        (token-weighted: not a mean of per-rank means)
  MeZO      L± = Σ_r n_r·L±_r / n      the same seed (hence z) on every rank:
                                       only these few scalars travel, per step
Every rank then applies the same update, so the adapters equal a single
process's up to float reassociation. Each rank builds the whole global batch
(cheap: token ids) and keeps its rows, so batch order, resume and gradient
accumulation are untouched; the all-summed count is checked against the
global batch's, which catches ranks reading different data.
"""

from contextlib import contextmanager
from typing import Callable, List

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from . import group as distributed
from .. import engine
from ..engine import mezo
from ..errors import ConfigError
from ..engine.batch import Batch
from .group import DistributedError, World
from ..engine.lora_layers import RowWindow, set_dropout_rows


def check_batch_size(world: World, batch_size: int):
    if batch_size % world.size:
        raise ConfigError(f"--batch-size {batch_size} does not split over {world.size} "
                          f"ranks: --batch-size is the global batch (as in mlx-lm), so "
                          f"use a multiple of {world.size}, e.g. "
                          f"{world.size * max(1, batch_size // world.size)}")


def rank_options(world: World, cfg):
    """The options this rank trains with: only rank 0 writes files."""
    import dataclasses
    if world.is_main:
        return cfg
    return dataclasses.replace(cfg, adapter_path=None, memory_log=None)


def _bounds(world: World, B: int):
    return world.rank * B // world.size, (world.rank + 1) * B // world.size


@contextmanager
def _rows(world: World, model, batch: Batch):
    """Dropout masks of this rank's rows of the global batch (as one process)."""
    set_dropout_rows(model, RowWindow(batch.inputs.shape[0],
                                      _bounds(world, batch.inputs.shape[0])[0]))
    try:
        yield
    finally:
        set_dropout_rows(model, None)


def shard(world: World, batch: Batch) -> Batch:
    """This rank's rows of a global batch (an empty batch when it has fewer
    rows than ranks). n_tokens per row = last target position + 1, since
    make_batch's mask always runs to the end of each sequence."""
    if world.size == 1:
        return batch
    lo, hi = _bounds(world, batch.inputs.shape[0])
    mask = batch.mask[lo:hi]
    T = mask.shape[1]
    last = (mask * mx.arange(1, T + 1)).max(axis=1) if hi > lo else mx.zeros((0,))
    seg = None if batch.segments is None else batch.segments[lo:hi]
    return Batch(batch.inputs[lo:hi], batch.targets[lo:hi], mask,
                 int(last.sum().item()), int(mask.sum().item()), seg)


def value_and_grad(world: World, model, batch: Batch, method: str, what: str,
                   options=None):
    """(global mean loss, gradient of it) from this rank's rows: one all-sum."""
    if world.size == 1:
        return engine.value_and_grad(model, batch.inputs, batch.targets, batch.mask,
                                     method=method, options=options,
                                     segments=batch.segments)
    part = shard(world, batch)

    def zero():
        return mx.array(0.0), tree_map(mx.zeros_like, model.trainable_parameters()), 0

    def run():
        if part.n_targets == 0:
            return zero()
        with _rows(world, model, batch):
            loss, grads = engine.value_and_grad(model, part.inputs, part.targets,
                                                part.mask, method=method, options=options,
                                                segments=part.segments)
        return loss, grads, part.n_targets

    loss, grads, n = distributed.local(world, run, zero)
    return reduce_gradients(world, model, loss, grads, n, batch.n_targets, what)


def reduce_gradients(world: World, model, loss, grads, n_local: int, n_global: int,
                     what: str):
    """Token-weighted all-sum: Σ n_r·g_r / Σ n_r, one flattened fp32 buffer laid
    out in model.trainable_parameters() order (the same on every rank)."""
    got = dict(tree_flatten(grads))
    keys = [k for k, _ in tree_flatten(model.trainable_parameters())]
    w = float(n_local)
    parts = [got[k].astype(mx.float32).reshape(-1) * w for k in keys]
    head = mx.array([0.0, 0.0]) if n_local == 0 else \
        mx.stack([loss.astype(mx.float32) * w, mx.array(w)])
    out = distributed.all_sum(world, mx.concatenate(parts + [head]), what)
    loss_sum, n = out[-2].item(), int(round(out[-1].item()))
    if n != n_global:
        raise DistributedError(f"{what}: the ranks trained {n} targets, the global batch "
                               f"has {n_global}: do all ranks read the same data with "
                               "the same options?")
    new, at = {}, 0
    for k in keys:
        g = got[k]
        new[k] = (out[at:at + g.size] / n).reshape(g.shape).astype(g.dtype)
        at += g.size
    mx.eval(new)
    return mx.array(loss_sum / n, mx.float32), tree_map_with_path(lambda k, _: new[k], grads)


def mezo_step(world: World, model, batch: Batch, lr: float, eps: float,
              weight_decay: float, what: str) -> mezo.SPSA:
    """mezo.mezo_step over the ranks: the seed comes from MLX's global RNG,
    seeded with f(seed, iteration) on every rank, so z is the same everywhere;
    the ranks all-sum n_r·L+_r, n_r·L−_r and n_r (exactly, in float64)."""
    if world.size == 1:
        return mezo.mezo_step(model, batch.inputs, batch.targets, batch.mask, lr, eps,
                              weight_decay)
    part = shard(world, batch)
    seed = mezo.fresh_seed()
    pert = mezo.Perturbation(model, seed)

    def run():
        if part.n_targets == 0:
            return 0.0, 0.0
        engine.step_dropout(model)               # one mask for both forward passes
        loss_at = mezo.lm_loss_at(model, part.inputs, part.targets, part.mask, pert)
        with _rows(world, model, batch):
            return loss_at(eps) * part.n_targets, loss_at(-eps) * part.n_targets

    plus, minus = distributed.local(world, run, lambda: (0.0, 0.0))
    n_local = part.n_targets if world.error is None else 0
    plus, minus, n = distributed.sum_scalars(world, [plus, minus, n_local], what)
    if n != batch.n_targets:
        raise DistributedError(f"{what}: the ranks evaluated {n:.0f} targets, the global "
                               f"batch has {batch.n_targets}: same data on every rank?")
    res = mezo.spsa(lambda c: plus / n if c > 0 else minus / n, eps, seed)
    mezo.apply_update(model, pert, res.p, lr, weight_decay)
    mx.clear_cache()
    return res


def evaluate(world: World, evaluate_fn: Callable[[List[Batch]], float],
             batches: List[Batch], what: str) -> float:
    """Token-weighted mean loss of `batches`, each split over the ranks:
    evaluate_fn(this rank's parts) is its mean; the sums are reduced exactly."""
    if world.size == 1:
        return evaluate_fn(batches)
    parts = [p for p in (shard(world, b) for b in batches) if p.n_targets]

    def run():
        n = sum(p.n_targets for p in parts)
        return (evaluate_fn(parts) * n if parts else 0.0), n

    total, n = distributed.local(world, run, lambda: (0.0, 0))
    total, n = distributed.sum_scalars(world, [total, n], what)
    return total / max(n, 1)


def check_start(world: World, model, start: int, accum_n: int):
    """Every rank starts from the same iteration and the same adapters."""
    checksum = sum(mx.sum(v.astype(mx.float32)).item() for _, v in
                   tree_flatten(model.trainable_parameters()))
    distributed.check_same(world, "the start of training",
                           ["start iteration", "pending targets", "adapter checksum"],
                           [start, accum_n, checksum])


def memory_max(world: World, rec, what: str) -> str:
    """', max over N ranks: peak … MB, footprint peak … MB' (every rank must call)."""
    if world.size == 1:
        return ""
    rec = rec or {}
    peak = rec.get("mlx_peak") or mx.get_peak_memory()
    fp = rec.get("footprint_peak") or 0
    peak, fp = distributed.max_scalars(world, [peak, fp], what)
    text = f", max over {world.size} ranks: peak {peak / 1e6:.1f} MB"
    return text + (f", footprint peak {fp / 1e6:.1f} MB" if fp else "")


def memory_summary(world: World, monitor) -> str:
    """The run's peaks, max over records and ranks (every rank must call)."""
    recs = monitor.records if monitor is not None else []
    worst = {k: max((r.get(k) or 0 for r in recs), default=0)
             for k in ("mlx_peak", "footprint_peak")}
    return f"Memory{memory_max(world, worst, 'the memory summary')}"


def all_reduce_bytes(model) -> int:
    """Bytes all-summed per backward: every LoRA gradient in fp32."""
    return 4 * sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def describe(world: World, model, batch_size: int, method: str) -> str:
    per_step = ("3 scalars (L+, L-, targets) exchanged per step" if method == "mezo" else
                f"{all_reduce_bytes(model) / 1e6:.3g} MB of LoRA gradients all-summed "
                "per batch")
    return f"Data parallel: {batch_size // world.size} sequences per rank; {per_step}"
