"""The training loop: engine gradients, optimizer, reports, saves, resume.

    result = train(model, train_set, val_set, TrainConfig(...))   # model has LoRA
    loss = evaluate(model, fixed_batches(test_set, 4, -1))

Iteration k's batch and dropout mask are pure functions of (seed, k), and the
optimizer state and pending accumulated gradients are saved with the adapters,
so a resumed run replays the uninterrupted run's losses exactly.
"""

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from . import adapters, early_stop as best, reporting, lr_schedules as schedules
from ..parallel import data_parallel
from .. import engine
from ..errors import ConfigError
from .config import TrainConfig
from .data import Batch, Dataset, fixed_batches, iterate_batches
from ..parallel.group import World
from .divergence import all_finite, divergence_error, first_nonfinite
from ..engine.walk import loss_sum
from ..engine.stream import is_streamed

HEAD_CHUNK = 512      # positions per logits chunk in evaluation ([1, 512, V] at a time)


@dataclass
class TrainResult:
    step: int                                                  # last iteration done
    train_losses: List[tuple] = field(default_factory=list)   # (iteration, loss) per report
    val_losses: List[tuple] = field(default_factory=list)     # (iteration, loss)
    step_losses: List[float] = field(default_factory=list)    # every iteration's loss
    step_seconds: List[float] = field(default_factory=list)   # every iteration's wall time
    adapter_file: Optional[str] = None
    best: Optional[tuple] = None          # (iteration, val loss) of --save-best's pick
    stopped_early: bool = False           # --early-stop-patience ended the run


def build_optimizer(name: str, learning_rate: float, extra: Optional[dict] = None):
    classes = {"sgd": optim.SGD, "adam": optim.Adam, "adamw": optim.AdamW,
               "muon": getattr(optim, "Muon", None),
               "adafactor": getattr(optim, "Adafactor", None)}
    if name in classes and classes[name] is None:
        raise ConfigError(f"--optimizer {name} needs a newer MLX (mlx.optimizers has "
                          "no such class here); use adam or adamw")
    if name not in classes:
        raise ConfigError(f"unknown optimizer {name!r}; choose from {', '.join(classes)}")
    try:
        return classes[name](learning_rate=learning_rate, **(extra or {}))
    except TypeError as e:
        raise ConfigError(f"optimizer_config for {name}: {e}") from None


# ---------------------------------------------------------------- evaluation

def _loss_sum(model, batch: Batch) -> mx.array:
    """Σ CE · mask, one row and HEAD_CHUNK positions at a time, so evaluation
    never builds the full [B, T, V] logits (streamed weights: forward.py)."""
    if is_streamed(model):
        return mx.array(loss_sum(model, batch.inputs, batch.targets, batch.mask))
    body = getattr(model, "model", None)
    if body is None:
        return engine.masked_ce(model(batch.inputs), batch.targets, batch.mask) * batch.n_targets
    head = model.lm_head if hasattr(model, "lm_head") else body.embed_tokens.as_linear
    total = mx.array(0.0)
    for b in range(batch.inputs.shape[0]):
        h = body(batch.inputs[b:b + 1])                         # [1, T, D]
        for t in range(0, h.shape[1], HEAD_CHUNK):
            s = slice(t, t + HEAD_CHUNK)
            ce = nn.losses.cross_entropy(head(h[:, s]).astype(mx.float32),
                                         batch.targets[b:b + 1, s])
            total = total + (ce * batch.mask[b:b + 1, s]).sum()
            mx.eval(total)
    return total


