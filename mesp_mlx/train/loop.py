"""The training loop: engine gradients, optimizer, reports, saves, resume.

    result = train(model, train_set, val_set, TrainConfig(...))   # model has LoRA
    loss = evaluate(model, fixed_batches(test_set, 4, -1))

One iteration: draw the batch, run the step chosen once for the method (an exact
gradient accumulated token-weighted and applied every --grad-accumulation-steps,
MeZO's in-place update, or with --train-mode dpo/orpo a preference step on pairs,
preference.py), guard against divergence, then report, validate and save on their
schedules. Iteration k's batch and dropout mask are pure functions of
(seed, k), and the optimizer state and pending accumulated gradients are saved with
the adapters, so a resumed run replays the uninterrupted run's losses exactly.
Without `options`, train() plans the activation memory as the CLI does
(memory/plan.py).
"""

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from .. import log
from ..engine.batch import Batch
from ..engine.plan import EngineOptions
from ..engine.walk import loss_sum
from ..errors import ConfigError
from ..memory import plan, preflight, resolve_budget
from ..parallel import data_parallel
from ..parallel.group import World
from ..units import MB
from . import adapters, early_stop, lr_schedules, preference, reporting
from .config import TrainConfig
from .data import Dataset, fixed_batches, iterate_batches, longest_row
from .divergence import all_finite, divergence_error, first_nonfinite


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
    val_metrics: List[tuple] = field(default_factory=list)    # (iteration, preference
                                                              # {reward_acc, margin})


class SGD(optim.SGD):
    """mlx's SGD, keeping no state without momentum: its velocity buffer (one zero
    tensor per LoRA parameter) is never read when momentum is 0, yet would stay
    allocated for the whole run."""

    def init_single(self, parameter: mx.array, state: dict):
        if self.momentum > 0:
            super().init_single(parameter, state)


