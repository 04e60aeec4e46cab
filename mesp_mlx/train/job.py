"""The CLI's job, callable from Python: load the model and data, train and/or test.

    out = run(TrainConfig(model="demo", data="demo", train=True, iters=100))
    out["train"].train_losses, out["test_loss"], out["model"]

Order: every check that needs neither model nor tokenizer first (prechecks.py), so a
typo costs a second and never half-rewrites an adapter folder; then the model, the
tokenized data, LoRA, the pre-flight memory estimate (checked against a budget),
the training loop (which plans the activation memory) and the test.
"""

import math
import warnings
from pathlib import Path
from typing import Callable, Optional

from .. import log
from ..engine.batch import vocab_sizes
from ..engine.lora_layers import apply_lora, lora_layers
from ..engine.stream import resident_weight_bytes, streamed_weight_bytes
from ..errors import ConfigError, ModelLoadError
from ..memory import MemoryMonitor, preflight
from ..models import loading
from ..parallel import data_parallel, group
from ..units import MB
from . import adapters, data, loop, prechecks, preference, preference_data, reporting
from .config import GRAD_CHECKPOINT_NOTE, TrainConfig


def run(cfg: TrainConfig, log_fn: Optional[Callable] = None) -> dict:
    """Load model and data, train and/or test as `cfg` says; returns
    {"train": TrainResult or None, "test_loss": float or None, "model": model}
    (+ "test_metrics": reward accuracy and margin, with --train-mode dpo/orpo).
    log_fn: where progress lines go (None: print)."""
    cfg.validate()
    early = prechecks.before_loading(cfg)           # before any download or write
    world = group.init(cfg.dist_timeout)
    with log.to(log_fn if world.is_main else log.silent):
        if world.size > 1:
            log.say(world.describe())
            data_parallel.check_batch_size(world, cfg.batch_size)
        return _run(cfg, early, world)


