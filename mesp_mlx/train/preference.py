"""Preference training (--train-mode dpo|orpo): the loop's step, evaluation, reports.

One iteration runs engine/preference.py's step on a batch of pairs (each rank on its
pairs, the gradients all-summed pair-weighted: Σ n_r g_r / n, n pairs); the
Accumulator weighs batches by pairs too, so accumulated updates are the exact
gradient of the mean loss over every accumulated pair. DPO's reference
log-probabilities are constants: computed at a pair's first visit (same batch, same
numbers on a resumed run) and kept in its dataset's `ref_cache`, so later epochs and
every validation after the first skip the two reference forwards. Reports add the
reward accuracy (mean of reward_c > reward_r) and the mean margin (reward_c − reward_r).
"""

from typing import Callable

import mlx.core as mx
from mlx.utils import tree_map

from ..engine.lora_layers import RowWindow, set_dropout_rows
from ..engine.objectives import objective
from ..engine.preference import preference_step
from ..parallel import data_parallel, group as distributed
from .preference_data import PairBatch

METRICS = ("reward_acc", "margin")


def _shard(world, batch: PairBatch) -> PairBatch:
    """This rank's pairs of a global batch (none when it has fewer pairs than ranks)."""
    if world.size == 1:
        return batch
    B = batch.n_pairs
    lo, hi = world.rank * B // world.size, (world.rank + 1) * B // world.size
    return PairBatch(data_parallel.shard(world, batch.chosen),
                     data_parallel.shard(world, batch.rejected), batch.idx[lo:hi],
                     batch.ref_cache)


def _reference(batch: PairBatch, mode: str):
    """The cached reference log-probabilities of the batch's pairs, or None."""
    if not objective(mode).reference:
        return None
    got = [batch.ref_cache.get(i) for i in batch.idx]
    if any(g is None for g in got):
        return None
    return mx.array([g[0] for g in got]), mx.array([g[1] for g in got])


def _run(model, part: PairBatch, cfg, options, grad: bool):
    """(mean loss, grads or None, [correct, margin] summed over the pairs)."""
    c, r = part.chosen, part.rejected
    res = preference_step(model, (c.inputs, c.targets, c.mask),
                          (r.inputs, r.targets, r.mask), cfg.train_mode, cfg.beta,
                          cfg.method, _reference(part, cfg.train_mode), options, grad)
    if res.chosen.ref is not None:
        for i, a, b in zip(part.idx, res.chosen.ref.tolist(), res.rejected.ref.tolist()):
            part.ref_cache.setdefault(i, (a, b))
    wc, wr = res.rewards
    sums = [mx.sum(wc > wr).item(), mx.sum(wc - wr).item()]
    return res.loss, res.grads, sums


def pairs_value_and_grad(world, model, batch: PairBatch, cfg, options, what: str,
                         grad: bool = True):
    """(global mean loss, its gradient or None, [correct, margin] sums) of a batch of
    pairs over the ranks: each rank runs its pairs, one all-sum of n_r·g_r."""
    if world.size == 1:
        return _run(model, batch, cfg, options, grad)
    part = _shard(world, batch)

    def empty():
        return mx.array(0.0), _zero_grads(model) if grad else None, [0.0, 0.0]

    def local():
        if part.n_pairs == 0:
            return empty()
        B = batch.n_pairs                      # this rank's rows of the batch's dropout
        set_dropout_rows(model, RowWindow(B, world.rank * B // world.size))
        try:
            return _run(model, part, cfg, options, grad)
        finally:
            set_dropout_rows(model, None)

    loss, grads, sums = distributed.local(world, local, empty)
    if grad:
        loss, grads = data_parallel.reduce_gradients(world, model, loss, grads,
                                                     part.n_pairs, batch.n_pairs, what)
    else:
        loss = mx.array(distributed.sum_scalars(
            world, [loss.item() * part.n_pairs], what)[0] / batch.n_pairs)
    sums = distributed.sum_scalars(world, sums, what)
    return loss, grads, list(sums)


def _zero_grads(model):
    return tree_map(mx.zeros_like, model.trainable_parameters())


def make_step(cfg, model, optimizer, world, options, accum) -> Callable:
    """step(batch, it) -> (loss, what diverged or None, {reward_acc, margin})."""
    def step(batch: PairBatch, it: int):
        loss, grads, sums = pairs_value_and_grad(world, model, batch, cfg, options,
                                                 f"iteration {it}")
        loss = loss.item()
        bad = accum.take(loss, grads, batch.n_pairs, it, optimizer, model)
        return loss, bad, metrics(sums, batch.n_pairs)
    return step


def metrics(sums, n: int) -> dict:
    return {k: v / max(n, 1) for k, v in zip(METRICS, sums)}


def evaluate(world, model, batches, cfg, what: str, options=None):
    """(mean loss, {reward_acc, margin}) over fixed batches of pairs (dropout off)."""
    was_training = model.training
    model.eval()
    total, sums, n = 0.0, [0.0, 0.0], 0
    for b in batches:
        loss, _, s = pairs_value_and_grad(world, model, b, cfg, options, what, grad=False)
        total += loss.item() * b.n_pairs
        sums = [a + x for a, x in zip(sums, s)]
        n += b.n_pairs
    model.train(was_training)
    return total / max(n, 1), metrics(sums, n)


def describe(m: dict, prefix: str = "") -> str:
    """', reward acc 0.625, margin 0.310' (prefix e.g. 'val ')."""
    return (f"{prefix}reward acc {m['reward_acc']:.3f}, "
            f"{prefix}margin {m['margin']:.3f}")
