"""Drop-in for `mlx_lm.tuner.trainer.train`: change one import, keep the script.

    from mesp_mlx.tuner import train     # was: from mlx_lm.tuner.trainer import train
    train(model, optimizer, train_set, val_set, args=TrainingArgs(...),
          training_callback=cb)          # + method="mesp" | "mebp" | "autodiff"

Same arguments (mlx-lm's TrainingArgs, datasets, `iterate_batches`), the same
TrainingCallback hooks and keys, the same files (`args.adapter_file` and its
numbered snapshots, written atomically here). mlx-lm LoRALinear layers are
swapped in place for ours (same names, same weights), and the gradients come
from our engine. What differs, and why: accumulation is token-weighted (the
exact gradient of the accumulated batches' mean loss, where mlx-lm averages
per-batch means), and no padding position is a target (mlx-lm's default loss
counts one past each sequence's end). A `loss` other than mlx-lm's
`default_loss`, or layers our engine cannot run (DoRA, LoRA on embeddings or
MoE experts, other trainable weights), fall back to plain autodiff with an
AutodiffFallback warning.
"""

import time
import warnings
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner import trainer as mlt
from mlx_lm.tuner.lora import LoRALinear as MLXLoRALinear
from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, default_loss

from .. import engine
from ..engine.batch import Batch
from ..engine.lora_layers import LoRALinear
from ..log import say
from ..log import to as say_to
from ..train import adapters, data, loop, reporting

iterate_batches = mlt.iterate_batches
# the rest of mlx_lm.tuner.trainer's names, as they are there
CacheDataset, TrainUI, average_gradients = mlt.CacheDataset, mlt.TrainUI, mlt.average_gradients
grad_checkpoint = mlt.grad_checkpoint
maybe_set_recommended_wired_limit = mlt.maybe_set_recommended_wired_limit
__all__ = ["train", "evaluate", "TrainingArgs", "TrainingCallback", "default_loss",
           "iterate_batches", "convert_lora_layers", "AutodiffFallback", "CacheDataset",
           "TrainUI", "average_gradients", "grad_checkpoint",
           "maybe_set_recommended_wired_limit"]


class AutodiffFallback(UserWarning):
    """The engine cannot express this loss or these layers: plain autodiff runs."""


def convert_lora_layers(model: nn.Module) -> int:
    """Replace mlx-lm LoRALinear layers by ours in place (same linear, lora_a,
    lora_b, scale and dropout); returns how many were replaced."""
    swaps = []
    for path, m in model.named_modules():
        if type(m) is MLXLoRALinear:
            ours = LoRALinear(m.linear, m.lora_a.shape[1], m.scale,
                              1.0 - m.dropout._p_1)
            ours.lora_a, ours.lora_b = m.lora_a, m.lora_b
            swaps.append((path, ours))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def _engine_blockers(model) -> list:
    """Trainable leaves our engine's LoRA gradients do not cover."""
    return [k for k, _ in tree_flatten(model.trainable_parameters())
            if k.rsplit(".", 1)[-1] not in ("lora_a", "lora_b")]


def to_batch(batch: mx.array, lengths: mx.array) -> Batch:
    """mlx-lm's (tokens [B, W], lengths [B, 2] = (offset, length)) as our Batch:
    target j is trained for offset - 1 <= j <= length - 2 (never a padding target)."""
    lens = np.array(lengths)
    T = batch.shape[1] - 1
    j = np.arange(T)[None]
    mask = ((j >= np.maximum(lens[:, :1] - 1, 0)) & (j <= lens[:, 1:] - 2)).astype(np.float32)
    return Batch(batch[:, :-1], batch[:, 1:], mx.array(mask),
                      int(np.minimum(lens[:, 1] - 1, T).clip(0).sum()), int(mask.sum()))