def build_optimizer(name: str, learning_rate, extra: Optional[dict] = None):
    classes = {"sgd": SGD, "adam": optim.Adam, "adamw": optim.AdamW,
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


def engine_options(cfg: TrainConfig) -> EngineOptions:
    """The schedule knobs a TrainConfig sets (--offload-checkpoints DIR)."""
    if not cfg.offload_checkpoints:
        return EngineOptions()
    d = os.path.expanduser(cfg.offload_checkpoints)
    os.makedirs(d, exist_ok=True)
    return EngineOptions(checkpoints="disk", checkpoint_dir=d)


# ---------------------------------------------------------------- evaluation

def evaluate(model, batches: List[Batch], progress=None) -> float:
    """Token-weighted mean loss over `batches` (dropout off): the engine's forward
    walk and tiled loss head, never the full [B, T, V] logits."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for batch in batches:
        total += loss_sum(model, batch.inputs, batch.targets, batch.mask)
        n += batch.n_targets
        if progress is not None:
            progress()
    model.train(was_training)
    return total / max(n, 1)


def measure(world: World, model, cfg: TrainConfig, batches: List, what: str) -> tuple:
    """(mean loss, preference metrics or None) of fixed batches over the ranks."""
    if cfg.train_mode != "sft":
        return preference.evaluate(world, model, batches, cfg, what)
    return data_parallel.evaluate(world, lambda b: evaluate(model, b), batches, what), None


# ---------------------------------------------------------------- step helpers

class Accumulator:
    """Token-weighted gradient sum over the batches of one optimizer update:
    Σ n_b·g_b / Σ n_b is the exact gradient of the mean loss over all their targets
    (n_b: pairs for a preference objective, a mean over pairs). With one batch per
    update the gradient is used as it is. `apply` updates and drops every gradient,
    so nothing of this step stays alive into the next."""

    def __init__(self, every: int = 1, grads=None, n: int = 0):
        self.every, self.grads, self.n = every, grads, n

    def add(self, grads, n_targets: int):
        if self.every == 1:
            self.grads, self.n = grads, n_targets
            return
        w = float(n_targets)
        scaled = tree_map(lambda g: g * w, grads)
        self.grads = scaled if self.grads is None else \
            tree_map(lambda a, g: a + g, self.grads, scaled)
        self.n += n_targets
        mx.eval(self.grads)

    def take(self, loss: float, grads, n: int, it: int, optimizer, model):
        """One step's gradients: added unless the loss or a gradient is not finite,
        applied every `every` iterations; returns what was not finite, or None."""
        bad = first_nonfinite(loss, grads)
        if bad is None:
            self.add(grads, n)
        del grads
        if bad is None and it % self.every == 0:
            self.apply(optimizer, model)
        return bad

    def apply(self, optimizer, model):
        g = self.grads if self.every == 1 else \
            tree_map(lambda x: x / max(self.n, 1), self.grads)
        self.grads, self.n = None, 0
        optimizer.update(model, g)
        del g
        mx.eval(model.parameters(), optimizer.state)

    @property
    def pending(self):
        """The accumulated sum to save with the adapters (None when empty)."""
        return self.grads if self.n else None


def learning_rate(optimizer) -> float:
    lr = optimizer.learning_rate
    return lr.item() if isinstance(lr, mx.array) else float(lr)


def clear_cache(limit: int):
    """--clear-cache-threshold: free MLX's buffer cache when it holds more."""
    if limit and mx.get_cache_memory() > limit:
        mx.clear_cache()


def make_step(cfg: TrainConfig, model, optimizer, world: World, options: EngineOptions,
              accum: Accumulator) -> Callable:
    """step(batch, it) -> (loss, what diverged or None, metrics or None), chosen once
    for the method: an exact gradient (applied every --grad-accumulation-steps),
    MeZO's update, or a preference objective's (reward accuracy and margin)."""
    if cfg.train_mode != "sft":
        return preference.make_step(cfg, model, optimizer, world, options, accum)
    if cfg.method == "mezo":
        def mezo(batch, it):
            loss = data_parallel.mezo_step(world, model, batch, learning_rate(optimizer),
                                           cfg.mezo_eps, cfg.mezo_weight_decay,
                                           f"iteration {it}").loss
            return loss, first_nonfinite(loss), None
        return mezo

    def exact(batch, it):
        loss, grads = data_parallel.value_and_grad(world, model, batch, cfg.method,
                                                   f"iteration {it}", options=options)
        loss = loss.item()
        return loss, accum.take(loss, grads, batch.n_targets, it, optimizer, model), None
    return exact


class _Window:
    """Counters between two reports."""

    def __init__(self):
        self.loss = self.targets = self.tokens = self.iters = self.weight = 0
        self.t0 = time.perf_counter()
        self.rec = None           # last memory record, peaks maxed over the window
        self.metrics = {}         # preference metrics, weighted like the loss

    def add(self, loss, batch, rec, metrics=None):
        w = getattr(batch, "n_pairs", batch.n_targets)    # the loss's mean is over these
        self.loss += loss * w
        self.weight += w
        for k, v in (metrics or {}).items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v * w
        self.targets += batch.n_targets
        self.tokens += batch.n_tokens
        self.iters += 1
        if rec is not None:
            prev, self.rec = self.rec or {}, dict(rec)
            for k, pick in (("mlx_peak", max), ("footprint_peak", max), ("headroom", min)):
                vals = [v for v in (prev.get(k), rec.get(k)) if v is not None]
                if vals:
                    self.rec[k] = pick(vals)

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.weight, 1)

    def line(self, it, optimizer, monitor) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        extra = preference.describe({k: v / max(self.weight, 1) for k, v in
                                     self.metrics.items()}) + ", " if self.metrics else ""
        line = (f"Iter {it}: train loss {self.mean_loss:.3f}, {extra}"
                f"lr {learning_rate(optimizer):.3e}, it/s {self.iters / dt:.3f}, tokens/s "
                f"{self.tokens / dt:.1f} processed, {self.targets / dt:.1f} trained")
        if monitor is not None and self.rec is not None:
            return line + ", " + monitor.format(self.rec)
        return line + f", peak mem {mx.get_peak_memory() / MB:.1f} MB"