def _run(cfg, early, world) -> dict:
    import mlx.core as mx

    if cfg.grad_checkpoint:
        log.say(GRAD_CHECKPOINT_NOTE + f" (method: {cfg.method})")
    try:
        model, tokenizer, _ = loading.load_model(cfg.model, log=log.say,
                                                 trust_remote_code=cfg.trust_remote_code,
                                                 stream_weights=cfg.stream_weights)
    except (KeyError, TypeError) as e:        # mlx-lm's ModelArgs from a bad config.json
        what = f"the key {e.args[0]!r} is missing" if isinstance(e, KeyError) else str(e)
        raise ModelLoadError(f"{cfg.model}: its config.json does not describe a model "
                             f"mlx-lm can build ({what})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("always", data.TruncationWarning)
        warnings.showwarning = lambda msg, *a, **k: log.say(f"Warning: {msg}")
        if cfg.train_mode in preference_data.MODES:
            splits = preference_data.tokenize_splits(early.raw, tokenizer,
                                                     cfg.max_seq_length,
                                                     _vocab(vocab_sizes(model)))
        else:
            splits = data.tokenize_splits(early.raw, tokenizer, cfg.max_seq_length,
                                          cfg.mask_prompt, _vocab(vocab_sizes(model)))
    _check_positions(model, splits, cfg.max_seq_length)
    out = {"train": None, "test_loss": None, "model": model}
    if cfg.train:
        mx.random.seed(cfg.seed)
        _apply_lora(model, cfg)
        if early.resume is not None:                # fully, before touching the folder
            adapters.check_resume(model, early.resume)
        n = sum(v.size for v in adapters.adapter_weights(model).values())
        log.say(f"Trainable LoRA parameters: {n / 1e6:.3f} M "
                f"(rank {cfg.rank}, scale {cfg.scale})")
        if splits["valid"] is None:
            log.say("Warning: no valid.jsonl: training without validation")
        mine = data_parallel.rank_options(world, cfg)        # rank 0 alone writes
        T = data.longest_row(splits["train"], cfg.max_seq_length, cfg.pack)
        monitor = _memory(model, mine, early.budget, T)
        if world.size > 1:
            log.say(data_parallel.describe(world, model, cfg.batch_size, cfg.method))
        callback = None
        if world.is_main:
            config_file = adapters.save_config(model, cfg.adapter_path, cfg.to_dict())
            log.say(f"Options saved to {config_file}")
            callback = reporting.callbacks(cfg.report_to, cfg.project_name,
                                           cfg.adapter_path, cfg.to_dict())
        with monitor:
            out["train"] = loop.train(model, splits["train"], splits["valid"], mine,
                                      monitor=monitor, world=world,
                                      progress=None if world.is_main else False,
                                      callback=callback)
        log.say(monitor.summary())
        if world.size > 1:
            log.say(data_parallel.memory_summary(world, monitor))
        if mine.memory_log:
            _plot(monitor, mine.memory_log)
    elif cfg.adapter_path:
        adapters.load_adapter_dir(model, cfg.adapter_path)
        log.say(f"Loaded adapters from {cfg.adapter_path}")
    if cfg.test:
        batches = data.fixed_batches(splits["test"], cfg.batch_size, cfg.test_batches)
        loss, metrics = loop.measure(world, model, cfg, batches, "the test")
        out["test_loss"] = loss
        if metrics:
            out["test_metrics"] = metrics
            log.say(f"Test loss {loss:.3f}, {preference.describe(metrics, 'test ')}.")
        else:
            log.say(f"Test loss {loss:.3f}, Test ppl {math.exp(min(loss, 50)):.3f}.")
    return out


def _check_positions(model, splits, max_seq_length):
    """Fail clearly if a (truncated) sequence is longer than the model supports."""
    limit = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    longest = max((len(t) - 1 for ds in splits.values() if ds is not None
                   for t in ds.tokens), default=0)
    if limit and longest > limit:
        raise ConfigError(f"a sequence of {longest} tokens is longer than the model "
                          f"supports (max_position_embeddings {limit}); use "
                          f"--max-seq-length {limit} or less")


def _vocab(sizes):
    known = [v for v in sizes if v]
    return min(known) if known else None


def _apply_lora(model, cfg):
    """apply_lora with the CLI's names in its errors."""
    prechecks.check_num_layers(model, cfg.num_layers)
    try:
        apply_lora(model, cfg.rank, cfg.scale, cfg.dropout, keys=cfg.lora_keys,
                   num_layers=None if cfg.num_layers == -1 else cfg.num_layers,
                   dtype=cfg.lora_dtype)
    except ValueError as e:
        raise ConfigError(f"cannot apply LoRA: {e}") from None
    path, d = min(((p, min(m.lora_a.shape[0], m.lora_b.shape[1]))
                   for p, m in lora_layers(model)), key=lambda t: t[1], default=(None, 0))
    if path is not None and cfg.rank > d:
        raise ConfigError(f"--rank {cfg.rank} is larger than the smallest adapted "
                          f"dimension ({d}, {path}): a rank above it adds parameters "
                          f"but no expressiveness; use --rank {d} or less")


def _memory(model, cfg, budget, T):
    """The pre-flight estimate at the longest row T, checked against the budget
    (MemoryBudgetError), and the monitor."""
    try:
        est = preflight(model, cfg.method, T, cfg.batch_size, budget,
                        optimizer=cfg.optimizer, rank=cfg.rank,
                        checkpoints="disk" if cfg.offload_checkpoints else "memory")
    except ValueError as e:          # a family the estimate does not model
        raise ConfigError(str(e)) from None
    log.say(f"Memory estimate (longest batch T={T}, B={cfg.batch_size}):\n{est}")
    if budget:
        log.say(f"Memory budget {budget / MB:.0f} MB, enforced with mx.set_memory_limit")
    return MemoryMonitor(log_path=cfg.memory_log, budget_bytes=budget,
                         weights_bytes=resident_weight_bytes(model),
                         streamed_bytes=streamed_weight_bytes(model))


def _plot(monitor, memory_log):
    png = Path(memory_log).with_suffix(".png")
    why = monitor.plot(str(png))
    log.say(f"Memory plot: {png}" if why is None else f"No memory plot: {why}")