def _datasets(ds):
    """mlx-lm's datasets as its iterate_batches wants them (raw ones cached,
    ours as (tokens, offset) pairs); None stays None."""
    if ds is None:
        return None
    if isinstance(ds, data.Dataset):
        return list(zip(ds.tokens, ds.offsets))
    if hasattr(ds, "process") and not isinstance(ds, mlt.CacheDataset):
        return mlt.CacheDataset(ds)
    return ds


def _method(method, args):
    if method is not None:
        return method
    if getattr(args, "grad_checkpoint", False):
        say("grad_checkpoint: method mebp (per-block checkpointing); method='mesp' "
            "needs less memory still")
        return "mebp"
    return "mesp"


def _fallback(model, loss, method) -> Optional[str]:
    """Why plain autodiff must run (None: the engine can)."""
    why = None
    if loss is not default_loss:
        why = "a custom loss"
    elif _engine_blockers(model):
        why = f"trainable weights other than LoRA ({_engine_blockers(model)[0]}, ...)"
    if why is not None and method != "autodiff":
        warnings.warn(f"mesp_mlx.tuner.train: {why} cannot run on method {method!r}; "
                      "using plain MLX autodiff (exact, but mlx-lm's memory)",
                      AutodiffFallback, stacklevel=3)
    return why


def _save(model, path, use_lora_names):
    weights = adapters.adapter_weights(model) if use_lora_names else \
        dict(tree_flatten(model.trainable_parameters()))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    adapters.write_weights(model, p, weights=weights)
    return p


def evaluate(model, dataset, batch_size, num_batches, max_seq_length=2048,
             loss: callable = default_loss, iterate_batches: callable = iterate_batches,
             clear_cache_threshold: int = 0, progress_callback=None):
    """mlx_lm.tuner.trainer.evaluate's signature and batches, our padding-exact,
    chunked loss (mlx-lm's own for a custom `loss`)."""
    if loss is not default_loss:
        return mlt.evaluate(model, dataset, batch_size, num_batches, max_seq_length, loss,
                            iterate_batches, clear_cache_threshold, progress_callback)
    batches = iterate_batches(dataset=_datasets(dataset), batch_size=batch_size,
                              max_seq_length=max_seq_length)
    n = range(num_batches) if num_batches != -1 else iter(int, 1)
    loss_ = loop.evaluate(model, (to_batch(*b) for _, b in zip(n, batches)),
                          progress=progress_callback)
    loop.clear_cache(clear_cache_threshold)
    return loss_


def train(model, optimizer, train_dataset, val_dataset=None,
          args: TrainingArgs = TrainingArgs(), loss: callable = default_loss,
          iterate_batches: callable = iterate_batches,
          training_callback: TrainingCallback = None, *, method: Optional[str] = None,
          log=None):
    """mlx_lm.tuner.trainer.train with mesp_mlx's engine (method: mesp by default,
    mebp when args.grad_checkpoint, or any of engine.METHODS but mezo). Returns the
    per-iteration losses. log: where progress lines go (None: print)."""
    with say_to(log):
        return _train(model, optimizer, train_dataset, val_dataset, args, loss,
                      iterate_batches, training_callback, method)


