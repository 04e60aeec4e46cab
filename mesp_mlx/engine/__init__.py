"""The engine: one step's loss and exact LoRA gradients, block by block.

    loss, grads = value_and_grad(model, inputs, targets, mask, method="mesp")

step.py (the entry) -> backprop.py (the per-block driver) -> walk.py (the forward
walk) -> block.py (one generic block, forward and hand backward, from spec.py's
BlockSpec, read by families.py and checked by verify.py) -> ../ops (the math).
A block's token mixer is attention (block.py), a gated DeltaNet (deltanet.py) or a
short conv (short_conv.py); block_parts.py holds what they share (projections with
LoRA, token chunks, the MLP half); links.py carries what one block hands another
(shared K, V; per-layer inputs). plan.py spends an activation budget; stream.py,
checkpoints.py and packing.py are what a block reads its weights from, where its
input waits, and packed rows.
preference.py runs DPO/ORPO (objectives.py) as weighted token sums of the same step.
"""

from .lora_layers import LoRALinear, apply_lora, step_dropout
from .mezo import mezo_gradient_estimate
from .plan import EngineOptions
from .preference import preference_value_and_grad
from .step import METHODS, masked_ce, value_and_grad

__all__ = ["value_and_grad", "METHODS", "EngineOptions", "masked_ce", "step_dropout",
           "LoRALinear", "apply_lora", "mezo_gradient_estimate",
           "preference_value_and_grad"]