def evaluate(model, batches: List[Batch], progress=None) -> float:
    """Token-weighted mean loss over `batches` (dropout off)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for batch in batches:
        total += _loss_sum(model, batch).item()
        n += batch.n_targets
        if progress is not None:
            progress()
    model.train(was_training)
    return total / max(n, 1)


# ---------------------------------------------------------------- training

class _Window:
    """Counters between two reports."""

    def __init__(self):
        self.loss = self.targets = self.tokens = self.iters = 0
        self.t0 = time.perf_counter()
        self.rec = None           # last memory record, peaks maxed over the window

    def add(self, loss, batch, rec):
        self.loss += loss * batch.n_targets
        self.targets += batch.n_targets
        self.tokens += batch.n_tokens
        self.iters += 1
        if rec is not None:
            prev, self.rec = self.rec or {}, dict(rec)
            for k, pick in (("mlx_peak", max), ("footprint_peak", max), ("headroom", min)):
                vals = [v for v in (prev.get(k), rec.get(k)) if v is not None]
                if vals:
                    self.rec[k] = pick(vals)


def check_method(method):
    if method not in engine.METHODS:
        raise ConfigError(f"--method {method} is not supported by this engine "
                          f"(available: {', '.join(engine.METHODS)})")


def _lr(optimizer) -> float:
    lr = optimizer.learning_rate
    return lr.item() if isinstance(lr, mx.array) else float(lr)


def engine_options(cfg: TrainConfig) -> engine.EngineOptions:
    """The schedule knobs a TrainConfig sets (--offload-checkpoints DIR)."""
    if not cfg.offload_checkpoints:
        return engine.EngineOptions()
    d = os.path.expanduser(cfg.offload_checkpoints)
    os.makedirs(d, exist_ok=True)
    return engine.EngineOptions(checkpoints="disk", checkpoint_dir=d)


def train(model: nn.Module, train_set: Dataset, val_set: Optional[Dataset] = None,
          config: Optional[TrainConfig] = None, optimizer=None, monitor=None,
          log=print, progress: Optional[bool] = None,
          world: Optional[World] = None,
          options: Optional[engine.EngineOptions] = None, callback=None) -> TrainResult:
    """Train the LoRA parameters of `model` for config.iters iterations.

    Resumes from config.resume_adapter_file; saves to config.adapter_path
    (None: no files). monitor: a mesp_mlx.memory.MemoryMonitor (its peak is
    reset per iteration; reports show the window's maximum) or None.
    world: a data-parallel group (mesp_mlx.distributed); each rank trains on
    its rows of every global batch (None: one process).
    callback: an mlx-lm TrainingCallback (on_train_loss_report /
    on_val_loss_report, mlx-lm's keys); --report-to builds one.
    """
    cfg = config or TrainConfig(train=True)
    check_method(cfg.method)
    world = world or World()
    data_parallel.check_batch_size(world, cfg.batch_size)
    if cfg.grad_accumulation_steps < 1:
        raise ConfigError("--grad-accumulation-steps must be >= 1")
    if cfg.method == "mezo":
        if cfg.grad_accumulation_steps != 1:
            raise ConfigError("--method mezo does not accumulate gradients: use "
                              "--batch-size instead of --grad-accumulation-steps")
        log(f"MeZO: SGD update θ -= lr·(p·z + {cfg.mezo_weight_decay}·θ), eps "
            f"{cfg.mezo_eps}; the optimizer is unused; train loss = (L(θ+εz) + "
            "L(θ-εz))/2, an O(eps²) overestimate of L(θ)")
    opt = optimizer or build_optimizer(cfg.optimizer, _learning_rate(cfg),
                                       (cfg.optimizer_config or {}).get(cfg.optimizer))
    start, accum, accum_n = _resume(model, opt, cfg, log)
    tracker, cache_limit, trained = best.Tracker.of(cfg), cfg.clear_cache_bytes(), 0
    if tracker.active and not (val_set and cfg.val_batches != 0):
        raise ConfigError("--save-best and --early-stop-patience need validation "
                          "data (valid.jsonl) and --val-batches other than 0")
    if cfg.resume_adapter_file and start:
        tracker.restore(adapters.read_state(cfg.resume_adapter_file)[0])
    last_good = (str(adapters.find_adapter_file(cfg.resume_adapter_file)), start) \
        if cfg.resume_adapter_file else None       # (adapter file, iteration)
    data_parallel.check_start(world, model, start, accum_n)
    result = TrainResult(step=start)
    val = fixed_batches(val_set, cfg.batch_size, cfg.val_batches) if val_set and \
        cfg.val_batches != 0 else []
    batches = iterate_batches(train_set, cfg.batch_size, cfg.seed, start,
                              pack=cfg.max_seq_length if cfg.pack else 0)
    bar = _progress_bar(cfg, start, progress)
    say = bar.write if bar is not None else log

    def validate(it):
        tic = time.perf_counter()
        loss = data_parallel.evaluate(world, lambda b: evaluate(model, b), val,
                                      f"validation at iteration {it}")
        result.val_losses.append((it, loss))
        secs = time.perf_counter() - tic
        say(f"Iter {it}: val loss {loss:.3f}, val ppl {math.exp(min(loss, 50)):.3f}, "
            f"val took {secs:.2f}s")
        if callback is not None:
            callback.on_val_loss_report(reporting.val_info(it, loss, secs))
        if it and it % cfg.steps_per_eval == 0 and tracker.update(it, loss) \
                and cfg.save_best and cfg.adapter_path:
            say(f"Iter {it}: new best val loss, saved {best.save(model, cfg.adapter_path, it, loss)}")

    options = options or engine_options(cfg)
    model.train()
    if tracker.stop:
        say(f"Stopped early before iteration {start + 1}: {tracker.describe_stop()}")
        return TrainResult(step=start, best=(tracker.best_step, tracker.best),
                           stopped_early=True)
    if val and start == 0:
        validate(0)
    win = _Window()
    for it in range(start + 1, cfg.iters + 1):
        if monitor is not None:
            monitor.start_window()
        mx.random.seed(cfg.seed * 1_000_003 + it)      # dropout keys, MeZO seed: f(seed, it)
        batch = next(batches)
        tic = time.perf_counter()
        if cfg.method == "mezo":                       # in-place MeZO-SGD, no optimizer
            loss = data_parallel.mezo_step(world, model, batch, _lr(opt), cfg.mezo_eps,
                                           cfg.mezo_weight_decay, f"iteration {it}").loss
            bad = first_nonfinite(loss)
        else:
            loss, grads = data_parallel.value_and_grad(world, model, batch, cfg.method,
                                                       f"iteration {it}", options=options)
            loss = loss.item()
            bad = first_nonfinite(loss, grads)
            if bad is None:
                accum, accum_n = _accumulate(accum, accum_n, grads, batch, cfg)
            del grads
            if bad is None and it % cfg.grad_accumulation_steps == 0:
                g = accum if cfg.grad_accumulation_steps == 1 else \
                    tree_map(lambda x: x / accum_n, accum)
                opt.update(model, g)
                mx.eval(model.parameters(), opt.state)
                accum, accum_n = None, 0
        if bad is None and not all_finite(model.trainable_parameters()):
            bad = "the LoRA parameters (after the update)"
        if bad is not None:                            # stop before anything is saved
            if bar is not None:
                bar.close()
            raise divergence_error(bad, it, last_good, _lr(opt))
        result.step_seconds.append(time.perf_counter() - tic)
        result.step_losses.append(loss)
        rec = monitor.record(it, loss=loss) if monitor is not None else None
        win.add(loss, batch, rec)
        if bar is not None:
            bar.update(1)
        _clear_cache(cache_limit)
        if it % cfg.steps_per_report == 0 or it == cfg.iters:
            result.train_losses.append((it, win.loss / max(win.targets, 1)))
            say(_report(it, win, opt, monitor) +
                data_parallel.memory_max(world, win.rec, f"the report at iteration {it}"))
            trained += win.targets
            if callback is not None:
                callback.on_train_loss_report(reporting.train_info(
                    it, result.train_losses[-1][1], _lr(opt), win.iters, win.targets,
                    time.perf_counter() - win.t0, trained, mx.get_peak_memory()))
            win = _Window()
        if val and (it % cfg.steps_per_eval == 0 or it == cfg.iters):
            validate(it)
            _clear_cache(cache_limit)
            win.t0 = time.perf_counter()          # validation time is not training time
        stop = tracker.stop
        if cfg.adapter_path and (it % cfg.steps_per_save == 0 or it == cfg.iters or stop):
            snap = it % cfg.steps_per_save == 0
            result.adapter_file = str(_save(model, opt, cfg, it, accum, accum_n, snap,
                                            tracker.meta()))
            last_good = (result.adapter_file, it)
            say(("Saved adapters" if it == cfg.iters else f"Iter {it}: saved adapters")
                + f" to {result.adapter_file}"
                + (f" and {it:07d}_adapters.safetensors" if snap else ""))
        result.step = it
        if stop:
            say(f"Iter {it}: early stop: {tracker.describe_stop()}")
            result.stopped_early = True
            break
    if bar is not None:
        bar.close()
    if tracker.best is not None:
        result.best = (tracker.best_step, tracker.best)
    return result


def _learning_rate(cfg):
    """--learning-rate, or the schedule of lr_schedule / --warmup (schedules.py)."""
    return schedules.build(cfg.lr_schedule, cfg.learning_rate,
                           cfg.iters // cfg.grad_accumulation_steps, cfg.warmup,
                           cfg.warmup_init)


def _clear_cache(limit: int):
    """--clear-cache-threshold: free MLX's buffer cache when it holds more."""
    if limit and mx.get_cache_memory() > limit:
        mx.clear_cache()


def _accumulate(accum, n, grads, batch, cfg):
    """Token-weighted sum: Σ_b n_b·g_b, so accum / Σ n_b is the exact gradient
    of the mean loss over all targets of the accumulated batches."""
    if cfg.grad_accumulation_steps == 1:
        return grads, batch.n_targets
    w = float(batch.n_targets)
    scaled = tree_map(lambda g: g * w, grads)
    accum = scaled if accum is None else tree_map(lambda a, g: a + g, accum, scaled)
    mx.eval(accum)
    return accum, n + batch.n_targets


def _report(it, win, opt, monitor) -> str:
    dt = max(time.perf_counter() - win.t0, 1e-9)
    line = (f"Iter {it}: train loss {win.loss / max(win.targets, 1):.3f}, "
            f"lr {_lr(opt):.3e}, it/s {win.iters / dt:.3f}, tokens/s "
            f"{win.tokens / dt:.1f} processed, {win.targets / dt:.1f} trained")
    if monitor is not None and win.rec is not None:
        line += ", " + monitor.format(win.rec)
    else:
        line += f", peak mem {mx.get_peak_memory() / 2**20:.1f} MB"
    return line


def _save(model, opt, cfg, it, accum, accum_n, snapshot, extra=None):
    f = adapters.save_adapters(model, cfg.adapter_path, cfg.to_dict(), step=it,
                               snapshot=snapshot)
    pending = accum if accum_n else None
    meta = {"step": it, "seed": cfg.seed, "accum_targets": accum_n if pending else 0,
            **(extra or {})}
    adapters.save_state(f, opt, meta, pending)
    if snapshot:
        adapters.save_state(f.with_name(f"{it:07d}_{f.name}"), opt, meta, pending)
    return f


def _resume(model, opt, cfg, log):
    """(start iteration, accumulated grads, their target count)."""
    if not cfg.resume_adapter_file:
        return 0, None, 0
    f = adapters.find_adapter_file(cfg.resume_adapter_file)
    adapters.load_weights(model, f)
    state = adapters.load_state(f, opt)
    if state is None:
        log(f"Resuming from {f}: weights only (no optimizer state saved next to it); "
            "starting at iteration 1")
        return 0, None, 0
    meta, accum = state
    if accum is not None:           # back onto the full gradient tree (empty nodes too)
        flat = dict(tree_flatten(accum))
        accum = tree_map_with_path(lambda k, _: flat[k], model.trainable_parameters())
    if meta.get("seed") != cfg.seed:
        log(f"Warning: {f} was trained with --seed {meta.get('seed')}, now {cfg.seed}: "
            "the data order will differ from the interrupted run")
    log(f"Resuming from {f} at iteration {meta['step']} (adapters, optimizer state, "
        "data position and RNG restored)")
    mx.eval(opt.state)
    return int(meta["step"]), accum, int(meta.get("accum_targets", 0))


def _progress_bar(cfg, start, progress):
    """A tqdm bar on a terminal for runs longer than a few reports."""
    if progress is None:
        progress = sys.stderr.isatty() and cfg.iters - start >= 4 * cfg.steps_per_report
    if not progress:
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.iters, initial=start, unit="it", dynamic_ncols=True)