# ---------------------------------------------------------------- the loop

def train(model: nn.Module, train_set: Dataset, val_set: Optional[Dataset] = None,
          config: Optional[TrainConfig] = None, optimizer=None, monitor=None,
          log: Optional[Callable] = None, progress: Optional[bool] = None,
          world: Optional[World] = None, options: Optional[EngineOptions] = None,
          callback=None) -> TrainResult:
    """Train the LoRA parameters of `model` for config.iters iterations.

    Resumes from config.resume_adapter_file; saves to config.adapter_path
    (None: no files). monitor: a mesp_mlx.memory.MemoryMonitor (its peak is
    reset per iteration; reports show the window's maximum) or None.
    world: a data-parallel group (mesp_mlx.parallel.group); each rank trains on
    its rows of every global batch (None: one process). options: the engine's
    schedule (None: planned from this device's memory, as the CLI plans).
    callback: an mlx-lm TrainingCallback (on_train_loss_report /
    on_val_loss_report, mlx-lm's keys); --report-to builds one.
    log: where progress lines go (None: print; mesp_mlx.log).
    """
    cfg = (config or TrainConfig(train=True)).check_options()
    with _log_to(log):
        return _Run(model, cfg, train_set, val_set, optimizer, monitor, progress,
                    world or World(), options, callback).run()


_log_to = log.to


