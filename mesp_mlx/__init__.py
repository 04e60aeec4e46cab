"""mesp_mlx: exact-gradient LoRA fine-tuning for MLX at a fraction of the memory."""

from .engine import METHODS, value_and_grad
from .layers import LoRALinear, apply_lora

__all__ = ["apply_lora", "value_and_grad", "LoRALinear", "METHODS"]
__version__ = "0.1.0"
