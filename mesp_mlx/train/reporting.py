"""mlx-lm's TrainingCallback reports: the same hooks, the same keys.

    cb = callbacks(cfg.report_to, cfg.project_name, cfg.adapter_path, cfg.to_dict())
    cb.on_train_loss_report(train_info(...)); cb.on_val_loss_report(val_info(...))

`report_to` ("wandb", "swanlab", "wandb,swanlab") goes through mlx-lm's own
WandBCallback / SwanLabCallback, so dashboards look as they do with mlx_lm.lora.
"""

import importlib.util
from typing import Optional

from ..errors import ConfigError
SERVICES = ("wandb", "swanlab")


def _names(report_to: str) -> list:
    return [s.strip().lower() for s in report_to.split(",") if s.strip()]


def check_report_to(report_to: str) -> None:
    """ConfigError unless every service is known and its package installed."""

    for s in _names(report_to):
        if s not in SERVICES:
            raise ConfigError(f"--report-to {s!r} is not a known service; choose from "
                              f"{', '.join(SERVICES)} (comma-separated for both)")
        if importlib.util.find_spec(s) is None:
            raise ConfigError(f"--report-to {s} needs the {s} package: `pip install "
                              f"{s}` (or drop --report-to)")


def callbacks(report_to: Optional[str], project_name: Optional[str], log_dir: str,
              config: dict):
    """mlx-lm's chained reporting callback, or None when report_to is empty."""
    if not report_to:
        return None
    from pathlib import Path

    from mlx_lm.tuner.callbacks import get_reporting_callbacks

    check_report_to(report_to)
    log_dir = str(log_dir or "adapters")
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return get_reporting_callbacks(",".join(_names(report_to)),
                                   project_name=project_name or Path(log_dir).absolute().name,
                                   log_dir=log_dir, config=config)


def train_info(it: int, loss: float, lr: float, iters: int, targets: int,
               seconds: float, trained_tokens: int, peak_bytes: int) -> dict:
    """on_train_loss_report's dict, mlx-lm's keys and units (tokens = trained
    targets, as mlx-lm counts them; peak_memory in GB)."""
    seconds = max(seconds, 1e-9)
    return {"iteration": it, "train_loss": loss, "learning_rate": lr,
            "iterations_per_second": iters / seconds,
            "tokens_per_second": targets / seconds, "trained_tokens": trained_tokens,
            "peak_memory": peak_bytes / 1e9}


def val_info(it: int, loss: float, seconds: float) -> dict:
    """on_val_loss_report's dict: `iteration` = optimizer steps done before the
    validation (mlx-lm's value too)."""
    return {"iteration": it, "val_loss": loss, "val_time": seconds}