class _Run:
    """One call of train(): the state its helpers share."""

    def __init__(self, model, cfg, train_set, val_set, optimizer, monitor, progress, world,
                 options, callback):
        self.model, self.cfg, self.world, self.monitor = model, cfg, world, monitor
        self.callback = callback
        data_parallel.check_batch_size(world, cfg.batch_size)
        if len(train_set) < cfg.batch_size and not cfg.pack:
            raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the training "
                              f"set ({len(train_set)} examples): use --batch-size "
                              f"{max(1, len(train_set))} or more data")
        self.opt = optimizer or build_optimizer(cfg.optimizer, _lr_schedule(cfg),
                                                (cfg.optimizer_config or {}).get(cfg.optimizer))
        if cfg.method == "mezo":
            log.say(f"MeZO: SGD update θ -= lr·(p·z + {cfg.mezo_weight_decay}·θ), eps "
                    f"{cfg.mezo_eps}; the optimizer is unused; train loss = (L(θ+εz) + "
                    "L(θ-εz))/2, an O(eps²) overestimate of L(θ)")
        self.start, accum, accum_n = _resume(model, self.opt, cfg)
        if cfg.method != "mezo":        # the state exists from step 1, as at every later step
            self.opt.init(model.trainable_parameters())
            mx.eval(self.opt.state)
        self.accum = Accumulator(cfg.grad_accumulation_steps, accum, accum_n)
        self.tracker = early_stop.Tracker.of(cfg)
        if self.tracker.active and not (val_set and cfg.val_batches != 0):
            raise ConfigError("--save-best and --early-stop-patience need validation "
                              "data (valid.jsonl) and --val-batches other than 0")
        if cfg.resume_adapter_file and self.start:
            self.tracker.restore(adapters.read_state(cfg.resume_adapter_file)[0])
        self.last_good = (str(adapters.find_adapter_file(cfg.resume_adapter_file)),
                          self.start) if cfg.resume_adapter_file else None
        data_parallel.check_start(world, model, self.start, accum_n)
        self.result = TrainResult(step=self.start)
        self.val = fixed_batches(val_set, cfg.batch_size, cfg.val_batches) \
            if val_set and cfg.val_batches != 0 else []
        self.batches = iterate_batches(train_set, cfg.batch_size, cfg.seed, self.start,
                                       pack=cfg.max_seq_length if cfg.pack else 0)
        if options is None:
            options = _plan(model, cfg, longest_row(train_set, cfg.max_seq_length,
                                                    cfg.pack))
        self.step = make_step(cfg, model, self.opt, world, options, self.accum)
        self.bar = _progress_bar(cfg, self.start, progress)
        self.cache_limit, self.trained = cfg.clear_cache_bytes(), 0

    def run(self) -> TrainResult:
        cfg, model = self.cfg, self.model
        model.train()
        if self.tracker.stop:
            log.say(f"Stopped early before iteration {self.start + 1}: "
                    f"{self.tracker.describe_stop()}")
            return TrainResult(step=self.start, stopped_early=True,
                               best=(self.tracker.best_step, self.tracker.best))
        with log.to(self.bar.write if self.bar is not None else None):
            try:
                if self.val and self.start == 0:
                    self.validate(0)
                self.window = _Window()
                for it in range(self.start + 1, cfg.iters + 1):
                    if self.iteration(it):
                        break
            finally:
                if self.bar is not None:
                    self.bar.close()
        if self.tracker.best is not None:
            self.result.best = (self.tracker.best_step, self.tracker.best)
        return self.result

    def iteration(self, it: int) -> bool:
        """One training iteration and what is due after it; True to stop."""
        cfg = self.cfg
        if self.monitor is not None:
            self.monitor.start_window()
        mx.random.seed(cfg.seed * 1_000_003 + it)     # dropout keys, MeZO seed: f(seed, it)
        batch = next(self.batches)
        tic = time.perf_counter()
        loss, bad, metrics = self.step(batch, it)
        if bad is None and not all_finite(self.model.trainable_parameters()):
            bad = "the LoRA parameters (after the update)"
        if bad is not None:                            # stop before anything is saved
            raise divergence_error(bad, it, self.last_good, learning_rate(self.opt))
        self.result.step_seconds.append(time.perf_counter() - tic)
        self.result.step_losses.append(loss)
        rec = self.monitor.record(it, loss=loss) if self.monitor is not None else None
        self.window.add(loss, batch, rec, metrics)
        del batch
        if self.bar is not None:
            self.bar.update(1)
        clear_cache(self.cache_limit)
        if it % cfg.steps_per_report == 0 or it == cfg.iters:
            self.report(it)
        if self.val and (it % cfg.steps_per_eval == 0 or it == cfg.iters):
            self.validate(it)
            clear_cache(self.cache_limit)
            self.window.t0 = time.perf_counter()       # validation time is not training time
        stop = self.tracker.stop
        if cfg.adapter_path and (it % cfg.steps_per_save == 0 or it == cfg.iters or stop):
            self.save(it)
        self.result.step = it
        if stop:
            log.say(f"Iter {it}: early stop: {self.tracker.describe_stop()}")
            self.result.stopped_early = True
        return stop

    def report(self, it: int):
        w = self.window
        self.result.train_losses.append((it, w.mean_loss))
        log.say(w.line(it, self.opt, self.monitor) + data_parallel.memory_max(
            self.world, w.rec, f"the report at iteration {it}"))
        self.trained += w.targets
        if self.callback is not None:
            self.callback.on_train_loss_report(reporting.train_info(
                it, self.result.train_losses[-1][1], learning_rate(self.opt), w.iters,
                w.targets, time.perf_counter() - w.t0, self.trained, mx.get_peak_memory()))
        self.window = _Window()

    def validate(self, it: int):
        cfg, tic = self.cfg, time.perf_counter()
        loss, metrics = measure(self.world, self.model, cfg, self.val,
                                f"validation at iteration {it}")
        self.result.val_losses.append((it, loss))
        if metrics:
            self.result.val_metrics.append((it, metrics))
        secs = time.perf_counter() - tic
        shown = max(it, 1)                  # as mlx-lm: the first validation is "Iter 1"
        extra = preference.describe(metrics, "val ") if metrics else \
            f"val ppl {math.exp(min(loss, 50)):.3f}"
        log.say(f"Iter {shown}: val loss {loss:.3f}, {extra}, val took {secs:.2f}s")
        if self.callback is not None:
            self.callback.on_val_loss_report(reporting.val_info(it, loss, secs))
        if it and it % cfg.steps_per_eval == 0 and self.tracker.update(it, loss) \
                and cfg.save_best and cfg.adapter_path:
            f = early_stop.save(self.model, cfg.adapter_path, it, loss)
            log.say(f"Iter {it}: new best val loss, saved {f}")

    def save(self, it: int):
        cfg = self.cfg
        snap = it % cfg.steps_per_save == 0
        f = adapters.save_adapters(self.model, cfg.adapter_path, cfg.to_dict(), step=it,
                                   snapshot=snap)
        pending = self.accum.pending
        meta = {"step": it, "seed": cfg.seed, "accum_targets": self.accum.n if pending else 0,
                **self.tracker.meta()}
        adapters.save_state(f, self.opt, meta, pending)
        if snap:
            adapters.save_state(f.with_name(f"{it:07d}_{f.name}"), self.opt, meta, pending)
        self.result.adapter_file = str(f)
        self.last_good = (self.result.adapter_file, it)
        log.say(("Saved adapters" if it == cfg.iters else f"Iter {it}: saved adapters")
                + f" to {f}" + (f" and {it:07d}_adapters.safetensors" if snap else ""))