def _train(model, optimizer, train_dataset, val_dataset, args, loss, iterate_batches,
           training_callback, method):
    world = mx.distributed.init()
    if world.size() > 1:
        raise NotImplementedError("mesp_mlx.tuner.train runs in one process; for data "
                                  "parallelism use python -m mesp_mlx.lora under mlx.launch")
    method = _method(method, args)
    if method not in engine.METHODS or method == "mezo":
        raise ValueError(f"method must be one of autodiff, mebp, mesp, got {method!r}")
    if args.grad_accumulation_steps < 1:
        raise ValueError("grad_accumulation_steps must be at least 1")
    n_converted = convert_lora_layers(model)
    method = "autodiff" if _fallback(model, loss, method) else method
    if n_converted:
        say(f"mesp_mlx: {n_converted} mlx-lm LoRA layers run on method {method}")
    step = _step_fn(model, loss, method)
    lora_only = not _engine_blockers(model)
    model.train()
    window, out = _Window(), []
    accum = loop.Accumulator(args.grad_accumulation_steps)
    batches = iterate_batches(dataset=_datasets(train_dataset), batch_size=args.batch_size,
                              max_seq_length=args.max_seq_length, loop=True,
                              comm_group=world)
    for it, (batch, lengths) in zip(range(1, args.iters + 1), batches):
        if val_dataset and (it == 1 or it % args.steps_per_eval == 0 or it == args.iters):
            _validate(model, val_dataset, args, loss, iterate_batches, it,
                      training_callback)
        tic = time.perf_counter()
        lv, toks, g = step(batch, lengths)
        accum.add(g, toks)
        del g
        if it % args.grad_accumulation_steps == 0:
            accum.apply(optimizer, model)
        loop.clear_cache(args.clear_cache_threshold or 0)
        window.add(lv, toks, time.perf_counter() - tic)
        out.append(lv)
        if it % args.steps_per_report == 0 or it == args.iters:
            window.report(it, optimizer, training_callback)
        if it % args.steps_per_save == 0:
            _save(model, args.adapter_file, lora_only)
            snap = _save(model, Path(args.adapter_file).parent /
                         f"{it:07d}_adapters.safetensors", lora_only)
            say(f"Iter {it}: Saved adapter weights to {args.adapter_file} and {snap}.")
    _save(model, args.adapter_file, lora_only)
    say(f"Saved final weights to {args.adapter_file}.")
    return out


def _step_fn(model, loss, method):
    """step(batch, lengths) -> (loss, trained targets, grads of the mean loss): our
    engine for mlx-lm's default loss, plain autodiff of a custom one."""
    if loss is not default_loss:
        value_and_grad = nn.value_and_grad(model, loss)

        def custom(batch, lengths):
            engine.step_dropout(model)               # this step's masks for our layers
            (lv, toks), g = value_and_grad(model, batch, lengths)
            mx.eval(lv, toks, g)
            return lv.item(), int(toks.item()), g
        return custom

    def ours(batch, lengths):
        b = to_batch(batch, lengths)
        lv, g = engine.value_and_grad(model, b.inputs, b.targets, b.mask, method=method)
        return lv.item(), b.n_targets, g
    return ours


def _validate(model, val_dataset, args, loss, iterate_batches, it, callback):
    tic = time.perf_counter()
    val_loss = evaluate(model, val_dataset, args.batch_size, args.val_batches,
                        args.max_seq_length, loss, iterate_batches)
    model.train()
    secs = time.perf_counter() - tic
    say(f"Iter {it}: val loss {val_loss:.3f}, val took {secs:.3f}s")
    if callback is not None:
        callback.on_val_loss_report(reporting.val_info(it - 1, val_loss, secs))


class _Window:
    """Losses, targets and training time since the last report (mlx-lm's report)."""

    def __init__(self):
        self.losses, self.steps, self.targets, self.seconds, self.trained = 0.0, 0, 0, 0.0, 0

    def add(self, loss: float, targets: int, seconds: float):
        self.losses += loss
        self.steps += 1
        self.targets += targets
        self.seconds += seconds

    def report(self, it, optimizer, callback):
        self.trained += self.targets
        lr = loop.learning_rate(optimizer)
        info = reporting.train_info(it, self.losses / self.steps, lr, self.steps,
                                    self.targets, self.seconds, self.trained,
                                    mx.get_peak_memory())
        say(f"Iter {it}: Train loss {info['train_loss']:.3f}, Learning Rate {lr:.3e}, "
            f"It/sec {info['iterations_per_second']:.3f}, Tokens/sec "
            f"{info['tokens_per_second']:.3f}, Trained Tokens {self.trained}, Peak mem "
            f"{info['peak_memory']:.3f} GB")
        if callback is not None:
            callback.on_train_loss_report(info)
        self.losses, self.steps, self.targets, self.seconds = 0.0, 0, 0, 0.0
