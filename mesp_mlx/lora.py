"""`python -m mesp_mlx.lora`: LoRA fine-tuning with mlx-lm's flags and files.

    python -m mesp_mlx.lora --model Qwen2.5-0.5B --train --data ./data
    python -m mesp_mlx.lora --model Qwen2.5-0.5B --test --data ./data --adapter-path adapters

`run(config)` is the same job from Python (a notebook): it returns the
training result and test loss instead of printing only.
"""

import argparse
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

from .train.config import GRAD_CHECKPOINT_NOTE, TrainConfig, add_arguments, resolve
from .errors import ConfigError, Parser, UserError

from .memory import MemoryBudgetError
from .engine.safetensors_io import WeightsFileError

EPILOG = """\
methods: mesp = per-block recompute + hand-derived backward (least memory),
mebp = per-block checkpointing, autodiff = plain MLX autodiff (the reference);
all three give the same gradients. mezo = MeZO (zeroth-order SPSA): two
forward passes per step at inference memory, but only a gradient estimate, so
it converges far slower (paper, LoRA: --learning-rate 1e-4 or 5e-5,
--mezo-eps 1e-2). Options may also come from a YAML file
(--config), with the same names as the flags (CLI > YAML > defaults); an
mlx-lm LoRA YAML file works as is. Adapters are mlx-lm's files: use them with
`mlx_lm.generate --adapter-path` or `mlx_lm.fuse`."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m mesp_mlx.lora",
        description="Fine-tune an LLM with LoRA at minimal peak memory, exact gradients.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(parser)


def run(cfg: TrainConfig, log=print) -> dict:
    """Load model and data, train and/or test as `cfg` says; returns
    {"train": TrainResult or None, "test_loss": float or None, "model": model}."""
    import mlx.core as mx

    from .train import adapters, prechecks as checks, data, reporting, loop as trainer
    from .parallel import data_parallel, group as distributed
    from .models import loading as models
    from .engine.batch import vocab_sizes

    cfg.validate()
    if cfg.train:
        trainer.check_method(cfg.method)
    early = checks.before_loading(cfg)              # before any download or write
    world = distributed.init(cfg.dist_timeout)
    if world.size > 1:
        log = log if world.is_main else _quiet
        log(world.describe())
        data_parallel.check_batch_size(world, cfg.batch_size)
    log("Options:\n" + cfg.describe())
    if cfg.grad_checkpoint:
        log(GRAD_CHECKPOINT_NOTE + f" (method: {cfg.method})")
    model, tokenizer, resolved = models.load_model(cfg.model, log=log,
                                                   trust_remote_code=cfg.trust_remote_code,
                                                   stream_weights=cfg.stream_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("always", data.TruncationWarning)
        warnings.showwarning = lambda msg, *a, **k: log(f"Warning: {msg}")
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
        log(f"Trainable LoRA parameters: {n / 1e6:.3f} M "
            f"(rank {cfg.rank}, scale {cfg.scale})")
        if splits["valid"] is None:
            log("Warning: no valid.jsonl: training without validation")
        longest = max((len(t) - 1 for t in splits["train"].tokens), default=1)
        mine = data_parallel.rank_options(world, cfg)        # rank 0 alone writes
        T = min(cfg.max_seq_length, max(longest, 1))
        if cfg.pack:                                 # rows of up to max_seq_length
            T = min(cfg.max_seq_length, sum(len(t) - 1 for t in splits["train"].tokens))
        monitor, est = _memory(model, mine, early.budget, log, T)
        options = _activation_plan(model, cfg, early.budget, est, T, log)
        if world.size > 1:
            log(data_parallel.describe(world, model, cfg.batch_size, cfg.method))
        callback = None
        if world.is_main:
            config_file = adapters.save_config(model, cfg.adapter_path, cfg.to_dict())
            log(f"Resolved options saved to {config_file}")
            callback = reporting.callbacks(cfg.report_to, cfg.project_name,
                                           cfg.adapter_path, cfg.to_dict())
        with monitor:
            out["train"] = trainer.train(model, splits["train"], splits["valid"], mine,
                                         monitor=monitor, log=log, world=world,
                                         progress=None if world.is_main else False,
                                         options=options, callback=callback)
        log(monitor.summary())
        if world.size > 1:
            log(data_parallel.memory_summary(world, monitor))
        if mine.memory_log:
            _plot(monitor, mine.memory_log, log)
    elif cfg.adapter_path:
        adapters.load_adapter_dir(model, cfg.adapter_path)
        log(f"Loaded adapters from {cfg.adapter_path}")
    if cfg.test:
        batches = data.fixed_batches(splits["test"], cfg.batch_size, cfg.test_batches)
        loss = data_parallel.evaluate(world, lambda b: trainer.evaluate(model, b),
                                      batches, "the test")
        out["test_loss"] = loss
        log(f"Test loss {loss:.3f}, Test ppl {math.exp(min(loss, 50)):.3f}.")
    return out


def _quiet(*_args, **_kw):
    """The log of ranks other than 0: rank 0 alone reports."""


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
    from .train.prechecks import check_num_layers
    from .engine.lora_layers import apply_lora

    check_num_layers(model, cfg.num_layers)
    try:
        apply_lora(model, cfg.rank, cfg.scale, cfg.dropout, keys=cfg.lora_keys,
                   num_layers=None if cfg.num_layers == -1 else cfg.num_layers,
                   dtype=cfg.lora_dtype)
    except ValueError as e:
        raise ConfigError(f"cannot apply LoRA: {e}") from None


def _memory(model, cfg, budget, log, T):
    """Pre-flight estimate at the longest batch T (raises MemoryBudgetError)
    and the monitor."""
    from .memory import MemoryMonitor, preflight

    try:
        est = preflight(model, cfg.method, T, cfg.batch_size, budget,
                        optimizer=cfg.optimizer, rank=cfg.rank,
                        checkpoints="disk" if cfg.offload_checkpoints else "memory")
    except ValueError as e:          # a family the estimate does not model
        raise ConfigError(str(e)) from None
    log(f"Memory estimate (longest batch T={T}, B={cfg.batch_size}):\n{est}")
    if budget:
        log(f"Memory budget {budget / 1e6:.0f} MB, enforced with mx.set_memory_limit")
    from .engine.stream import resident_weight_bytes, streamed_weight_bytes
    return MemoryMonitor(log_path=cfg.memory_log, budget_bytes=budget,
                         weights_bytes=resident_weight_bytes(model),
                         streamed_bytes=streamed_weight_bytes(model)), est


SAFETY = 0.10      # of the budget, left free for what the pre-flight estimate misses


def _activation_plan(model, cfg, budget, est, T, log):
    """EngineOptions for training: with a budget, mesp spends the headroom left
    after the minimal schedule's estimate (less SAFETY) on wider token chunks, then
    on blocks that keep their forward tensors and skip the recompute
    (EngineOptions.activation_budget; schedule.planned)."""
    import mlx.core as mx

    from .engine.plan import describe_plan, planned
    from .engine.walk import model_spec
    from .train.loop import engine_options

    opts = engine_options(cfg)
    if not budget or cfg.method != "mesp":
        return opts
    spare = int(budget * (1 - SAFETY) - est.total_bytes)
    opts.activation_budget = max(0, spare)
    spec = model_spec(model, "mesp", T, opts)
    itemsize = spec.embed_ids(mx.zeros((1, 1), mx.int32)).dtype.size
    plan, _, rows = planned(spec, opts, cfg.batch_size, T, itemsize)
    log(f"{describe_plan(plan, len(spec.blocks), rows)} at T={T}: "
        f"budget {budget / 1e6:.0f} MB − estimate {est.total_bytes / 1e6:.0f} MB − "
        f"{SAFETY:.0%} margin = {max(0, spare) / 1e6:.0f} MB to spend")
    return opts


def _plot(monitor, memory_log, log):
    png = Path(memory_log).with_suffix(".png")
    why = monitor.plot(str(png))
    log(f"Memory plot: {png}" if why is None else f"No memory plot: {why}")


def main(argv: Optional[list] = None) -> int:
    """CLI entry point; returns the exit status (user errors: 1, no traceback)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    cfg_path = args.config
    try:
        cfg = resolve(vars(args), cfg_path)
        run(cfg)
    except (UserError, MemoryBudgetError, WeightsFileError) as e:
        from .parallel.group import where
        print(f"error{where()}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; resume with --resume-adapter-file "
              f"{getattr(args, 'adapter_path', None) or 'adapters'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
