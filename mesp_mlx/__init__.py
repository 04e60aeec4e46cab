"""mesp_mlx: exact-gradient LoRA fine-tuning for MLX at a fraction of the memory."""

from .engine.step import METHODS, value_and_grad
from .engine.preference import preference_value_and_grad
from .engine.plan import EngineOptions
from .engine.lora_layers import LoRALinear, apply_lora
from .engine.mezo import mezo_gradient_estimate
from .engine.stream import stream_weights

# training API (notebooks): the CLI's job is run(TrainConfig(...)); the parts below
from .train.adapters import load_adapter_dir, save_adapters
from .train.config import TrainConfig
from .train.data import fixed_batches, iterate_batches, load_splits
from .models.loading import load_model
from .train import job
from .train.loop import TrainResult, evaluate, train

__all__ = ["apply_lora", "value_and_grad", "EngineOptions", "LoRALinear", "METHODS",
           "mezo_gradient_estimate", "preference_value_and_grad",
           "TrainConfig", "run", "train", "evaluate", "TrainResult", "load_model",
           "load_splits", "iterate_batches", "fixed_batches", "save_adapters",
           "load_adapter_dir", "stream_weights"]
__version__ = "0.1.0"


def run(config: TrainConfig, log=None) -> dict:
    """The `python -m mesp_mlx.lora` job from Python (train/job.py); log: where
    progress lines go (None: print)."""
    return job.run(config, log)
