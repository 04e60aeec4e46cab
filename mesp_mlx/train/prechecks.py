"""Cheap checks of a run, before the model loads (or downloads) and before any
file is written, so a typo costs a second and never half-rewrites an adapter
folder: paths, the budget, the data records, the resume file.

    early = before_loading(cfg)     # ConfigError / DataError / AdapterError
    ... load the model ...
    check_num_layers(model, cfg.num_layers)
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from ..memory import resolve_budget
from . import adapters, data, hf_data, preference_data
from .records import feature_renames
from .config import TrainConfig


@dataclass
class Early:
    budget: Optional[int]              # bytes, or None
    raw: dict                          # data.read_splits(...) of the needed splits
    resume: Optional[Path]             # the resume adapter file


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_dir(path, flag: str = "--adapter-path") -> Path:
    """`path` is, or can be created as, a directory this process can write."""
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a directory: pass a directory "
                          "for the adapters")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise ConfigError(f"{flag} {path} lies under {base}, which is a regular file: "
                          "pass a path inside a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {base} is not writable; pass a writable "
                          "directory (or fix its permissions)")
    return p


def check_writable_file(path, flag: str) -> Path:
    """`path` can be created or appended to (its directory exists and is writable)."""
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a directory: pass a file name")
    if not p.parent.is_dir():
        raise ConfigError(f"{flag} {path}: directory {p.parent} does not exist")
    if not os.access(p if p.exists() else p.parent, os.W_OK):
        raise ConfigError(f"{flag} {path} is not writable")
    return p


def before_loading(cfg: TrainConfig) -> Early:
    """Everything that needs neither the model nor the tokenizer."""
    try:
        budget = resolve_budget(cfg.memory_budget, cfg.device_profile)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    resume = None
    if cfg.train:
        if cfg.adapter_path:
            check_writable_dir(cfg.adapter_path)
        if cfg.memory_log:
            check_writable_file(cfg.memory_log, "--memory-log")
        if cfg.offload_checkpoints:
            check_writable_dir(cfg.offload_checkpoints, "--offload-checkpoints")
        if cfg.resume_adapter_file:
            resume = adapters.find_adapter_file(cfg.resume_adapter_file)
            adapters.read_safetensors(resume)          # readable (shapes: after_lora)
            adapters.read_state(resume)
    elif cfg.adapter_path and cfg.test:
        d = Path(cfg.adapter_path).expanduser()
        if not (d / adapters.CONFIG).is_file():
            raise adapters.AdapterError(
                f"{d / adapters.CONFIG} not found: --test without --train evaluates the "
                "adapters in --adapter-path (a directory written by training)")
    need = (("train",) if cfg.train else ()) + (("test",) if cfg.test else ())
    raw = read_data(cfg, need)
    preference_data.check_mode(raw, cfg.train_mode)
    return Early(budget, raw, resume)


def read_data(cfg: TrainConfig, need) -> dict:
    """data.read_splits of --data, or of mlx-lm's hf_dataset, with mlx-lm's
    *_feature record keys renamed to ours."""
    feats = {k: getattr(cfg, k) for k in hf_data.FEATURES if getattr(cfg, k)}
    if cfg.hf_dataset is not None:
        return hf_data.from_spec(cfg.hf_dataset, need, feats)
    rename = feature_renames(*(feats.get(k) for k in hf_data.FEATURES))
    return data.read_splits(cfg.data, need, rename)


def check_num_layers(model, num_layers: int) -> None:
    n = len(getattr(model, "layers", ()))
    if num_layers != -1 and num_layers > n:
        raise ConfigError(f"--num-layers {num_layers} is more than the model's {n} blocks; "
                          f"use -1 (all) or a number from 1 to {n}")