def _plan(model, cfg: TrainConfig, T: int) -> EngineOptions:
    """The activation plan a run without explicit options gets (memory/plan.py)."""
    base = engine_options(cfg)
    if cfg.method != "mesp":
        return base
    budget = resolve_budget(cfg.memory_budget, cfg.device_profile)
    est = preflight(model, cfg.method, T, cfg.batch_size, None, optimizer=cfg.optimizer,
                    rank=cfg.rank, checkpoints="disk" if cfg.offload_checkpoints else "memory")
    why = (" (--activation-plan minimal)" if cfg.activation_plan == "minimal" else
           " (weights streamed and no budget: --memory-budget buys speed)"
           if cfg.stream_weights and not budget else "")
    options, line = plan.plan_options(model, cfg.method, cfg.batch_size, T,
                                      est.total_bytes, base, budget, bool(why), why)
    if line:
        log.say(line)
    return options


def _lr_schedule(cfg):
    """--learning-rate, or the schedule of lr_schedule / --warmup (lr_schedules.py)."""
    return lr_schedules.build(cfg.lr_schedule, cfg.learning_rate,
                              cfg.iters // cfg.grad_accumulation_steps, cfg.warmup,
                              cfg.warmup_init)


def _resume(model, opt, cfg):
    """(start iteration, accumulated grads, their target count)."""
    if not cfg.resume_adapter_file:
        return 0, None, 0
    f = adapters.find_adapter_file(cfg.resume_adapter_file)
    adapters.load_weights(model, f)
    state = adapters.load_state(f, opt)
    if state is None:
        log.say(f"Resuming from {f}: weights only (no optimizer state saved next to it); "
                "starting at iteration 1")
        return 0, None, 0
    meta, accum = state
    if accum is not None:           # back onto the full gradient tree (empty nodes too)
        flat = dict(tree_flatten(accum))
        accum = tree_map_with_path(lambda k, _: flat[k], model.trainable_parameters())
    if meta.get("seed") != cfg.seed:
        log.say(f"Warning: {f} was trained with --seed {meta.get('seed')}, now {cfg.seed}: "
                "the data order will differ from the interrupted run")
    log.say(f"Resuming from {f} at iteration {meta['step']} (adapters, optimizer state, "
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
